"""Agents propose experiments; they never execute anything."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from engine.agents.base import Agent
from engine.config import ExperimentConfig

if TYPE_CHECKING:
    from engine.journal import Journal


class AgentUnavailable(ValueError):
    """The chosen agent cannot be built here; the message says why."""


def default_agent_name() -> str:
    """Claude when a key is configured, otherwise the offline heuristic agent."""
    return "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "heuristic"


def make_agent(name: str, config: ExperimentConfig, journal: Journal | None = None) -> Agent:
    """Build the named agent for a run of `config`; `journal` (the run's) lets the Claude
    agent store its exchanges and spend (the heuristic ignores it)."""
    if name == "heuristic":
        from engine.agents.heuristic import HeuristicAgent

        return HeuristicAgent(config)
    if name == "anthropic":
        from engine.agents.anthropic import AnthropicAgent
        from engine.apikey import ApiKeyError

        try:
            return AnthropicAgent(config, journal)
        except ApiKeyError as exc:
            raise AgentUnavailable(str(exc)) from None
    if name.startswith("optuna-"):  # the search baselines (`proctor baseline`)
        from engine.agents.optuna_search import OptunaAgent, SearchUnavailable

        try:
            return OptunaAgent(config, name.removeprefix("optuna-"))
        except SearchUnavailable as exc:
            raise AgentUnavailable(str(exc)) from None
    raise AgentUnavailable(f"unknown agent '{name}' (heuristic, anthropic, optuna-tpe or "
                           "optuna-random)")
