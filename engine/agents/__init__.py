"""Agents propose experiments; they never execute anything."""

from __future__ import annotations

import os

from engine.agents.base import Agent
from engine.config import ExperimentConfig


class AgentUnavailable(ValueError):
    """The chosen agent cannot be built here; the message says why."""


def default_agent_name() -> str:
    """Claude when a key is configured, otherwise the offline heuristic agent."""
    return "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "heuristic"


def make_agent(name: str, config: ExperimentConfig) -> Agent:
    """Build the named agent for a run of `config`."""
    if name == "heuristic":
        from engine.agents.heuristic import HeuristicAgent

        return HeuristicAgent(config)
    if name == "anthropic":
        raise AgentUnavailable(
            "the anthropic agent is not built yet; use --agent heuristic"
        )
    raise AgentUnavailable(f"unknown agent '{name}' (heuristic or anthropic)")
