"""Node code and the workspaces runs execute from.

At run creation the experiment's package (e.g. `models/`) is snapshotted from the user's
checkout into `log/<run>/base/`; the trusted files never change after that. A node's code is
its parent's plus its own edits; code-changing nodes keep their full editable files in
`nodes/NNN/code/`. A run executes from a workspace rebuilt from scratch for its node, so
branching back to an old node restores its code as well as its config."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.atomic import write_atomic
from engine.edits import read_code, safe_target

_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class CodeStore:
    """Where each node's code lives, and how a workspace for it is built."""

    def __init__(self, run_dir: Path, package: str, editable: Iterable[str]):
        self.run_dir = run_dir
        self.package = package
        self.editable = list(editable)
        self.base_dir = run_dir / "base"

    def snapshot_base(self, project_root: Path) -> None:
        """Copy the experiment package out of the user's checkout (once, at run creation)."""
        if self.base_dir.exists():
            return
        read_code(project_root, self.editable)  # refuses symlinked editable files up front
        staging = self.run_dir / ".base.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(project_root / self.package, staging / self.package, ignore=_IGNORED,
                        symlinks=True)
        for relative in self.editable:
            copied = staging / relative
            if copied.is_symlink() or not copied.is_file():
                shutil.rmtree(staging, ignore_errors=True)
                raise FileNotFoundError(f"editable file '{relative}' is not in {project_root}")
        staging.rename(self.base_dir)

    def code_dir(self, node_id: int) -> Path:
        return self.run_dir / "nodes" / f"{node_id:03d}" / "code"

    def store(self, node_id: int, files: dict[str, str]) -> None:
        """Keep the full editable files of a code-changing node."""
        for relative in self.editable:
            target = self.code_dir(node_id) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, files[relative])

    def files_at(
        self, node_id: int | None, code_owner: Callable[[int | None], int | None]
    ) -> dict[str, str]:
        """The editable files as they are at `node_id` (None: the base).

        `code_owner` maps a node to the nearest node in its lineage that changed code."""
        owner = code_owner(node_id) if node_id is not None else None
        root = self.base_dir if owner is None else self.code_dir(owner)
        return read_code(root, self.editable)

    def materialise(self, files: dict[str, str], destination: Path) -> Path:
        """A fresh workspace: the base package with the node's editable files on top."""
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(self.base_dir, destination, ignore=_IGNORED, symlinks=True)
        for relative, text in files.items():
            target = safe_target(destination, relative)
            target.write_text(text, encoding="utf-8")
        return destination
