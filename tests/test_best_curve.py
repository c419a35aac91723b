"""The app's best-so-far curve (plotext): the step line's corners, the drawing, and the one
line it shows without plotext."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from textual.app import App, ComposeResult
from waiting import until

from engine.tree import Node, NodeStatus
from tui.widgets.best_curve import BestCurve, curve_text, step_points

REPO = Path(__file__).resolve().parents[1]


def node(node_id: int, r2: float | None) -> Node:
    status = NodeStatus.FAILED if r2 is None else NodeStatus.DONE
    return Node(node_id, None, {}, metrics={} if r2 is None else {"final_r2": r2},
                status=status)


def test_the_best_holds_until_it_improves():
    assert step_points([(1, 0.5), (3, 0.7), (4, 0.8)]) == (
        [1, 3, 3, 4, 4], [0.5, 0.5, 0.7, 0.7, 0.8])
    assert step_points([]) == ([], [])


def test_the_curve_fills_its_box_and_names_its_range():
    text = curve_text([(1, 0.5), (2, 0.5), (6, 0.9)], [(1, 0.5), (2, 0.3), (6, 0.9)], 40, 8)
    lines = text.splitlines()
    assert len(lines) == 8 and all(len(line) <= 40 for line in lines)
    assert "0.9" in text and "0.3" in text  # the y axis spans every node's R²
    assert lines[-1].split() == ["1", "3", "6"]  # whole iterations on the x axis


class CurveApp(App):
    CSS = "BestCurve { width: 40; height: 7; }"

    def compose(self) -> ComposeResult:
        yield BestCurve(id="curve")


async def test_the_widget_draws_what_the_nodes_say():
    app = CurveApp()
    async with app.run_test(size=(60, 10)) as pilot:
        curve = app.query_one(BestCurve)
        curve.show([])
        await until(pilot, lambda: "no finished runs yet" in str(curve.content),
                    "the empty curve")
        curve.show([node(1, 0.5), node(2, None), node(3, 0.75)])
        await until(pilot, lambda: "0.75" in str(curve.content), "the curve's top value")


def test_without_plotext_the_curve_is_one_line_of_advice():
    probe = ("import sys; sys.modules['plotext'] = None\n"
             "from tui.widgets.best_curve import curve_text\n"
             "print(curve_text([(1, 0.5)], [(1, 0.5)], 40, 6))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "None", done.stderr
