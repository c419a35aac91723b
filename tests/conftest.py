"""Shared fixtures."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
def run_harness(models_data_cache: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m models.harness ARGS` (cwd: the project or a workspace) with the session's
    data cache; returns the completed process (text output)."""

    def run(
        *args: str | Path, cwd: Path = ROOT, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "models.harness", *map(str, args)]
        if "--check" not in argv:
            argv += ["--data-cache", str(models_data_cache)]
        return subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    return run
