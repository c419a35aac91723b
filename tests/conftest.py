"""Shared fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parents[1]

MODES = ["subprocess", "zygote"]


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=MODES)
async def runner(request: pytest.FixtureRequest) -> AsyncIterator:
    """One runner per mode for a whole test module (the zygote imports numpy and torch
    once); a module that needs another kind defines its own."""
    from engine.runner import make_runner

    made = make_runner(request.param)
    yield made
    await made.aclose()


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A temporary folder every user can reach: pytest's own sit under a 0700 folder of
    root's, which a run dropped to uid 65534 could not enter."""
    folder = Path(tempfile.mkdtemp(prefix="proctor-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the embedded experiment (models/) ---------------------------------------------------


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    """A config whose dataset builds in about a second and trains in about a second."""
    return ROOT / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def models_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache for the session, so the tiny dataset is simulated once."""
    return tmp_path_factory.mktemp("models-data-cache")


@pytest.fixture
def models_workspace(tmp_path: Path) -> Path:
    """A copy of the project's models/ package in a fresh folder, to edit without touching
    the real files; run the harness with this folder as cwd to use it."""
    workspace = tmp_path / "workspace"
    shutil.copytree(
        ROOT / "models", workspace / "models", ignore=shutil.ignore_patterns("__pycache__")
    )
    return workspace


@pytest.fixture
def run_harness() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m models.harness ARGS` (cwd: the project or a workspace); returns the
    completed process (text output). `results`: a file that receives fd 3 (the results
    channel of the trusted steps)."""

    def run(
        *args: str | Path, cwd: Path = ROOT, timeout: float = 120, results: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "models.harness", *map(str, args)]

        def channel() -> None:
            if results is not None:
                os.dup2(os.open(results, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 3)

        return subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, preexec_fn=channel, close_fds=False,
        )

    return run


@dataclass
class Steps:
    """One run's four harness steps, each called by hand as proctor would call them."""

    run_harness: Callable[..., subprocess.CompletedProcess[str]]
    config: Path
    data_cache: Path
    root: Path
    workspace: Path = ROOT

    def folder(self, name: str) -> Path:
        return self.root / name

    def argv(self, step: str, *extra: str | Path | float) -> list[str]:
        """The harness's arguments for `step`, as proctor passes them."""
        split = self.folder("split")
        state, predictions = self.folder("train_out"), self.folder("predict_out")
        own = {
            "prepare": ["--data-cache", self.data_cache, "--split", split, "--seed", 0],
            "train": ["--data", split / "train", "--out", state],
            "predict": ["--data", split / "eval", "--state", state, "--out", predictions],
            "score": ["--data", split / "score", "--state", state, "--predictions",
                      predictions, "--train-seconds", 2.0],
        }[step]
        return [str(a) for a in (step, "--config", self.config, *own, *extra)]

    def _run(self, step: str, *extra: str | Path | float) -> subprocess.CompletedProcess[str]:
        results = self.folder(f"{step}.json") if step in ("prepare", "score") else None
        return self.run_harness(*self.argv(step, *extra), results=results, cwd=self.workspace)

    def prepare(self, seed: int = 0) -> subprocess.CompletedProcess[str]:
        argv = self.argv("prepare")
        argv[argv.index("--seed") + 1] = str(seed)
        return self.run_harness(*argv, results=self.folder("prepare.json"), cwd=self.workspace)

    def train(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self._run("train", *extra)

    def predict(self) -> subprocess.CompletedProcess[str]:
        return self._run("predict")

    def score(self, train_seconds: float = 2.0) -> subprocess.CompletedProcess[str]:
        return self._run("score", "--train-seconds", train_seconds)

    def all_steps(self, steps: tuple[str, ...] = ("prepare", "train", "predict", "score")
                  ) -> subprocess.CompletedProcess[str]:
        """`steps` in one interpreter, each through `main()` as a zygote child calls it (torch
        is imported once); stops at the first that fails, with its exit code."""
        plan = [(step, self.argv(step), str(self.folder(f"{step}.json"))
                 if step in ("prepare", "score") else None) for step in steps]
        script = (
            "import json, os, sys\n"
            "from models.harness import main\n"
            "for step, argv, results in json.loads(sys.argv[1]):\n"
            "    if results:\n"
            "        os.dup2(os.open(results, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 3)\n"
            "    code = main(argv)\n"
            "    if code:\n"
            "        sys.exit(code)\n"
        )
        return subprocess.run([sys.executable, "-c", script, json.dumps(plan)],
                              cwd=self.workspace, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)

    def results(self, step: str) -> dict:
        return json.loads(self.folder(f"{step}.json").read_text())


@pytest.fixture
def harness_steps(run_harness, tiny_config, models_data_cache, tmp_path) -> Steps:
    """The tiny config's steps, with the session's data cache, from the project's models/."""
    (tmp_path / "run").mkdir()
    return Steps(run_harness, tiny_config, models_data_cache, tmp_path / "run")
