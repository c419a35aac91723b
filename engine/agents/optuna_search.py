"""A search baseline: Optuna's TPE or random sampler over `exploration.search_space`.

It is an agent like the others, so the loop, journal, tree, runner, evaluator, resume and
the app treat its trials as they treat any node. Each trial is a config-only node from the
base config; the study is rebuilt from the tree on every call (no Optuna storage of its own),
so a resumed run goes on from its journal. With parallel slots the other slots' proposals are
told as running trials, and TPE runs as a constant liar (a running trial counts as a bad
result), so slots asking at once do not sample the same region; the random sampler draws
from its own seed per iteration. TPE's first `TPE_STARTUP_TRIALS` trials come from its own
random sampler: under one seed they are the random baseline's trials, so the two baselines
differ only where TPE models the history (a paired comparison). `import optuna` happens
here only: it is slow and an optional extra (`pip install 'proctor[analytics]'`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.agents.base import AgentContext, AgentReply, NodeSummary
from engine.agents.search_model import dotted_value
from engine.config import ExperimentConfig, ParamRange
from engine.proposal import Proposal, Strategy
from engine.proposals import set_dotted

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial, TrialState

SAMPLERS = ("tpe", "random")
AGENT_PREFIX = "optuna-"
INSTALL_HINT = "pip install 'proctor[analytics]'"
TPE_STARTUP_TRIALS = 10  # Optuna's own default: random trials before TPE models the history


def agent_name(sampler: str) -> str:
    """The agent name a run records for `sampler` (`tpe` -> `optuna-tpe`)."""
    return f"{AGENT_PREFIX}{sampler}"


class SearchUnavailable(ValueError):
    """The baseline cannot run here (no optuna, an empty or unusable search space)."""


@dataclass(frozen=True)
class Told:
    """What the study was told before it sampled, for the reasoning log."""

    complete: int = 0
    failed: int = 0
    running: int = 0
    skipped: int = 0  # nodes that are not points of the space (code changes, outside it)


class OptunaAgent:
    """Proposes each trial as a sample of the search space; never edits code."""

    def __init__(self, config: ExperimentConfig, sampler: str,
                 startup_trials: int = TPE_STARTUP_TRIALS) -> None:
        if sampler not in SAMPLERS:
            raise SearchUnavailable(f"unknown sampler '{sampler}' (tpe or random)")
        try:
            import optuna
        except ImportError:
            raise SearchUnavailable(
                f"the {sampler} baseline needs optuna: {INSTALL_HINT}") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" lines
        self._optuna = optuna
        self.config = config
        self.sampler = sampler
        self.startup_trials = startup_trials
        self.name = agent_name(sampler)
        self.space = dict(sorted(config.exploration.search_space.items()))
        if not self.space:
            raise SearchUnavailable("the config has no exploration.search_space: a baseline "
                                    "searches its keys (low/high or choices)")
        self.distributions = {key: self._distribution(key, spec)
                              for key, spec in self.space.items()}
        self.base = config.experiment_sections()

    def _distribution(self, key: str, spec: ParamRange) -> BaseDistribution:
        dists = self._optuna.distributions
        if spec.choices is not None:
            return dists.CategoricalDistribution(tuple(spec.choices))
        assert spec.low is not None and spec.high is not None  # ParamRange guarantees both
        if spec.integer:
            low, high = math.ceil(spec.low), math.floor(spec.high)
            if low > high:
                raise SearchUnavailable(f"exploration.search_space.{key}: no integer lies in "
                                        f"[{spec.low}, {spec.high}]")
            return dists.IntDistribution(low, high, log=spec.log)
        return dists.FloatDistribution(spec.low, spec.high, log=spec.log)

    async def propose(self, context: AgentContext) -> AgentReply:
        """One trial: the study rebuilt from the tree, then asked for a point."""
        study = self._optuna.create_study(direction="maximize",
                                          sampler=self._make_sampler(context))
        told = self._tell_history(study, context)
        trial = study.ask(self.distributions)
        values = {key: trial.params[key] for key in self.space}
        shown = ", ".join(f"{key}={_short(value)}" for key, value in values.items())
        number = told.complete + told.failed + told.running + 1
        analysis = (f"{self.name} trial {number}: a sample of the search space from the base "
                    f"config ({shown})")
        reasoning = (f"{self.sampler} sampler (seed {self._seed(context)}) told "
                     f"{told.complete} finished trial(s), {told.failed} failed, "
                     f"{told.running} in flight"
                     + (f", {told.skipped} node(s) outside the space left out"
                        if told.skipped else "") + f"; sampled {shown}")
        # Parent None (the base config) for every trial: a trial's config is the base plus
        # the sampled value of every key, never inherited from another trial, so each node is
        # one independent sample of the space, as the sampler believes it is.
        proposal = Proposal(parent_id=None, strategy=Strategy.EXPLORE, config_changes=values,
                            mutation=f"{self.sampler}: {shown}", parent_rule="the base config",
                            hypothesis=f"{self.name} trial {number}", analysis=analysis)
        return AgentReply(proposal, reasoning)

    def _seed(self, context: AgentContext) -> int:
        """The sampler's seed for this call: the same (config seed, iteration, attempt) gives
        the same trial; every iteration draws afresh (one fixed seed would repeat its
        first random point)."""
        key = f"{self.config.exploration.seed}:{context.iteration}:{context.attempt or 0}"
        return random.Random(key).getrandbits(32)

    def _make_sampler(self, context: AgentContext) -> Any:
        samplers = self._optuna.samplers
        seed = self._seed(context)
        if self.sampler == "random":
            return samplers.RandomSampler(seed=seed)
        # constant liar: trials in flight count as bad results, so parallel slots spread out
        return samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials,
                                   constant_liar=True)

    def _tell_history(self, study: Any, context: AgentContext) -> Told:
        """Every node that is a point of the space as a trial (done: its R², nan as 0;
        diverged: 0, as the tree scores it; failed: a failed trial; pending or running: a
        running one), plus the other slots' proposals that are no nodes yet."""
        state = self._optuna.trial.TrialState
        complete = failed = running = skipped = 0
        configs = {node.id: node.config for node in context.nodes}
        for node in sorted(context.nodes, key=lambda n: n.id):
            trial = None if node.code_changed else self._trial(node.config, *self._outcome(node))
            if trial is None:
                skipped += 1
                continue
            study.add_trial(trial)
            complete += trial.state == state.COMPLETE
            failed += trial.state == state.FAIL
            running += trial.state == state.RUNNING
        for flight in context.in_flight:
            if flight.iteration in configs or flight.code_change is not None:
                continue  # applied already (a node above), or not a point of the space
            parent = self.base if flight.parent_id is None else configs.get(flight.parent_id)
            if parent is None:
                continue
            trial = self._trial(_with_changes(parent, flight.config_changes), state.RUNNING)
            if trial is not None:
                study.add_trial(trial)
                running += 1
        return Told(complete, failed, running, skipped)

    def _outcome(self, node: NodeSummary) -> tuple[TrialState, float | None]:
        """The trial state and value a node stands for."""
        state = self._optuna.trial.TrialState
        if node.status == "done":
            return state.COMPLETE, node.r2
        if node.status == "diverged":
            return state.COMPLETE, 0.0
        if node.status == "failed":
            return state.FAIL, None
        return state.RUNNING, None

    def _trial(self, sections: Mapping[str, Any], state: TrialState,
               value: float | None = None) -> FrozenTrial | None:
        """A trial at the node's values of the space's keys; None when it is not a point of
        the space (a key missing, a value outside its range)."""
        params: dict[str, Any] = {}
        for key in self.space:
            try:
                params[key] = dotted_value(sections, key)
            except KeyError:
                return None
        try:
            return self._optuna.trial.create_trial(
                params=params, distributions=self.distributions, state=state, value=value)
        except (ValueError, TypeError):  # outside the distribution (a human's own node)
            return None


def _with_changes(sections: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """The config `sections` with dotted `changes` applied."""
    config = dict(sections)
    for key, value in changes.items():
        config = set_dotted(config, key, value)
    return config


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else repr(value)
