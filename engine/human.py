"""Nodes that humans ask for: a revert, an adopted manual edit, a checkout's pre-existing
changes. Each is queued durably in the journal and takes the next iteration number; none is
reviewed (a human made it) and none is repaired."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine import events as ev
from engine.edits import EditError, validate_files
from engine.logs import strip_control
from engine.proposal import CodeChange, Proposal, Strategy
from engine.state import RunState
from engine.tree import Tree
from engine.vcs import Identity, VcsError, merge_texts, user_identity
from engine.watch import CHECKOUT, WORKSPACE, EditWatcher, ManualEdit, ManualEdits

REVERT, MANUAL_EDIT, PRE_EXISTING = "revert", "manual-edit", "pre-existing"


@dataclass(frozen=True)
class HumanChange:
    """A node a human asked for: a revert, an adopted manual edit, pre-existing changes."""

    request_id: str
    kind: str  # REVERT | MANUAL_EDIT | PRE_EXISTING
    parent_id: int | None
    files: dict[str, str]  # whole texts of the editable files that change
    config: dict[str, Any] | None  # None: the parent's config
    title: str
    author: dict[str, str] = field(default_factory=dict)  # name, email
    reverted_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HumanChange:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def proposal(self) -> Proposal:
        """How the change reads in the logs: a proposal by a human."""
        revert = self.kind == REVERT
        label = f"[revert] node {self.reverted_id}" if revert else \
            f"[manual] {', '.join(sorted(self.files)) or 'no code'}"
        first = min(self.files, default="")
        return Proposal(
            parent_id=self.parent_id,
            strategy=Strategy.REVERT if revert else Strategy.MANUAL,
            code_change=CodeChange(file=first, change=self.title) if first else None,
            mutation=label, parent_rule="chosen by a human", analysis="",
        )


class HumanRequests:
    """The queue of humans' nodes, and the checks that turn a request into one."""

    def __init__(self, state: RunState, tree: Tree, manual: ManualEdits, repo_path: Path,
                 editable: list[str], files_at: Callable[[int | None], dict[str, str]],
                 parent_config: Callable[[Any], dict[str, Any]],
                 publish: Callable[[ev.Event], None]):
        self.state = state
        self.tree = tree
        self.manual = manual
        self.repo_path = repo_path
        self.editable = editable
        self.files_at = files_at
        self.parent_config = parent_config
        self.publish = publish
        self._identity: Identity | None = None

    def identity(self) -> Identity:
        """The human's name and email from git config (asked once)."""
        if self._identity is None:
            try:
                self._identity = user_identity(self.repo_path)
            except VcsError:
                self._identity = Identity("human", "human@localhost")
        return self._identity

    def signature(self) -> str:
        identity = self.identity()
        return strip_control(f"{identity.name} <{identity.email}>")

    def watch(self, places: dict[str, Path],
              on_edit: Callable[[str], None]) -> EditWatcher:
        """Start watching the editable files in `places` (checkout, workspace); each human
        edit is published, then `on_edit(path)` runs. Edits made while no engine watched
        and edits still undecided from before are reported first."""
        def changed(where: str, path: str, text: str) -> None:
            edit = self.manual.observe(where, path, text)
            if edit is not None:
                self.publish(ev.ManualEditDetected(path, edit.diff, where))
                on_edit(path)

        watcher = EditWatcher(places, self.editable, changed,
                              lambda message: self.publish(ev.EngineError(message)))
        for edit in self.manual.pending():
            self.publish(ev.ManualEditDetected(edit.path, edit.diff, edit.where))
        watcher.check_now(CHECKOUT)
        watcher.start()
        return watcher

    def queue(self) -> list[HumanChange]:
        return [HumanChange.from_dict(item) for item in self.state.human_queue]

    def _enqueue(self, change: HumanChange) -> None:
        self.state.human_queue = [*self.state.human_queue, change.to_dict()]

    def dequeue(self, request_id: str) -> None:
        self.state.human_queue = [item for item in self.state.human_queue
                                  if item.get("request_id") != request_id]

    def _refuse(self, message: str) -> None:
        self.publish(ev.EngineError(message))

    def revert(self, node_id: int) -> None:
        """Queue a node with the code and config of `node_id`'s parent, as a child of it."""
        if node_id not in self.tree:
            return self._refuse(f"cannot revert node {node_id}: no such node")
        node = self.tree.get(node_id)
        if not node.finished:
            return self._refuse(f"cannot revert node {node_id}: it is {node.status}; "
                                "only finished nodes can be reverted")
        try:
            restored = self.files_at(node.parent_id)
            current = self.files_at(node_id)
        except VcsError as exc:
            return self._refuse(f"cannot revert node {node_id}: {exc}")
        files = {path: text for path, text in restored.items() if current[path] != text}
        config = self.parent_config(node)
        if not files and config == node.config:
            return self._refuse(f"node {node_id} changed nothing to revert")
        origin = "the base" if node.parent_id is None else f"node {node.parent_id}"
        self._enqueue(HumanChange(
            request_id=f"revert-{node_id}-{time.time_ns()}", kind=REVERT, parent_id=node_id,
            files=files, config=config, title=f"Revert node {node_id} (back to {origin}'s code)",
            author=asdict(self.identity()), reverted_id=node_id))
        return None

    def adopt(self, path: str | None) -> None:
        """Queue the pending manual edits (of `path`, or all) as the next node's code."""
        edits = self.manual.pending(path)
        if not edits:
            return self._refuse(no_manual_edit(path))
        parent_id = self._adoption_parent(edits)
        try:
            parent_files = self.files_at(parent_id)
            files = {}
            for edit in edits:
                merged = merge_edit(edit, parent_files[edit.path])
                if merged is None:
                    where = "the base" if parent_id is None else f"node {parent_id}"
                    return self._refuse(
                        f"cannot adopt the manual edit of {edit.path}: it conflicts with "
                        f"{where}'s version; edit that version instead")
                files[edit.path] = merged
            files = validate_files(files, parent_files, self.editable)
        except (EditError, VcsError) as exc:
            return self._refuse(f"cannot adopt the manual edit: {exc}")
        self.manual.resolve(path)
        names = ", ".join(sorted({edit.path for edit in edits}))
        self._enqueue(HumanChange(
            request_id=f"manual-{time.time_ns()}", kind=MANUAL_EDIT, parent_id=parent_id,
            files=files, config=None, title=f"manual edit ({names})",
            author=asdict(self.identity())))
        for edit in edits:
            self.publish(ev.ManualEditResolved(edit.path, adopted=True))
        return None

    def ignore(self, path: str | None) -> None:
        ignored = self.manual.resolve(path)
        if not ignored:
            self._refuse(no_manual_edit(path))
        for edit in ignored:
            self.publish(ev.ManualEditResolved(edit.path, adopted=False))

    def _adoption_parent(self, edits: list[ManualEdit]) -> int | None:
        """The node an adopted edit builds on: the workspace's node when every edit was made
        there and it finished; else the best node (the root before any)."""
        nodes = {edit.node_id for edit in edits}
        if all(edit.where == WORKSPACE for edit in edits) and len(nodes) == 1:
            node_id = nodes.pop()
            if node_id is not None and node_id in self.tree and self.tree.get(node_id).finished:
                return node_id
        best = self.tree.best_node()
        return best.id if best is not None else None


def no_manual_edit(path: str | None) -> str:
    return f"no pending manual edit of {path}" if path else "no pending manual edit"


def merge_edit(edit: ManualEdit, current: str) -> str | None:
    """The human's change carried onto `current` (None: it conflicts)."""
    if current == edit.before:
        return edit.after
    return merge_texts(edit.before, current, edit.after)
