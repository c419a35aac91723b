"""`proctor report RUN [--against RUN ...]`: a run's figures as plain data, and the report.

Everything comes from each run's journal alone: its nodes (`nodes_from_journal`), its
creation record (name, agent), the training time its finished runs measured, its
modification metrics (`engine.stats`) and its A/B results (`engine.ab_runs`). The curves are
plain lists, so they are testable without matplotlib; `engine.plots` draws them. The report
is written to `log/<run>/report/`: `report.md` and the PNG plots it embeds."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import plots
from engine.ab import Comparison
from engine.ab_runs import ab_results
from engine.atomic import write_atomic
from engine.journal import Journal, RunEvent
from engine.logs import strip_control
from engine.paths import RunPaths
from engine.records import nodes_from_journal
from engine.stats import RunStats, run_stats, training_seconds_by_iteration
from engine.tree import Node, NodeStatus

REPORT_FILE = "report.md"
CURVES_JSON = "curves.json"  # the curves' points, as plotted
MILESTONES = (12, 24)  # best R² after this many iterations, as the issue compares runs
CURVES_PNG, TREE_PNG, KINDS_PNG, AB_PNG = "best_so_far.png", "tree.png", "kinds.png", "ab.png"


@dataclass(frozen=True)
class Curve:
    """Best-so-far R² of one run, per iteration and per hour of training (aligned lists;
    they start at the first node that finished with a score)."""

    run: str
    agent: str
    iterations: tuple[int, ...]
    hours: tuple[float, ...]  # training wall time spent up to and including the iteration
    best: tuple[float, ...]
    last_iteration: int  # the highest iteration the run recorded (0: none)

    @property
    def label(self) -> str:
        return f"{self.run} ({self.agent})"

    def best_at(self, iteration: int) -> float | None:
        """Best R² among the first `iteration` iterations; None when the run has not got
        that far or had no score by then."""
        if self.last_iteration < iteration:
            return None
        reached = [best for x, best in zip(self.iterations, self.best, strict=True)
                   if x <= iteration]
        return reached[-1] if reached else None


@dataclass(frozen=True)
class TreePoint:
    """One node of the tree picture: x is its iteration, y its depth below a root."""

    id: int
    parent_id: int | None
    depth: int
    r2: float | None  # None: it has no score (failed, diverged, not finished)
    code_changed: bool


def best_so_far(nodes: Iterable[Node]) -> list[tuple[int, float]]:
    """(iteration, best R² of the iterations up to it), for every node from the first one
    that finished with a score."""
    points: list[tuple[int, float]] = []
    best: float | None = None
    for node in sorted(nodes, key=lambda node: node.id):
        if node.status is NodeStatus.DONE and (best is None or node.r2 > best):
            best = node.r2
        if best is not None:
            points.append((node.id, best))
    return points


def cumulative_hours(seconds: dict[int, float], iterations: Sequence[int]) -> list[float]:
    """Training hours spent through each of `iterations` (ascending), from the seconds each
    iteration's runs took (iterations without a node, such as lost ones, count too)."""
    spent = sorted(seconds.items())
    hours, total, index = [], 0.0, 0
    for iteration in iterations:
        while index < len(spent) and spent[index][0] <= iteration:
            total += spent[index][1]
            index += 1
        hours.append(total / 3600)
    return hours


def curve(journal: Journal, run: str, agent: str) -> Curve:
    """Run `run`'s best-so-far curve, from its journal."""
    nodes = nodes_from_journal(journal)
    points = best_so_far(nodes)
    iterations = [iteration for iteration, _ in points]
    return Curve(run, agent, tuple(iterations),
                 tuple(cumulative_hours(training_seconds_by_iteration(journal), iterations)),
                 tuple(best for _, best in points),
                 max((node.id for node in nodes), default=0))


def tree_points(nodes: Iterable[Node]) -> list[TreePoint]:
    """Every node placed by iteration and depth (a parent is always older than its child; a
    node whose parent is not in the tree counts as a root)."""
    depths: dict[int, int] = {}
    points = []
    for node in sorted(nodes, key=lambda node: node.id):
        parent = node.parent_id if node.parent_id in depths else None
        depths[node.id] = 0 if parent is None else depths[parent] + 1
        points.append(TreePoint(node.id, parent, depths[node.id],
                                node.r2 if node.status is NodeStatus.DONE else None,
                                node.code_changed))
    return points


def best_path(nodes: Iterable[Node]) -> list[int]:
    """The ids from a root down to the best-scoring node (empty when none has a score)."""
    by_id = {node.id: node for node in nodes}
    done = [node for node in by_id.values() if node.status is NodeStatus.DONE]
    if not done:
        return []
    node: Node | None = max(done, key=lambda node: (node.r2, -node.id))
    path: list[int] = []
    while node is not None and node.id not in path:
        path.append(node.id)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    return path[::-1]


@dataclass(frozen=True)
class RunFigures:
    """What the report shows of one run, read from its journal."""

    name: str
    agent: str
    nodes: tuple[Node, ...]
    curve: Curve
    stats: RunStats
    ab: dict[int, Comparison]


def read_run(run_dir: Path) -> RunFigures:
    """One run's figures; JournalError when it is no readable proctor run."""
    with Journal.open_for_client(run_dir) as journal:
        created = journal.run_events(RunEvent.RUN_CREATED)
        settings = created[0].payload.get("settings", {}) if created else {}
        name = str(settings.get("name") or run_dir.name)
        agent = str(settings.get("agent") or "agent unknown")
        return RunFigures(name, agent, tuple(nodes_from_journal(journal)),
                          curve(journal, name, agent), run_stats(journal),
                          ab_results(journal))


def write_report(run_dir: Path, against: Sequence[Path] = ()) -> Path:
    """Write `report/` of the run in `run_dir`, its curves overlaid with those of the runs
    in `against`; returns the path of report.md. Raises plots.AnalyticsMissing without
    matplotlib, JournalError for a run that cannot be read."""
    plots.require()
    runs = [read_run(run_dir), *(read_run(folder) for folder in against)]
    main = runs[0]
    folder = RunPaths(run_dir).report_dir
    folder.mkdir(parents=True, exist_ok=True)
    plots.draw_curves([run.curve for run in runs], folder / CURVES_PNG)
    plots.draw_tree(tree_points(main.nodes), best_path(main.nodes), folder / TREE_PNG,
                    title=f"{main.name}: the tree coloured by R²")
    drawn = {CURVES_PNG, TREE_PNG}
    if main.stats.kinds:
        plots.draw_kinds(main.stats.kinds, folder / KINDS_PNG)
        drawn.add(KINDS_PNG)
    if main.ab:
        plots.draw_ab(main.ab, folder / AB_PNG)
        drawn.add(AB_PNG)
    for stale in {KINDS_PNG, AB_PNG} - drawn:  # a picture of data no longer shown
        (folder / stale).unlink(missing_ok=True)
    curves = {"curves": [asdict(run.curve) for run in runs]}  # to re-plot them elsewhere
    write_atomic(folder / CURVES_JSON, json.dumps(curves, indent=1), durable=False)
    path = folder / REPORT_FILE
    write_atomic(path, report_markdown(runs), durable=False)
    return path


def write_tree_picture(nodes: Sequence[Node], path: Path) -> bool:
    """Draw the tree of `nodes` to `path` (a PNG); False, having drawn nothing, when
    matplotlib is not installed (the picture is optional: a run never needs it). The engine
    calls it in a child process of its own (`engine.tree_picture`), never on its event loop."""
    try:
        plots.require()
    except plots.AnalyticsMissing:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    plots.draw_tree(tree_points(nodes), best_path(nodes), path,
                    title=f"the tree after iteration {max((n.id for n in nodes), default=0)}")
    return True


# -- report.md ------------------------------------------------------------------------------


def report_markdown(runs: Sequence[RunFigures]) -> str:
    """The report's text: figures per run, then the main run's tree, kinds and A/B tests."""
    main = runs[0]
    names = ", ".join(f"{_cell(run.name)} ({_cell(run.agent)})" for run in runs)
    lines = [f"# Report: run {_cell(main.name)}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} from the journals of {names}.", ""]
    lines += _curves_section(runs) + _stats_section(runs) + _tree_section(main)
    lines += _kinds_section(main) + _ab_section(main)
    return "\n".join(lines) + "\n"


def _curves_section(runs: Sequence[RunFigures]) -> list[str]:
    header = " | ".join(f"best R² at {n}" for n in MILESTONES)
    lines = ["## Best R² so far", "",
             f"![best-so-far R² per iteration and per hour of training]({CURVES_PNG})", "",
             f"(The curves' points are in [{CURVES_JSON}]({CURVES_JSON}).)", "",
             f"| run | agent | iterations | best R² | {header} | training time |",
             "|---|---|---:|---:|" + "---:|" * len(MILESTONES) + "---:|"]
    for run in runs:
        at = " | ".join(_number(run.curve.best_at(n)) for n in MILESTONES)
        lines.append(f"| {_cell(run.name)} | {_cell(run.agent)} | {run.curve.last_iteration} "
                     f"| {_number(run.stats.best_r2)} | {at} "
                     f"| {_duration(run.stats.training_hours)} |")
    return [*lines, "", "A milestone shows – where the run did not reach it.", ""]


def _stats_section(runs: Sequence[RunFigures]) -> list[str]:
    rows: list[tuple[str, list[str]]] = [
        ("nodes", [str(r.stats.nodes) for r in runs]),
        ("config changes", [str(r.stats.config_changes) for r in runs]),
        ("code changes", [str(r.stats.code_changes) for r in runs]),
        ("code changes that ran cleanly", [str(r.stats.code_ran_cleanly) for r in runs]),
        ("code changes that beat their parent", [str(r.stats.code_beat_parent) for r in runs]),
        ("code-change success rate", [_percent(r.stats.code_success_rate) for r in runs]),
        ("code changes A/B-tested", [str(r.stats.code_ab_tested) for r in runs]),
        ("code changes an A/B test confirmed", [str(r.stats.code_confirmed) for r in runs]),
        ("mean R² gain of code changes", [_signed(r.stats.mean_gain_code) for r in runs]),
        ("mean R² gain of config changes", [_signed(r.stats.mean_gain_config) for r in runs]),
        ("R² gained over the first node", [_signed(r.stats.r2_gained) for r in runs]),
        ("points of R² per training hour",
         [_number(r.stats.r2_points_per_hour, 1) for r in runs]),
        ("agent cost (USD)", [f"{r.stats.agent_cost_usd:.2f}" for r in runs]),
        ("USD per point of R²", [_number(r.stats.usd_per_r2_point, 3) for r in runs]),
    ]
    lines = ["## What the changes did", "",
             "| figure | " + " | ".join(_cell(run.name) for run in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    return [*lines, "", "A point of R² is 0.01; – where the run has no data for a figure.", ""]


def _tree_section(run: RunFigures) -> list[str]:
    path = best_path(run.nodes)
    by_id = {node.id: node for node in run.nodes}
    lines = [f"## The tree of {_cell(run.name)}", "",
             f"![the tree coloured by R², code changes marked, the best path drawn]({TREE_PNG})",
             ""]
    if path:
        steps = " → ".join(str(node_id) for node_id in path)
        lines.append(f"Best path: {steps} (R² {by_id[path[-1]].r2:.4f}). Diamonds are code "
                     "changes, circles config changes, crosses runs without a score.")
    else:
        lines.append("No node has a score yet.")
    return [*lines, ""]


def _kinds_section(run: RunFigures) -> list[str]:
    lines = [f"## R² gain by kind of change ({_cell(run.name)})", ""]
    if not run.stats.kinds:
        return [*lines, "No change has a measured gain over a finished parent yet.", ""]
    lines += [f"![count × mean R² gain by kind of change]({KINDS_PNG})", "",
              "| kind of change | count | mean R² gain | count × mean |", "|---|---:|---:|---:|"]
    lines += [f"| {_cell(kind.kind)} | {kind.count} | {kind.mean_gain:+.4f} "
              f"| {kind.total_gain:+.4f} |" for kind in run.stats.kinds]
    return [*lines, ""]


def _ab_section(run: RunFigures) -> list[str]:
    lines = [f"## A/B tests ({_cell(run.name)})", ""]
    if not run.ab:
        return [*lines, f"No A/B test in this run yet (`proctor ab {_cell(run.name)} NODE` "
                "tests a code change against its parent's code).", ""]
    lines += [f"![mean R² gain of each tested node with its 95% interval]({AB_PNG})", "",
              "| node | seeds | mean ΔR² | 95% interval | noise floor | verdict |",
              "|---:|---:|---:|---|---:|---|"]
    lines += [f"| {node} | {len(result.seeds)} | {result.mean_delta:+.4f} "
              f"| [{result.low:+.4f}, {result.high:+.4f}] | {result.noise:.4f} "
              f"| {result.verdict} |" for node, result in sorted(run.ab.items())]
    return [*lines, ""]


def _cell(text: str) -> str:
    """Text from a journal (an agent's words among it) as one table cell."""
    return strip_control(text).replace("\n", " ").replace("|", "\\|")


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _duration(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"
