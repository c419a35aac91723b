"""The report's pictures, drawn with matplotlib from plain data (`engine.report`).

matplotlib is optional (`pip install 'proctor[analytics]'`) and heavy: it is imported here
only when a picture is drawn, never when proctor starts. Figures are drawn on the Agg canvas
directly (no pyplot, no display, no global state), so drawing is safe off the main thread."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.atomic import write_atomic

if TYPE_CHECKING:
    from engine.ab import Comparison
    from engine.report import Curve, TreePoint
    from engine.stats import ChangeKind

INSTALL_HINT = "pip install 'proctor[analytics]'"
KIND_LABEL_LIMIT = 48  # characters of a kind of change shown on the bar chart's axis
KINDS_SHOWN = 20  # bars on the chart (report.md lists every kind)
LABELLED_NODES = 80  # up to this many nodes the tree picture prints their ids
LINE_STYLES = ("-", "--", "-.", ":")  # overlaid runs stay apart where their curves meet
GAP_FLOOR = 1e-5  # a best R² above 0.99999 is drawn at this gap to 1
VERDICT_COLOURS = {"helped": "tab:green", "no effect": "tab:gray", "hurt": "tab:red"}


class AnalyticsMissing(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def require() -> None:
    """Raise AnalyticsMissing unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401 - only whether it imports
    except ImportError:
        raise AnalyticsMissing(f"the report's plots need matplotlib: {INSTALL_HINT}") from None


def _figure(width: float, height: float) -> Any:
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> None:
    """Write the PNG whole or not at all (a viewer never reads half a picture)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue(), durable=False)


def draw_curves(curves: Sequence[Curve], path: Path) -> None:
    """Best-so-far R² per iteration (left) and per hour of training (right), one line per
    run, labelled with the run and its agent; runs of one agent share a colour. The axis
    is logarithmic in the gap to R² 1, so 0.99 to 0.999 is as far as 0.9 to 0.99."""
    figure = _figure(11, 4.2)
    by_iteration, by_hour = figure.subplots(1, 2, sharey=True)
    # a short run reads better in minutes; the axis says which
    longest = max((hours for curve in curves for hours in curve.hours), default=0.0)
    scale, unit = (1.0, "hours") if longest >= 1 else (60.0, "minutes")
    agents: list[str] = []  # in order of appearance: each its colour of matplotlib's cycle
    runs_drawn: list[str] = []  # one entry per run drawn, naming its agent
    for curve in curves:
        if not curve.iterations:
            continue
        if curve.agent not in agents:
            agents.append(curve.agent)
        style = {"where": "post", "marker": "o", "markersize": 3, "alpha": 0.85,
                 "color": f"C{agents.index(curve.agent) % 10}", "label": curve.label,
                 "linestyle": LINE_STYLES[runs_drawn.count(curve.agent) % len(LINE_STYLES)]}
        runs_drawn.append(curve.agent)
        gaps = [max(1.0 - best, GAP_FLOOR) for best in curve.best]
        by_iteration.step(curve.iterations, gaps, **style)
        by_hour.step([hours * scale for hours in curve.hours], gaps, **style)
    by_iteration.set(xlabel="iteration", ylabel="best R² so far (log scale of 1 − R²)",
                     title="best R² per iteration")
    by_hour.set(xlabel=f"{unit} of training (wall time of the runs)",
                title="best R² against training time (compute)")
    _whole_ticks(by_iteration.xaxis)
    _r2_gap_axis(by_iteration)
    for axes in (by_iteration, by_hour):
        axes.grid(alpha=0.3, which="both")
    if any(curve.iterations for curve in curves):
        by_iteration.legend(loc="lower right", fontsize="small")
    else:
        by_iteration.text(0.5, 0.5, "no scored node yet", ha="center",
                          transform=by_iteration.transAxes)
    _save(figure, path)


def _r2_gap_axis(axes: Any) -> None:
    """A y axis of 1 − R² on a log scale, turned over (better is higher) and labelled in R²
    (… 0.9, 0.95, 0.98, 0.99, 0.995 …: gaps of 1, 2 and 5 in each decade)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def r2_label(gap: float, _position: float) -> str:
        decimals = max(0, math.ceil(-math.log10(gap) - 1e-9)) if gap > 0 else 0
        return f"{1.0 - gap:.{decimals}f}"

    axes.set_yscale("log")
    axes.invert_yaxis()
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(r2_label))
    axes.yaxis.set_minor_formatter(NullFormatter())


def draw_tree(points: Sequence[TreePoint], best_path: Sequence[int], path: Path,
              title: str) -> None:
    """Nodes by iteration (x) and depth (y, roots on top), edges parent → child, coloured by
    R²; code changes are diamonds, unscored runs grey crosses; the best path in red."""
    figure = _figure(11, 5)
    axes = figure.subplots()
    where = {point.id: (point.id, point.depth) for point in points}
    for point in points:
        if point.parent_id is not None:
            (x0, y0), (x1, y1) = where[point.parent_id], where[point.id]
            axes.plot([x0, x1], [y0, y1], color="0.75", linewidth=0.8, zorder=1)
    if len(best_path) > 1:
        xs, ys = zip(*(where[node_id] for node_id in best_path), strict=True)
        axes.plot(xs, ys, color="tab:red", linewidth=2.5, alpha=0.8, zorder=2,
                  label="best path")
    scored = [point for point in points if point.r2 is not None]
    low = min((point.r2 for point in scored), default=0.0)
    high = max((point.r2 for point in scored), default=1.0)
    shown = None
    for code, marker, label in ((False, "o", "config change"), (True, "D", "code change")):
        group = [point for point in scored if point.code_changed is code]
        if group:
            shown = axes.scatter([p.id for p in group], [p.depth for p in group],
                                 c=[p.r2 for p in group], cmap="viridis", vmin=low,
                                 vmax=high if high > low else low + 1e-9, marker=marker,
                                 s=60, edgecolors="black", linewidths=0.5, zorder=3,
                                 label=label)
    unscored = [point for point in points if point.r2 is None]
    if unscored:
        axes.scatter([p.id for p in unscored], [p.depth for p in unscored], marker="x",
                     color="0.5", s=40, zorder=3, label="no score (failed, diverged)")
    if len(points) <= LABELLED_NODES:
        for point in points:
            axes.annotate(str(point.id), (point.id, point.depth), xytext=(0, 7),
                          textcoords="offset points", ha="center", fontsize=7)
    if shown is not None:
        figure.colorbar(shown, ax=axes, label="R²")
    axes.set(xlabel="iteration", ylabel="depth", title=title)
    _whole_ticks(axes.xaxis, axes.yaxis)
    axes.invert_yaxis()
    if points:
        axes.legend(loc="best", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no node yet", ha="center", transform=axes.transAxes)
    _save(figure, path)


def draw_kinds(kinds: Sequence[ChangeKind], path: Path) -> None:
    """One horizontal bar per kind of change: count × mean R² gain, most effective on top,
    each labelled with its count and mean gain."""
    shown = list(kinds)[:KINDS_SHOWN]
    figure = _figure(11, 1.2 + 0.38 * len(shown))
    axes = figure.subplots()
    rows = range(len(shown))
    totals = [kind.total_gain for kind in shown]
    axes.barh(rows, totals, color=["tab:green" if total > 0 else "tab:red"
                                   for total in totals])
    axes.set_yticks(rows, [_short(kind.kind) for kind in shown], fontsize=8)
    for row, kind in zip(rows, shown, strict=True):
        axes.annotate(f"n={kind.count}, mean {kind.mean_gain:+.4f}", (kind.total_gain, row),
                      xytext=(4 if kind.total_gain >= 0 else -4, 0),
                      textcoords="offset points", va="center", fontsize=7,
                      ha="left" if kind.total_gain >= 0 else "right")
    axes.axvline(0, color="black", linewidth=0.8)
    axes.invert_yaxis()
    more = f" (the first {KINDS_SHOWN} of {len(kinds)})" if len(kinds) > KINDS_SHOWN else ""
    axes.set(xlabel="count × mean R² gain over the parent",
             title=f"R² gain by kind of change{more}")
    axes.margins(x=0.25)
    _save(figure, path)


def draw_ab(results: dict[int, Comparison], path: Path) -> None:
    """Each tested node's mean ΔR² (its code − its parent's) with its 95% interval, coloured
    by verdict, over the band of the run's noise floor."""
    nodes = sorted(results)
    figure = _figure(max(5.0, 1.2 + 0.6 * len(nodes)), 4)
    axes = figure.subplots()
    noise = max(result.noise for result in results.values())
    axes.axhspan(-noise, noise, color="0.9", label=f"noise floor ±{noise:.4f}")
    axes.axhline(0, color="black", linewidth=0.8)
    for x, node in enumerate(nodes):
        result = results[node]
        axes.errorbar([x], [result.mean_delta],
                      yerr=[[result.mean_delta - result.low], [result.high - result.mean_delta]],
                      fmt="o", capsize=5, color=VERDICT_COLOURS.get(result.verdict, "tab:blue"))
    for verdict, colour in VERDICT_COLOURS.items():
        if any(result.verdict == verdict for result in results.values()):
            axes.plot([], [], "o", color=colour, label=verdict)
    axes.set_xticks(range(len(nodes)), [f"node {node}" for node in nodes])
    axes.set(ylabel="ΔR² (node − parent), 95% interval",
             title="A/B tests over paired seeds")
    axes.set_xlim(-0.7, len(nodes) - 0.3)
    axes.legend(loc="best", fontsize="small")
    _save(figure, path)


def _whole_ticks(*axes: Any) -> None:
    """Iterations and depths are whole numbers: no tick at 0.25."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= KIND_LABEL_LIMIT else text[:KIND_LABEL_LIMIT - 1] + "…"
