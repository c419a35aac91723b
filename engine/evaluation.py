"""One run of a node, as proctor executes it: prepare -> train -> predict -> score.

Each step is a fresh sandboxed process that sees only its own folders (see the runner):

| step    | code it runs            | reads                          | writes        | reports  |
|---------|-------------------------|--------------------------------|---------------|----------|
| prepare | trusted harness         | the data cache                 | cache, split  | channel  |
| train   | the node's editable code| split/train                    | train_out     | exit code|
| predict | the node's model file   | split/eval, train_out          | predict_out   | exit code|
| score   | trusted harness         | split/score, both outputs      | nothing       | channel  |

train and predict each get a workspace rebuilt from the node's code, so nothing one of them
writes reaches the next; prepare and score share a pristine one that no editable code has
touched, and only they hold the results channel. The metrics of the node are the score
step's, nothing else's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.config import Limits, Timeouts
from engine.runner import (
    OutputCallback,
    Runner,
    RunRequest,
    RunResult,
    RunStatus,
    StartedCallback,
)

Populate = Callable[[Path], None]  # writes the node's code (the experiment package) into a folder
STEPS = ("prepare", "train", "predict", "score")


@dataclass(frozen=True)
class EvaluationPlan:
    """What proctor needs to run a node, whatever the experiment."""

    harness: str
    data_cache: Path
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    hide: tuple[Path, ...] = ()  # key files: never visible to a step, even inside an exposed path
    device: str | None = None


@dataclass
class _Area:
    """The folders of one evaluation under `root` (emptied before each use)."""

    root: Path
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.root / "config" / "config.yaml"

    def folder(self, name: str) -> Path:
        return self.root / name

    def reset(self) -> None:
        if self.root.exists():
            remove_tree(self.root)
        for name in ("config", "trusted", "split", "train", "train_out", "predict",
                     "predict_out"):
            (self.root / name).mkdir(parents=True)


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
    folders = _Area(area)
    folders.reset()
    folders.config.write_text(config_text, encoding="utf-8")
    plan.data_cache.mkdir(parents=True, exist_ok=True)
    trusted = folders.folder("trusted")
    populate(trusted)
    split, config = folders.folder("split"), str(folders.config)
    device = ("--device", plan.device) if plan.device else ()

    def request(step: str, workspace: Path, argv: Sequence[str], *, read_only=(),
                read_write=(), is_trusted: bool = False) -> RunRequest:
        return RunRequest(
            workspace=workspace,
            argv=(step, "--config", config, *argv),
            log_path=log_path,
            harness=plan.harness,
            read_only=(folders.config.parent, *read_only),
            read_write=tuple(read_write),
            hide=plan.hide,
            trusted=is_trusted,
            append_log=step != STEPS[0],
            timeouts=plan.timeouts,
            limits=plan.limits,
        )

    results: list[RunResult] = []

    async def step(req: RunRequest) -> RunResult | None:
        result = await runner.run(req, on_output=on_output, on_started=on_started)
        results.append(result)
        return result if result.status is RunStatus.OK else None

    name = "prepare"
    if await step(request(name, trusted, ("--data-cache", str(plan.data_cache),
                                          "--split", str(split), "--seed", str(seed)),
                          read_write=(plan.data_cache, split), is_trusted=True)) is None:
        return _combined(results, name)
    train_out, predict_out = folders.folder("train_out"), folders.folder("predict_out")
    workspace = folders.folder("train")
    populate(workspace)
    name = "train"
    trained = await step(request(name, workspace, ("--data", str(split / "train"),
                                                   "--out", str(train_out), *device),
                                 read_only=(split / "train",), read_write=(train_out,)))
    if trained is None:
        return _combined(results, name)
    workspace = folders.folder("predict")
    populate(workspace)
    name = "predict"
    if await step(request(name, workspace, ("--data", str(split / "eval"), "--state",
                                            str(train_out), "--out", str(predict_out),
                                            *device),
                          read_only=(split / "eval", train_out),
                          read_write=(predict_out,))) is None:
        return _combined(results, name)
    name = "score"
    await step(request(name, trusted, ("--data", str(split / "score"), "--state",
                                       str(train_out), "--predictions", str(predict_out),
                                       "--train-seconds", f"{trained.wall_s:.3f}"),
                       read_only=(split / "score", train_out, predict_out), is_trusted=True))
    return _combined(results, name)


def _combined(results: list[RunResult], last_step: str) -> RunResult:
    """One result for the whole run: the last step's status, error and metrics; times and
    warnings of all steps."""
    last = results[-1]
    error = last.error
    if error and last_step != "train" and last.status is not RunStatus.STOPPED:
        error = f"{last_step} step: {error}"
    peaks = [r.peak_rss_mb for r in results if r.peak_rss_mb is not None]
    return replace(
        last,
        metrics=dict(last.metrics) if last.status is RunStatus.OK else {},
        hyperparameters=next((r.hyperparameters for r in reversed(results)
                              if r.hyperparameters), {}),
        error=error,
        wall_s=sum(r.wall_s for r in results),
        peak_rss_mb=max(peaks) if peaks else None,
        log_truncated=any(r.log_truncated for r in results),
        warnings=tuple(dict.fromkeys(w for r in results for w in r.warnings)),
    )


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
