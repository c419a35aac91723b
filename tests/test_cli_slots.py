"""`status`, `approve` and `reject` on a run with several slots (journal written by hand,
tests/slot_journal.py): what runs where and how far, every waiting review with its own
commands, and no decision sent without `--proposal` while several wait. `jobscript` prints
the batch script of a cluster config, and refuses a config without one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from slot_journal import WAITING, WORKER, write_slot_run
from test_cli import engine_holds, posted, proctor

HERE = Path(__file__).resolve().parent
FIRST, SECOND = WAITING


@pytest.fixture
def slot_run(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(HERE / "fakeproject", root, ignore=shutil.ignore_patterns("__pycache__",
                                                                              "log"))
    return write_slot_run(root)


def test_status_lists_what_runs_in_which_slot_and_where_and_every_waiting_review(slot_run):
    project = slot_run.parents[1]
    with engine_holds(slot_run):
        text = proctor("status", "s1", cwd=project)
        fields = json.loads(proctor("status", "s1", "--json", cwd=project).stdout)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == ("run s1: 2 nodes; driven by an engine; 4 of 4 slots busy, 2 waiting "
                        "for review")
    assert lines[1:7] == [
        f"  waiting for review: {FIRST.summary()}",
        f"    proctor approve s1 --proposal {FIRST.proposal_id}",
        f"    proctor reject s1 --proposal {FIRST.proposal_id} --reason TEXT",
        f"  waiting for review: {SECOND.summary()}",
        f"    proctor approve s1 --proposal {SECOND.proposal_id}",
        f"    proctor reject s1 --proposal {SECOND.proposal_id} --reason TEXT"]
    assert lines[7:12] == [
        "  in flight:",
        "    iteration 5 · slot 1 · local slot 1 (pid 4242) · node 5 <- root: lr 1e-3 · "
        "training 300/2000 steps",
        f"    iteration 6 · slot 2 · {WORKER} · node 6 <- root: lr 3e-4 · simulating 40/200 "
        "frames",
        "    iteration 7 · slot 3 · node 7 <- root: [code] clip the gradients · waits for "
        "review",
        "    iteration 8 · slot 4 · node 8 <- root: [code] huber loss · waits for review"]
    assert fields["slots"] == 4 and fields["engine"] == "running"
    assert [r["proposal_id"] for r in fields["reviews"]] == [FIRST.proposal_id,
                                                            SECOND.proposal_id]
    assert fields["reviews"][1]["approve"] == f"proctor approve s1 --proposal {SECOND.proposal_id}"
    assert fields["review"]["proposal_id"] == FIRST.proposal_id  # the oldest, as before slots
    local, remote, *waiting = fields["in_flight"]
    assert (local["slot"], local["where"], local["pid"], local["progress"]) == \
        (1, "local slot 1", 4242, {"phase": "training", "step": 300, "total": 2000})
    assert (remote["slot"], remote["where"], remote["pid"], remote["progress"]) == \
        (2, WORKER, 0, {"phase": "simulation", "step": 40, "total": 200})
    assert [(w["iteration"], w["slot"], w["step"], w["where"]) for w in waiting] == \
        [(7, 3, "waits for review", None), (8, 4, "waits for review", None)]
    # with the engine gone the same runs read as unfinished
    crashed = proctor("status", "s1", cwd=project).stdout.splitlines()[0]
    assert crashed == ("run s1: 2 nodes; no engine drives it (it crashed or was killed); "
                       "iterations 5, 6, 7, 8 are unfinished; `proctor resume s1` continues it")


def test_a_decision_without_proposal_while_two_wait_sends_nothing_and_names_each(slot_run):
    project = slot_run.parents[1]
    approve = proctor("approve", "s1", cwd=project)
    assert approve.returncode == 2, approve.stderr
    assert approve.stderr.splitlines() == [
        "proctor: run s1: 2 proposals wait for review, one per slot; --proposal names the "
        "one to decide:",
        f"  {FIRST.summary()}",
        f"    proctor approve s1 --proposal {FIRST.proposal_id}",
        f"  {SECOND.summary()}",
        f"    proctor approve s1 --proposal {SECOND.proposal_id}"]
    reject = proctor("reject", "s1", "--reason", "too risky", cwd=project)
    assert reject.returncode == 2
    assert f"    proctor reject s1 --proposal {SECOND.proposal_id} --reason 'too risky'" in \
        reject.stderr.splitlines()
    long = proctor("reject", "s1", "--reason", "x" * 100_000, cwd=project)
    assert long.returncode == 2 and "x" * 201 not in long.stderr  # the command, not the essay
    assert f"    proctor reject s1 --proposal {SECOND.proposal_id} --reason TEXT" in \
        long.stderr.splitlines()
    unknown = proctor("approve", "s1", "--proposal", "3.0-0000000000", cwd=project)
    assert unknown.returncode == 2
    assert "proposal 3.0-0000000000 does not wait for review:" in unknown.stderr
    assert posted(slot_run) == []
    # naming one of them decides that one only
    chosen = proctor("approve", "s1", "--proposal", SECOND.proposal_id, cwd=project)
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.splitlines()[0] == f"run s1: approving {SECOND.summary()}"
    assert posted(slot_run) == [{"kind": "Approve", "proposal_id": SECOND.proposal_id,
                                 "by": ""}]


CLUSTER = """exploration:
  parallel: 2
  executor:
    kind: dask
    dask:
      cluster:
        system: {system}
        queue: gpu
        cores: 4
        memory: 16GB
        walltime: "02:00:00"
        job_script_prologue: ["module load cuda"]
"""


def test_jobscript_prints_a_cluster_configs_batch_script_and_refuses_a_config_without(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("exploration:\n  parallel: 2\n")
    refused = proctor("jobscript", str(plain), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == (f"proctor: {plain} has no exploration.executor.dask.cluster "
                              "(slurm, lsf or pbs): there is no job script to print\n")
    pytest.importorskip("engine.executors.jobqueue")
    pytest.importorskip("dask_jobqueue")
    for system, directive in (("slurm", "#SBATCH"), ("lsf", "#BSUB")):
        config = tmp_path / f"{system}.yaml"
        config.write_text(CLUSTER.format(system=system))
        printed = proctor("jobscript", str(config), cwd=tmp_path)
        assert printed.returncode == 0, printed.stderr
        assert directive in printed.stdout and "module load cuda" in printed.stdout
