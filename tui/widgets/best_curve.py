"""The best-so-far R² curve in the terminal (plotext), as `proctor report` draws it in PNG.

plotext is optional (`pip install 'proctor[analytics]'`) and loaded at the first drawing,
never at start-up; without it the widget says so in one line. plotext draws on one global
figure, so drawing happens on the UI thread only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.text import Text
from textual.widgets import Static

from engine.report import best_so_far
from engine.tree import Node, NodeStatus

INSTALL_HINT = "pip install 'proctor[analytics]' for the curve"


def step_points(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """The corners of a step line through `points`: the best holds until it improves."""
    xs: list[int] = []
    ys: list[float] = []
    for index, (x, y) in enumerate(points):
        if index:
            xs.append(x)
            ys.append(points[index - 1][1])
        xs.append(x)
        ys.append(y)
    return xs, ys


def curve_text(best: Sequence[tuple[int, float]], scores: Sequence[tuple[int, float]],
               width: int, height: int) -> str | None:
    """The best-so-far step line over each node's R² (dots), `width` × `height` characters
    without colour; None when plotext (6 or later: `plotext.figure`) is not installed."""
    try:
        import plotext
    except ImportError:
        return None
    figure = getattr(plotext, "figure", None)
    if figure is None or not hasattr(figure, "signal"):
        return None  # plotext 5 draws through another API
    figure.clear.all()
    figure.plot_size(width, height)
    figure.theme("colorless")
    first, last = best[0][0], best[-1][0]
    ticks = sorted({first, (first + last) // 2, last})
    figure.ruler(axis=0).ticks(ticks, [str(tick) for tick in ticks])
    if scores:
        figure.draw(figure.signal([x for x, _ in scores], [y for _, y in scores], marker="•"))
    xs, ys = step_points(best)
    figure.draw(figure.signal(xs, ys, marker="braille").lines())
    return figure.build().string(colorless=True)


class BestCurve(Static):
    """Best R² so far per iteration (a step line) over each finished node's R² (dots)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._best: list[tuple[int, float]] = []
        self._scores: list[tuple[int, float]] = []
        self._drawn: tuple | None = None

    def show(self, nodes: Iterable[Node]) -> None:
        """Draw the curve of these nodes (nothing is redrawn when nothing changed)."""
        nodes = list(nodes)
        self._best = best_so_far(nodes)
        self._scores = [(node.id, node.r2) for node in sorted(nodes, key=lambda n: n.id)
                        if node.status is NodeStatus.DONE]
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        width, height = self.content_size.width, self.content_size.height
        drawn = (tuple(self._best), tuple(self._scores), width, height)
        if drawn == self._drawn or width < 10 or height < 3:
            return
        self._drawn = drawn
        if not self._best:
            self.update(Text("no finished runs yet", "dim"))
            return
        text = curve_text(self._best, self._scores, width, height)
        if text is None:
            best = self._best[-1][1]
            self.update(Text(f"{len(self._scores)} runs · best so far {best:.3f}\n"
                             f"{INSTALL_HINT}", "dim"))
            return
        self.update(Text(text, "green"))
