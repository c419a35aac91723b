"""The real experiment through the whole product: `proctor run` headless on the tiny MPM +
SIREN config, the offline agent, the zygote runner, then `proctor status`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.journal import Journal

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_real_headless_exploration_on_the_tiny_config(tmp_path):
    project = tmp_path / "project"
    for folder in ("models", "instructions"):
        shutil.copytree(REPO / folder, project / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (project / "configs").mkdir()
    shutil.copy(REPO / "tests" / "configs" / "tiny.yaml", project / "configs" / "tiny.yaml")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}

    def proctor(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=400)

    run = proctor("run", "configs/tiny.yaml", "--headless", "--iterations", "3",
                  "--approve", "auto", "--runner", "zygote", "--name", "e2e")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "finished: completed 3 iterations" in run.stdout
    run_dir = project / "log" / "e2e"
    with Journal.open_for_client(run_dir) as journal:
        assert journal.completed_iterations() == [1, 2, 3]
    for node in ("001", "002", "003"):
        record = json.loads((run_dir / "nodes" / node / "metrics.json").read_text())
        assert record["status"] == "done"
        assert -1.0 < record["metrics"]["final_r2"] <= 1.0
        assert record["metrics"]["total_params"] > 0
    analysis = (run_dir / "analysis.md").read_text()
    assert analysis.count("## Iter ") == 3
    assert "Field: field_name=Jp, n_frames=8" in analysis
    memory = (run_dir / "memory.md").read_text()
    assert "- Node 3 (" in memory and "-> pending" not in memory  # the last node settled too
    status = proctor("status", "e2e", "--json")
    rows = json.loads(status.stdout)["nodes"]
    assert sorted(row["node_id"] for row in rows) == [1, 2, 3]
    # the user's own files are untouched by the run
    assert (project / "models" / "trainer.py").read_text() == \
        (REPO / "models" / "trainer.py").read_text()
