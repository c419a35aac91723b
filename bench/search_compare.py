"""The offline agent against Optuna's TPE and random search, on the same budget.

Every (method, seed) is one proctor run of the default experiment (`configs/`, same search
space, runner, evaluator and timeouts) with `exploration.seed` set to the seed and
`approval: auto`: `proctor run --agent heuristic` for the offline agent, `proctor baseline
--sampler tpe|random` for the baselines, and, when asked for and a key is set, `proctor run
--agent anthropic` for Claude (its cost in USD is in the table: is the LLM worth it?). The
runs live in a project of their own (`--root`, default `log/bench-search/`); a finished run
is reused and an interrupted one resumed, so the benchmark can be stopped and started again
and grows seed by seed.

Prints, per method, the median over seeds of the best R² after 12 and 24 iterations, the
training time the 24 took, the held-out-frame R² of the best node, the best R² within a
common training budget (the shortest total any run spent), and the time to reach R² 0.95;
then the ratios against TPE. Writes `summary.md` and `best_so_far.png` (the report's plot
of every run's best-so-far curve, by iteration and by hour of training) into the root.

usage: python bench/search_compare.py [--methods heuristic,tpe,random] [--seeds 0,1,2]
                                      [--iterations 24] [--budget 24] [--root DIR]
                                      [--report-only]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.journal import Journal  # noqa: E402
from engine.plots import draw_curves  # noqa: E402
from engine.report import Curve, read_run  # noqa: E402
from engine.tree import Node  # noqa: E402

CONFIG = REPO / "configs" / "multimaterial_1_discs_3types.yaml"
METHODS = ("heuristic", "tpe", "random")
AGENTS = {"heuristic": "heuristic", "anthropic": "anthropic"}  # the rest are baselines
TARGET_R2 = 0.95


def prepare_project(root: Path) -> None:
    """A project of its own (its own git repository), sharing this checkout's data cache."""
    if (root / ".git").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("models", "instructions"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cache = REPO / "log" / "cache"
    if cache.is_dir():
        shutil.copytree(cache, root / "log" / "cache")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "models", "instructions"], check=True)
    subprocess.run(["git", "-C", str(root), "-c", "user.name=bench", "-c",
                    "user.email=bench@localhost", "commit", "-qm", "the default experiment"],
                   check=True)


def config_for(root: Path, seed: int, budget: int) -> Path:
    """The default config with the seed and the whole budget of iterations (what a
    cost-aware agent plans for), however many of them this invocation runs."""
    config = yaml.safe_load(CONFIG.read_text())
    config["exploration"].update(seed=seed, approval="auto", iterations=budget)
    path = root / "configs" / f"seed{seed}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def completed(run_dir: Path) -> int:
    with Journal.open_for_client(run_dir) as journal:
        return len(journal.completed_iterations())


def ensure_run(root: Path, method: str, seed: int, iterations: int, budget: int) -> None:
    """Run (or resume) one (method, seed) until it has `iterations` iterations."""
    name = run_name(method, seed)
    run_dir = root / "log" / name
    proctor = [sys.executable, "-c", "from tui.cli import main; raise SystemExit(main())"]
    if run_dir.exists():
        if completed(run_dir) >= iterations:
            return
        command = [*proctor, "resume", name, "--iterations", str(iterations)]
    elif method in AGENTS:
        command = [*proctor, "run", str(config_for(root, seed, budget)), "--headless",
                   "--agent", AGENTS[method], "--approve", "auto", "--name", name,
                   "--iterations", str(iterations)]
    else:
        command = [*proctor, "baseline", str(config_for(root, seed, budget)),
                   "--headless", "--sampler", method, "--trials", str(iterations),
                   "--name", name]
    print(f"{name}: {' '.join(command[3:])}", flush=True)
    started = time.monotonic()
    with open(root / f"{name}.out", "a") as out:
        code = subprocess.run(command, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                              env=_pythonpath()).returncode
    print(f"{name}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)


def _pythonpath() -> dict[str, str]:
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env
                                     else "")
    return env


def up_to(curve: Curve, iteration: int) -> Curve:
    """`curve` as it stood after `iteration` iterations (a run may have gone further)."""
    kept = [index for index, x in enumerate(curve.iterations) if x <= iteration]
    return replace(curve, iterations=tuple(curve.iterations[i] for i in kept),
                   hours=tuple(curve.hours[i] for i in kept),
                   best=tuple(curve.best[i] for i in kept),
                   last_iteration=min(curve.last_iteration, iteration))


def best_within(curve: Curve, hours: float) -> float | None:
    """Best R² among the iterations whose training finished within `hours` of training."""
    reached = [best for spent, best in zip(curve.hours, curve.best, strict=True)
               if spent <= hours]
    return reached[-1] if reached else None


def heldout_of_best(nodes: Sequence[Node], iteration: int) -> float | None:
    """The held-out-frame R² of the best node (by R²) of the first `iteration` iterations:
    whether the fit the search chose also holds between the frames it was trained on."""
    scored = [node for node in nodes if node.id <= iteration and node.finished
              and "final_r2" in node.metrics]
    best = max(scored, key=lambda node: (node.r2, -node.id), default=None)
    return None if best is None else best.metrics.get("heldout_r2")


def hours_to(curve: Curve, target: float) -> float | None:
    return next((spent for spent, best in zip(curve.hours, curve.best, strict=True)
                 if best >= target), None)


def _median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _cell(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summarise(root: Path, methods: Sequence[str], seeds: Sequence[int],
              iterations: int) -> str:
    curves: dict[str, list[Curve]] = {}
    nodes: dict[str, list[Sequence[Node]]] = {}
    spent: dict[str, float] = {}
    for method in methods:
        for seed in seeds:
            run_dir = root / "log" / run_name(method, seed)
            if run_dir.exists():
                figures = read_run(run_dir)
                curves.setdefault(method, []).append(up_to(figures.curve, iterations))
                nodes.setdefault(method, []).append(figures.nodes)
                spent[method] = spent.get(method, 0.0) + figures.stats.agent_cost_usd
    if not curves:
        return "no runs yet"
    finished = [curve for runs in curves.values() for curve in runs
                if curve.last_iteration >= iterations and curve.hours]
    budget = min((curve.hours[-1] for curve in finished), default=None)
    rows = [f"| method | runs | best R² @12 | best R² @24 | training h for {iterations} | "
            f"held-out R² of the best @{iterations} | "
            f"best R² within {_cell(budget and budget * 60, 0)} min | h to R² {TARGET_R2} | "
            "agent USD |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    medians: dict[str, dict[str, float | None]] = {}
    for method, runs in curves.items():
        figures = {
            "at12": _median([curve.best_at(12) for curve in runs]),
            "at24": _median([curve.best_at(24) for curve in runs]),
            "hours": _median([curve.hours[-1] if curve.hours else None for curve in runs
                              if curve.last_iteration >= iterations]),
            "budget": None if budget is None else _median([best_within(c, budget)
                                                           for c in runs]),
            "to_target": _median([hours_to(curve, TARGET_R2) for curve in runs]),
            "heldout": _median([heldout_of_best(run_nodes, iterations)
                                for run_nodes, curve in zip(nodes[method], runs, strict=True)
                                if curve.last_iteration >= iterations]),
        }
        medians[method] = figures
        per_seed = ", ".join(_cell(curve.best_at(iterations), 3) for curve in runs)
        rows.append(f"| {method} | {len(runs)} ({per_seed}) | {_cell(figures['at12'])} | "
                    f"{_cell(figures['at24'])} | {_cell(figures['hours'], 3)} | "
                    f"{_cell(figures['heldout'])} | "
                    f"{_cell(figures['budget'])} | {_cell(figures['to_target'], 3)} | "
                    f"{spent.get(method, 0.0):.2f} |")
    lines = [f"Medians over seeds; `runs` lists each seed's best R² after {iterations} "
             "iterations.", "",
             *rows]
    if "tpe" in medians:
        lines += ["", "Ratios against TPE (median R² gap to 1.0, lower is better: "
                  "TPE's gap / method's gap):"]
        for method, figures in medians.items():
            if method == "tpe":
                continue
            for key, label in (("at12", "@12"), ("at24", "@24"), ("budget", "same budget")):
                ours, theirs = figures[key], medians["tpe"][key]
                if ours is not None and theirs is not None and ours < 1:
                    lines.append(f"- {method} {label}: {(1 - theirs) / (1 - ours):.2f}×")
    draw_curves([curve for runs in curves.values() for curve in runs], root / "best_so_far.png")
    lines += ["", "![best R² so far, per iteration and per training time](best_so_far.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=24,
                        help="run (or resume) every run to this many iterations")
    parser.add_argument("--budget", type=int, default=24,
                        help="the iterations each run's config plans for (exploration.iterations)")
    parser.add_argument("--root", type=Path, default=REPO / "log" / "bench-search")
    parser.add_argument("--report-only", action="store_true", help="summarise the runs there")
    args = parser.parse_args(argv)
    methods = [method for method in args.methods.split(",") if method]
    unknown = set(methods) - set(METHODS) - set(AGENTS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}: {', '.join(METHODS)}, anthropic")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, not {args.seeds!r}")
    root = args.root.resolve()
    if not args.report_only:
        prepare_project(root)
        for seed in seeds:  # seed by seed, so an early stop leaves whole comparisons
            for method in methods:
                ensure_run(root, method, seed, args.iterations, max(args.budget, args.iterations))
    summary = summarise(root, methods, seeds, args.iterations)
    (root / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
