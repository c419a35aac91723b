"""One run of a node, as proctor executes it: prepare -> train -> predict -> score.

Each step is a fresh sandboxed process that sees only its own folders (see the runner):

| step    | code it runs            | reads                          | writes        | reports  |
|---------|-------------------------|--------------------------------|---------------|----------|
| prepare | trusted harness         | the data cache                 | cache, split  | channel  |
| train   | the node's editable code| split/train                    | train_out     | exit code|
| predict | the node's model file   | split/eval, train_out          | predict_out   | exit code|
| score   | trusted harness         | split/score, both outputs      | nothing       | channel  |

train and predict each get a fresh copy of the node's code, so nothing one of them writes
reaches the next; prepare and score share a pristine one that no editable code has touched,
and only they hold the results channel. The metrics of the node are the score step's, nothing
else's. The split is kept from node to node while the config sections it was prepared from
(named in its `prepared.json`, which the trusted prepare step writes last) stay the same:
then a node is three steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from engine.config import Exploration, Limits, Timeouts
from engine.logs import strip_control
from engine.paths import data_cache
from engine.runner import (
    OutputCallback,
    Runner,
    RunRequest,
    RunResult,
    RunStatus,
    StartedCallback,
)

# Written last by the prepare step into the split: the config sections it was made from.
PREPARED_RECORD = "prepared.json"
Populate = Callable[[Path], None]  # writes the node's experiment package into a folder


@dataclass(frozen=True)
class EvaluationPlan:
    """What proctor needs to run a node, whatever the experiment."""

    harness: str
    data_cache: Path
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    hide: tuple[Path, ...] = ()  # key files: never visible to a step, even inside an exposed path
    device: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. the slot's CUDA_VISIBLE_DEVICES

    @classmethod
    def of(cls, exploration: Exploration, project_root: Path,
           device: str | None = None) -> EvaluationPlan:
        """The plan of a project's config: its harness, limits, the shared data cache, and
        the Claude key file hidden."""
        key_file = exploration.anthropic.key_file
        return cls(harness=exploration.harness, data_cache=data_cache(project_root),
                   timeouts=exploration.timeouts, limits=exploration.limits,
                   hide=(Path(key_file).expanduser(),) if key_file else (), device=device)


class _Evaluation:
    """The steps of one node in `area` (emptied first, but for a split still current)."""

    def __init__(self, runner: Runner, plan: EvaluationPlan, area: Path, populate: Populate,
                 log_path: Path, on_output: OutputCallback | None,
                 on_started: StartedCallback | None) -> None:
        self.runner, self.plan, self.area, self.populate = runner, plan, area, populate
        self.log_path, self.on_output, self.on_started = log_path, on_output, on_started
        self.results: list[RunResult] = []
        self.step = ""
        self.refused: str | None = None  # why an ok step's output may not be used
        self.train_result: RunResult | None = None
        self.config = area / "config" / "config.yaml"
        self.split = area / "split"
        self.trusted_workspace = area / "trusted"  # prepare and score: no editable code runs
        self.train_workspace, self.train_out = area / "train", area / "train_out"
        self.predict_workspace, self.predict_out = area / "predict", area / "predict_out"
        self.device = ("--device", plan.device) if plan.device else ()

    def reset(self, config_text: str, seed: int) -> bool:
        """Empty the area for this node; keep the split when it was prepared from the same
        config sections and seed (True then: no prepare step needed)."""
        keep = self.split_is_current(config_text, seed)
        for folder in ([] if not self.area.exists() else sorted(self.area.iterdir())):
            if folder != self.split or not keep:
                remove_tree(folder)
        for folder in (self.config.parent, self.split, self.trusted_workspace,
                       self.train_workspace, self.train_out, self.predict_workspace,
                       self.predict_out):
            folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(config_text, encoding="utf-8")
        self.plan.data_cache.mkdir(parents=True, exist_ok=True)
        self.populate(self.trusted_workspace)
        return keep

    def split_is_current(self, config_text: str, seed: int) -> bool:
        """Whether the split was prepared (completely: the record is written last) from the
        same seed and the same values of the config sections its record names."""
        try:
            record = json.loads((self.split / PREPARED_RECORD).read_text(encoding="utf-8"))
            config = yaml.safe_load(config_text)
            sections = record["config"]
            return record["seed"] == seed and all(
                config.get(name) == value for name, value in sections.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
            return False

    async def run_step(self, step: str, workspace: Path, argv: Sequence[str], *,
                       read_only: Sequence[Path] = (), read_write: Sequence[Path] = (),
                       trusted: bool = False, output: Path | None = None) -> bool:
        """One step; True when it went well and left nothing suspicious in `output`."""
        self.step = step
        request = RunRequest(
            workspace=workspace,
            argv=(step, "--config", str(self.config), *argv),
            log_path=self.log_path,
            harness=self.plan.harness,
            read_only=(self.config.parent, *read_only),
            read_write=tuple(read_write),
            hide=self.plan.hide,
            trusted=trusted,
            append_log=bool(self.results),
            timeouts=self.plan.timeouts,
            limits=self.plan.limits,
            env=self.plan.env,
        )
        result = await self.runner.run(request, on_output=self.on_output,
                                       on_started=self.on_started)
        self.results.append(result)
        if result.status is not RunStatus.OK:
            return False
        self.refused = _untrusted_output_problem(output, step) if output else None
        return self.refused is None

    async def prepare(self, seed: int) -> bool:
        return await self.run_step(
            "prepare", self.trusted_workspace,
            ("--data-cache", str(self.plan.data_cache), "--split", str(self.split),
             "--seed", str(seed)),
            read_write=(self.plan.data_cache, self.split), trusted=True)

    async def train(self) -> bool:
        _copy_tree(self.trusted_workspace, self.train_workspace)
        done = await self.run_step(
            "train", self.train_workspace,
            ("--data", str(self.split / "train"), "--out", str(self.train_out), *self.device),
            read_only=(self.split / "train",), read_write=(self.train_out,),
            output=self.train_out)
        self.train_result = self.results[-1]
        return done

    async def predict(self) -> bool:
        _copy_tree(self.trusted_workspace, self.predict_workspace)
        return await self.run_step(
            "predict", self.predict_workspace,
            ("--data", str(self.split / "eval"), "--state", str(self.train_out), "--out",
             str(self.predict_out), *self.device),
            read_only=(self.split / "eval", self.train_out), read_write=(self.predict_out,),
            output=self.predict_out)

    async def score(self) -> bool:
        assert self.train_result is not None
        train_seconds = self.train_result.wall_s  # as we measured it, not as the run said
        return await self.run_step(
            "score", self.trusted_workspace,
            ("--data", str(self.split / "score"), "--state", str(self.train_out),
             "--predictions", str(self.predict_out), "--train-seconds", f"{train_seconds:.3f}"),
            read_only=(self.split / "score", self.train_out, self.predict_out), trusted=True)


async def evaluate(
    runner: Runner,
    plan: EvaluationPlan,
    area: Path,
    populate: Populate,
    config_text: str,
    log_path: Path,
    *,
    seed: int = 0,
    on_output: OutputCallback | None = None,
    on_started: StartedCallback | None = None,
) -> RunResult:
    """Run the four steps of one node in `area`; the result carries the score step's metrics,
    or the first failing step's status and error."""
    run = _Evaluation(runner, plan, area, populate, log_path, on_output, on_started)
    prepared = run.reset(config_text, seed)
    steps = (run.train, run.predict, run.score) if prepared else \
        (lambda: run.prepare(seed), run.train, run.predict, run.score)
    for step in steps:
        if not await step():
            break
    return _combined(run.results, run.step, run.refused)


def _untrusted_output_problem(folder: Path, step: str) -> str | None:
    """Why what an untrusted step left in `folder` must not reach the next step, if it must
    not: only plain files and folders pass (a link or a pipe could make a trusted reader open
    something else, or block it)."""
    for top, folders, files in os.walk(folder):
        for name in (*folders, *files):
            path = os.path.join(top, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return (f"the {step} step left {os.path.relpath(path, folder)}, which is not "
                        "a plain file or folder")
    return None


def _combined(results: list[RunResult], last_step: str, refused: str | None = None) -> RunResult:
    """One result for the whole run: the last step's status, error and metrics; times and
    warnings of all steps. `refused`: why an ok step's output was not used."""
    last = results[-1]
    if refused is not None:
        last = replace(last, status=RunStatus.FAILED, error=refused)
    error = strip_control(last.error) if last.error else None  # it may quote run output
    if error and last_step != "train" and last.status is not RunStatus.STOPPED:
        error = f"{last_step} step: {error}"
    peaks = [r.peak_rss_mb for r in results if r.peak_rss_mb is not None]
    return replace(
        last,
        metrics=dict(last.metrics) if last.status is RunStatus.OK else {},
        hyperparameters=next((r.hyperparameters for r in reversed(results)
                              if r.hyperparameters), {}),
        error=error,
        traceback_tail=strip_control(last.traceback_tail),
        wall_s=sum(r.wall_s for r in results),
        peak_rss_mb=max(peaks) if peaks else None,
        log_truncated=any(r.log_truncated for r in results),
        warnings=tuple(dict.fromkeys(w for r in results for w in r.warnings)),
    )


def _copy_tree(source: Path, destination: Path) -> None:
    """A fresh copy of the pristine workspace (cheaper than rebuilding it from git)."""
    shutil.copytree(source, destination, symlinks=True, dirs_exist_ok=True)


def remove_tree(path: Path) -> None:
    """Remove a folder a sandboxed step wrote, even where it took away its own permissions."""
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    for top, folders, _ in os.walk(path):
        for name in (".", *folders):
            target = os.path.join(top, name)
            if not os.path.islink(target):
                with contextlib.suppress(OSError):  # not ours to change: rmtree will say so
                    os.chmod(target, stat.S_IRWXU)
    shutil.rmtree(path)
