"""Shared fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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

    def prepare(self, seed: int = 0) -> subprocess.CompletedProcess[str]:
        return self.run_harness("prepare", "--config", self.config, "--data-cache",
                                self.data_cache, "--split", self.folder("split"), "--seed",
                                seed, results=self.folder("prepare.json"), cwd=self.workspace)

    def train(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run_harness("train", "--config", self.config, "--data",
                                self.folder("split") / "train", "--out", self.folder("train_out"),
                                *extra, cwd=self.workspace)

    def predict(self) -> subprocess.CompletedProcess[str]:
        return self.run_harness("predict", "--config", self.config, "--data",
                                self.folder("split") / "eval", "--state", self.folder("train_out"),
                                "--out", self.folder("predict_out"), cwd=self.workspace)

    def score(self, train_seconds: float = 2.0) -> subprocess.CompletedProcess[str]:
        return self.run_harness("score", "--config", self.config, "--data",
                                self.folder("split") / "score", "--state",
                                self.folder("train_out"), "--predictions",
                                self.folder("predict_out"), "--train-seconds", train_seconds,
                                results=self.folder("score.json"), cwd=self.workspace)

    def results(self, step: str) -> dict:
        return json.loads(self.folder(f"{step}.json").read_text())


@pytest.fixture
def harness_steps(run_harness, tiny_config, models_data_cache, tmp_path) -> Steps:
    """The tiny config's steps, with the session's data cache, from the project's models/."""
    (tmp_path / "run").mkdir()
    return Steps(run_harness, tiny_config, models_data_cache, tmp_path / "run")
