"""`proctor report`: the curves as plain data on a hand-built journal whose answers are known,
then a tiny real run of the fake experiment reported end to end (PNGs that decode)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from git_project import make_git_project
from scripted_agent import run_scripted

from engine.ab import compare
from engine.journal import Journal, RunEvent, Step
from engine.paths import RunPaths
from engine.records import nodes_from_journal
from engine.report import (
    AB_PNG,
    CURVES_JSON,
    CURVES_PNG,
    KINDS_PNG,
    TREE_PNG,
    best_path,
    best_so_far,
    cumulative_hours,
    read_run,
    tree_points,
    write_report,
    write_tree_picture,
)
from engine.tree import Node, NodeStatus

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# id, parent, code change, status, R², the seconds of each attempt's run
NODES = [
    (1, None, False, NodeStatus.DONE, 0.5, (360.0,)),
    (2, 1, False, NodeStatus.DONE, 0.4, (720.0,)),
    (3, 1, True, NodeStatus.FAILED, None, (180.0, 180.0)),  # a repair attempt: both count
    (4, 2, False, NodeStatus.DONE, 0.7, (1080.0,)),
    (5, 4, False, NodeStatus.DIVERGED, None, (360.0,)),
    (6, 4, True, NodeStatus.DONE, 0.65, (1800.0,)),
]


def write_journal(run_dir: Path, name: str, agent: str, ab: bool = False) -> None:
    with Journal.open_for_engine(run_dir) as journal:
        journal.append_run_event(RunEvent.RUN_CREATED,
                                 {"settings": {"name": name, "agent": agent}})
        for node_id, parent, code, status, r2, seconds in NODES:
            rate = 1e-3 * node_id
            node = Node(node_id, parent, {"training": {"learning_rate": rate}},
                        code_changed=code, status=status,
                        metrics={} if r2 is None else {"final_r2": r2},
                        mutation="[code] huber | loss" if code else "learning_rate")
            journal.append(node_id, Step.STARTED, {"block": 1})
            for attempt, wall in enumerate(seconds):
                journal.append(node_id, Step.RUN_FINISHED, {"result": {"wall_s": wall}},
                               attempt=attempt)
            journal.append(node_id, Step.RECORDED, {"node": node.to_dict()})
        if ab:
            for node_id, gains in ((6, (0.03, 0.02, 0.025)), (4, (0.01, -0.01, 0.0))):
                parent = (0.6, 0.61, 0.62)
                result = compare((1, 2, 3), parent,
                                 [a + gain for a, gain in zip(parent, gains, strict=True)],
                                 0.005)
                journal.append_run_event(RunEvent.AB_RESULT,
                                         {"node": node_id, **result.to_dict()})


def assert_png(path: Path) -> None:
    """A whole PNG: its signature, a header with a size, and pixels that decode."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100, path
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (height, width)


def proctor(project: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom tui.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=project,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


# -- the figures as plain data ------------------------------------------------------------


def test_best_so_far_per_iteration_and_per_hour_on_a_known_journal(tmp_path):
    write_journal(tmp_path / "r1", "r1", "heuristic")
    figures = read_run(tmp_path / "r1")
    curve = figures.curve
    assert curve.label == "r1 (heuristic)"
    assert curve.iterations == (1, 2, 3, 4, 5, 6)
    assert curve.best == (0.5, 0.5, 0.5, 0.7, 0.7, 0.7)  # failed and diverged change nothing
    assert curve.hours == pytest.approx((0.1, 0.3, 0.4, 0.7, 0.8, 1.3))
    assert (curve.best_at(3), curve.best_at(4), curve.best_at(6)) == (0.5, 0.7, 0.7)
    assert curve.best_at(12) is None  # not reached


def test_a_curve_starts_at_the_first_scored_node():
    failed = Node(1, None, {}, status=NodeStatus.FAILED)
    done = Node(2, None, {}, metrics={"final_r2": 0.3}, status=NodeStatus.DONE)
    better = Node(3, 2, {}, metrics={"final_r2": 0.6}, status=NodeStatus.DONE)
    assert best_so_far([better, failed, done]) == [(2, 0.3), (3, 0.6)]
    assert best_so_far([failed]) == []


def test_hours_count_iterations_that_left_no_node():
    # iteration 2's run finished but left no node (a lost machine): its time was spent
    assert cumulative_hours({1: 1800.0, 2: 3600.0, 3: 1800.0}, [1, 3]) == [0.5, 2.0]


def test_the_tree_by_depth_and_the_best_path(tmp_path):
    write_journal(tmp_path / "r1", "r1", "heuristic")
    nodes = read_run(tmp_path / "r1").nodes
    points = {point.id: point for point in tree_points(nodes)}
    assert {node_id: point.depth for node_id, point in points.items()} == \
        {1: 0, 2: 1, 3: 1, 4: 2, 5: 3, 6: 3}
    assert points[3].r2 is None and points[5].r2 is None  # no score, drawn as crosses
    assert points[6].code_changed and points[6].r2 == 0.65
    assert best_path(nodes) == [1, 2, 4]


def test_the_report_of_a_run_against_another(tmp_path):
    write_journal(tmp_path / "r1", "r1", "heuristic", ab=True)
    write_journal(tmp_path / "tpe", "tpe", "optuna-tpe")
    report = write_report(tmp_path / "r1", [tmp_path / "tpe"])
    text = report.read_text()
    for picture in (CURVES_PNG, TREE_PNG, KINDS_PNG, AB_PNG):
        assert f"]({picture})" in text
        assert_png(report.parent / picture)
    assert "| r1 | heuristic | 6 | 0.7000 | – | – | 1.30 h |" in text
    assert "| tpe | optuna-tpe | 6 | 0.7000 | – | – | 1.30 h |" in text
    assert "Best path: 1 → 2 → 4 (R² 0.7000)" in text
    assert "| [code] huber \\| loss | 1 | -0.0500 | -0.0500 |" in text  # a cell stays one
    assert "| 6 | 3 | +0.0250 | [+0.0126, +0.0374] | 0.0050 | helped |" in text
    assert "| 4 | 3 | +0.0000 |" in text and "no effect" in text
    curves = json.loads((report.parent / CURVES_JSON).read_text())["curves"]
    assert [(c["run"], c["agent"]) for c in curves] == [("r1", "heuristic"),
                                                        ("tpe", "optuna-tpe")]


def test_a_run_without_ab_tests_or_gains_says_so_instead_of_plotting(tmp_path):
    with Journal.open_for_engine(tmp_path / "r1") as journal:
        node = Node(1, None, {}, metrics={"final_r2": 0.4}, status=NodeStatus.DONE)
        journal.append(1, Step.RECORDED, {"node": node.to_dict()})
    report = write_report(tmp_path / "r1")
    text = report.read_text()
    assert "No A/B test in this run yet" in text and AB_PNG not in text
    assert "No change has a measured gain" in text and KINDS_PNG not in text
    assert not (report.parent / AB_PNG).exists()
    assert_png(report.parent / CURVES_PNG)


# -- a real run, reported end to end ------------------------------------------------------


def run_fake(project: Path, name: str, iterations: int) -> Path:
    return run_scripted(project, name, iterations).run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    """Two runs of the scripted agent on the fake experiment: r1 (4 iterations, one code
    change) and r2 (3 iterations)."""
    project = make_git_project(tmp_path_factory.mktemp("report") / "project")
    run_fake(project, "r1", 4)
    run_fake(project, "r2", 3)
    return project


def test_proctor_report_of_a_real_run_against_another(two_runs):
    done = proctor(two_runs, "report", "r1", "--against", "r2")
    assert done.returncode == 0, done.stderr
    folder = two_runs / "log" / "r1" / "report"
    assert str(folder / "report.md") in done.stdout
    text = (folder / "report.md").read_text()
    pictures = [CURVES_PNG, TREE_PNG, KINDS_PNG]
    for picture in pictures:
        assert f"]({picture})" in text
        assert_png(folder / picture)
    assert "No A/B test in this run yet (`proctor ab r1 NODE`" in text
    curves = json.loads((folder / CURVES_JSON).read_text())["curves"]
    assert [(c["run"], c["agent"], c["iterations"]) for c in curves] == \
        [("r1", "scripted", [1, 2, 3, 4]), ("r2", "scripted", [1, 2, 3])]
    for curve in curves:
        assert curve["best"] == sorted(curve["best"])  # best so far never falls
        assert curve["hours"] == sorted(curve["hours"]) and curve["hours"][0] > 0
    with Journal.open_for_client(two_runs / "log" / "r1") as journal:
        nodes = {node_id: journal.payload(node_id, Step.RECORDED)["node"]
                 for node_id in (1, 2, 3, 4)}
    assert curves[0]["best"][-1] == max(n["metrics"]["final_r2"] for n in nodes.values())


def test_a_tree_picture_for_a_block_end(two_runs):
    run_dir = two_runs / "log" / "r1"
    picture = RunPaths(run_dir).tree_picture(1)
    with Journal.open_for_client(run_dir) as journal:
        assert write_tree_picture(nodes_from_journal(journal), picture)
    assert picture == run_dir / "memory" / "tree_block_001.png"
    assert_png(picture)


def test_what_cannot_be_reported_is_one_line(two_runs):
    broken = two_runs / "log" / "broken"
    broken.mkdir()
    (broken / "journal.sqlite").write_bytes(b"not a database" * 100)
    for args, message in ((("report", "nope"), "no run 'nope'"),
                          (("report", "r1", "--against", "nope"), "no run 'nope'"),
                          (("report", "broken"), "journal")):
        refused = proctor(two_runs, *args)
        assert refused.returncode == 2, refused.stderr
        assert message in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_without_matplotlib_the_report_says_what_to_install(two_runs):
    block = "sys.modules['matplotlib'] = None  # as if it were not installed"
    refused = proctor(two_runs, "report", "r2", prelude=block)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("proctor: the report's plots need matplotlib: "
                                      "pip install 'proctor[analytics]'")
    assert not (two_runs / "log" / "r2" / "report").exists()
    quiet = ("import sys; sys.modules['matplotlib'] = None\n"
             "from pathlib import Path\nfrom engine.journal import Journal\n"
             "from engine.records import nodes_from_journal\n"
             "from engine.report import write_tree_picture\n"
             "with Journal.open_for_client('log/r2') as journal:\n"
             "    print(write_tree_picture(nodes_from_journal(journal),\n"
             "                             Path('log/r2/memory/tree.png')))\n")
    skipped = subprocess.run([sys.executable, "-c", quiet], cwd=two_runs, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert skipped.stdout.strip() == "False", skipped.stderr


def test_start_up_paths_never_import_matplotlib_or_plotext():
    probe = ("import sys, tui.cli, tui.app, tui.commands, engine.loop, engine.report\n"
             "print(sorted(m for m in ('matplotlib', 'plotext') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_a_blocks_end_leaves_a_picture_of_the_tree(tmp_path):
    pytest.importorskip("matplotlib")
    project = make_git_project(tmp_path / "project")
    config_path = project / "configs" / "fake.yaml"
    config_path.write_text(config_path.read_text().replace("block_size: 4", "block_size: 2"))
    engine = run_scripted(project, iterations=2)
    picture = engine.paths.tree_picture(1)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
