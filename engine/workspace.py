"""Node code and the workspaces runs execute from.

Every node's code is a git commit (see `engine.vcs`): the base commit for the root, the
node's own commit when it changed code, its parent's otherwise. A run executes from a
workspace rebuilt from scratch at its node's commit (the experiment package plus the
editable files, read straight from git blobs: no checkout, no filters, no `__pycache__`
left from earlier runs), so branching back to an old node restores its code as well as
its config."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from engine.edits import safe_target, write_files
from engine.paths import VCS_FILE, RunPaths
from engine.vcs import MODE_EXECUTABLE, MODE_SYMLINK, Entry, Lineage, RepoInfo, VcsError


class CodeStore:
    """What each commit's editable files say, and how a workspace for a commit is built.

    Readers in another process (an attached viewer) build one from the run folder alone:
    the lineage comes from its `vcs.yaml`."""

    def __init__(self, run_dir: Path, package: str, editable: Iterable[str],
                 lineage: Lineage | None = None):
        self.run_dir = run_dir
        self.package = package
        self.editable = list(editable)
        self._lineage = lineage

    @property
    def lineage(self) -> Lineage:
        if self._lineage is None:
            try:
                record = yaml.safe_load(RunPaths(self.run_dir).vcs.read_text(encoding="utf-8"))
                info = RepoInfo.from_dict(record)
            except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
                raise VcsError(f"{self.run_dir} has no readable {VCS_FILE}: {exc}") from None
            self._lineage = Lineage(info, self.run_dir.name, self.run_dir)
        return self._lineage

    def files_at_commit(self, commit: str) -> dict[str, str]:
        """The editable files as they are at `commit`."""
        return self.lineage.read_texts(commit, self.editable)

    def files_at(
        self, node_id: int | None, code_owner: Callable[[int | None], int | None] | None = None
    ) -> dict[str, str]:
        """The editable files at a node (None: the base), found through the node refs.

        `code_owner` maps a node to the nearest node of its lineage that changed code (only
        those have a ref); prefer `files_at_commit(node.commit)` where the node is known."""
        owner = code_owner(node_id) if code_owner is not None and node_id is not None \
            else node_id
        lineage = self.lineage
        commit = lineage.base if owner is None else lineage.resolve(lineage.ref("nodes", owner))
        if commit is None:
            raise VcsError(f"node {owner} has no commit in {lineage.info.path}")
        return self.files_at_commit(commit)

    def _workspace_entries(self, commit: str) -> list[Entry]:
        entries = dict(self.lineage.listing(commit, self.package))
        entries.update(self.lineage.file_entries(commit, self.editable))
        return list(entries.values())

    def materialise(self, commit: str, destination: Path) -> Path:
        """Empty `destination` (kept, so a watcher on it survives) and write the package and
        the editable files of `commit` into it. Edits live in git; this is the one place they
        become files (written like any edit: atomically, never through a symlink)."""
        entries = self._workspace_entries(commit)
        contents = self.lineage.blobs(entry.sha for entry in entries)
        destination.mkdir(parents=True, exist_ok=True)
        clear_folder(destination)
        editable = set(self.editable)
        for entry in entries:
            if entry.path in editable:
                continue
            target = safe_target(destination, entry.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = contents[entry.sha]
            if entry.mode == MODE_SYMLINK:
                os.symlink(data.decode("utf-8"), target)
                continue
            target.write_bytes(data)
            if entry.mode == MODE_EXECUTABLE:
                target.chmod(0o755)
        texts = {entry.path: contents[entry.sha].decode("utf-8") for entry in entries
                 if entry.path in editable}
        # rebuilt before every run: atomic, but no fsync
        write_files(destination, texts, durable=False)
        return destination


def clear_folder(folder: Path) -> None:
    """Remove everything inside `folder` without following symlinks."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
