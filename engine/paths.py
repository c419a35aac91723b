"""Where everything of a project's runs lives: the one place that builds those paths.

    <project>/log/<run>/            RunPaths(run_dir)
        journal.sqlite, engine.lock, engine.out, vcs.yaml, config.yaml
        analysis.md, memory.md, reasoning.log, ucb_scores.txt
        configs/iter_NNN.yaml, protocols/block_NNN.md, memory/block_NNN.md,
        memory/tree_block_NNN.png (the tree at each block's end)
        nodes/NNN/{training.log, metrics.json, change.diff, config.diff}
        workspace/ (the humans' view of the running node), sandbox/ (the runs' folders)
        report/report.md and its PNG plots (`proctor report`)
    <project>/log/cache/data/       simulated datasets, shared by every run
    <project>/log/train/<time>/     `proctor train` results
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOG_DIR = "log"
JOURNAL_FILE = "journal.sqlite"
LOCK_FILE = "engine.lock"
ENGINE_OUT_FILE = "engine.out"
VCS_FILE = "vcs.yaml"
CONFIG_FILE = "config.yaml"
ANALYSIS_FILE = "analysis.md"
MEMORY_FILE = "memory.md"
REASONING_FILE = "reasoning.log"
SCORES_FILE = "ucb_scores.txt"
TRAINING_LOG = "training.log"


def numbered(number: int) -> str:
    """Zero-padded to three digits (`iter_007`, `nodes/012`); wider numbers stay whole."""
    return f"{number:03d}"


def log_root(project_root: Path) -> Path:
    return project_root / LOG_DIR


def run_dir_of(project_root: Path, name: str) -> Path:
    return log_root(project_root) / name


def data_cache(project_root: Path) -> Path:
    return log_root(project_root) / "cache" / "data"


def train_dir(project_root: Path, stamp: str) -> Path:
    return log_root(project_root) / "train" / stamp


@dataclass(frozen=True)
class RunPaths:
    """The files and folders of one run folder (nothing is created here)."""

    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def journal(self) -> Path:
        return self.run_dir / JOURNAL_FILE

    @property
    def lock(self) -> Path:
        return self.run_dir / LOCK_FILE

    @property
    def engine_out(self) -> Path:
        return self.run_dir / ENGINE_OUT_FILE

    @property
    def vcs(self) -> Path:
        return self.run_dir / VCS_FILE

    @property
    def config(self) -> Path:
        return self.run_dir / CONFIG_FILE

    @property
    def analysis(self) -> Path:
        return self.run_dir / ANALYSIS_FILE

    @property
    def memory(self) -> Path:
        return self.run_dir / MEMORY_FILE

    @property
    def reasoning(self) -> Path:
        return self.run_dir / REASONING_FILE

    @property
    def scores(self) -> Path:
        return self.run_dir / SCORES_FILE

    @property
    def configs_dir(self) -> Path:
        return self.run_dir / "configs"

    @property
    def protocols_dir(self) -> Path:
        return self.run_dir / "protocols"

    @property
    def memory_snapshots_dir(self) -> Path:
        return self.run_dir / "memory"

    @property
    def nodes_dir(self) -> Path:
        return self.run_dir / "nodes"

    @property
    def workspace(self) -> Path:
        return self.run_dir / "workspace"

    @property
    def sandbox(self) -> Path:
        return self.run_dir / "sandbox"

    @property
    def report_dir(self) -> Path:
        return self.run_dir / "report"

    def config_snapshot(self, iteration: int) -> Path:
        return self.configs_dir / f"iter_{numbered(iteration)}.yaml"

    def protocol_snapshot(self, block: int) -> Path:
        return self.protocols_dir / f"block_{numbered(block)}.md"

    def memory_snapshot(self, block: int) -> Path:
        return self.memory_snapshots_dir / f"block_{numbered(block)}.md"

    def tree_picture(self, block: int) -> Path:
        """The tree as it stood at the end of `block` (a PNG)."""
        return self.memory_snapshots_dir / f"tree_block_{numbered(block)}.png"

    def node_dir(self, node_id: int) -> Path:
        return self.nodes_dir / numbered(node_id)

    def training_log(self, node_id: int) -> Path:
        return self.node_dir(node_id) / TRAINING_LOG

    def metrics(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "metrics.json"

    def change_diff(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "change.diff"

    def config_diff(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "config.diff"
