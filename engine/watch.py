"""Manual edits: a human changing a whitelisted file in the checkout or the active workspace.

`EditWatcher` runs `watchfiles.awatch` (one per place, each with a stop event) as asyncio
tasks in the engine's loop; the notify backend waits in a thread, so the loop is never
slowed. A change is judged by content, not by the event: a file whose text equals what
proctor expects there (e.g. its own workspace writes) is no edit. `ManualEdits` keeps the
expected texts and the pending edits; the pending edits and the checkout's last seen texts
live in the journal's state, so an attached viewer sees them and a restart keeps them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import watchfiles

from engine.edits import EditError, read_code, unified_diff
from engine.state import CHECKOUT_SEEN, MANUAL_EDITS

CHECKOUT, WORKSPACE = "checkout", "workspace"
DEBOUNCE_MS = 50
STEP_MS = 25
STOP_WAIT_S = 2.0


class StateStore(Protocol):
    def state(self, key: str, default: Any = None) -> Any: ...

    def set_state(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True)
class ManualEdit:
    """A human's change to one editable file, against the text proctor knew there."""

    where: str  # CHECKOUT or WORKSPACE
    path: str
    before: str
    after: str
    node_id: int | None  # the node whose code `before` is; None: the checkout

    @property
    def diff(self) -> str:
        return unified_diff({self.path: self.before}, {self.path: self.after})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ManualEdit:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


class ManualEdits:
    """Expected texts per place, and the human edits found against them."""

    def __init__(self, store: StateStore, editable: Iterable[str]):
        self.store = store
        self.editable = list(editable)
        self.expected: dict[tuple[str, str], str] = {
            (CHECKOUT, path): text for path, text in store.state(CHECKOUT_SEEN, {}).items()}
        self.workspace_node: int | None = None

    def pending(self, path: str | None = None) -> list[ManualEdit]:
        edits = [ManualEdit.from_dict(item) for item in self.store.state(MANUAL_EDITS, [])]
        return [edit for edit in edits if path is None or edit.path == path]

    def _save(self, edits: list[ManualEdit]) -> None:
        self.store.set_state(MANUAL_EDITS, [edit.to_dict() for edit in edits] or None)

    def remember_checkout(self, texts: Mapping[str, str]) -> None:
        """The checkout's texts as proctor has seen them (at run creation)."""
        self.store.set_state(CHECKOUT_SEEN, dict(texts))
        self.expected.update({(CHECKOUT, path): text for path, text in texts.items()})

    def expect_workspace(self, node_id: int, texts: Mapping[str, str]) -> None:
        """The workspace now holds `node_id`'s code (it was just rebuilt)."""
        self.workspace_node = node_id
        self.expected.update({(WORKSPACE, path): text for path, text in texts.items()})

    def observe(self, where: str, path: str, text: str) -> ManualEdit | None:
        """A file's current text; the pending edit it makes (new or updated), else None."""
        expected = self.expected.get((where, path))
        if expected is None:
            return None
        edits = self.pending()
        current = next((e for e in edits if (e.where, e.path) == (where, path)), None)
        if current is not None and current.after == text:
            return None
        rest = [e for e in edits if (e.where, e.path) != (where, path)]
        if text == expected:
            if current is not None:
                self._save(rest)  # the human undid it
            return None
        node = self.workspace_node if where == WORKSPACE else None
        edit = ManualEdit(where, path, expected, text, node)
        self._save([*rest, edit])
        return edit

    def resolve(self, path: str | None = None) -> list[ManualEdit]:
        """Take the pending edits (of `path`, or all): the human's text becomes the expected
        one, so the same edit is not reported again."""
        edits = self.pending()
        taken = [edit for edit in edits if path is None or edit.path == path]
        self._save([edit for edit in edits if edit not in taken])
        for edit in taken:
            self.expected[(edit.where, edit.path)] = edit.after
        seen = {path: text for (where, path), text in self.expected.items() if where == CHECKOUT}
        self.store.set_state(CHECKOUT_SEEN, seen)
        return taken


class EditWatcher:
    """Watches the editable files below some roots; calls `on_change(where, path, text)`
    in the event loop for each that changed (the text read without following symlinks)."""

    def __init__(self, roots: Mapping[str, Path], editable: Iterable[str],
                 on_change: Callable[[str, str, str], None],
                 on_error: Callable[[str], None] = lambda message: None):
        self.roots = {where: root.resolve() for where, root in roots.items()}
        self.editable = list(editable)
        self.on_change = on_change
        self.on_error = on_error
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._targets = {str(root / path): (where, path)
                         for where, root in self.roots.items() for path in self.editable}

    def start(self) -> None:
        """Start one watch task per root (the workspace recursively: it is rebuilt often)."""
        for where, root in self.roots.items():
            if where == WORKSPACE:
                folders, recursive = [root], True
            else:
                folders = sorted({(root / path).parent for path in self.editable})
                recursive = False
            self._tasks.append(asyncio.create_task(self._watch(folders, recursive),
                                                   name=f"watch-{where}"))

    async def stop(self) -> None:
        """Stop the watch tasks (they end within one step of the notify thread)."""
        self._stop.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks.clear()

    def check_now(self, where: str) -> None:
        """Compare every editable file under one root with what is expected (e.g. at start,
        for edits made while no engine watched)."""
        root = self.roots[where]
        for path in self.editable:
            self._report(where, root, path)

    def _report(self, where: str, root: Path, path: str) -> None:
        try:
            text = read_code(root, [path])[path]
        except FileNotFoundError:
            return  # being replaced (an editor's rename), or removed: nothing to adopt
        except (EditError, OSError, UnicodeDecodeError) as exc:
            self.on_error(f"manual edit of {path} in the {where} ignored: {exc}")
            return
        self.on_change(where, path, text)

    async def _watch(self, folders: list[Path], recursive: bool) -> None:
        def wanted(change: watchfiles.Change, path: str) -> bool:
            return path in self._targets and change is not watchfiles.Change.deleted

        try:
            async for changes in watchfiles.awatch(
                *folders, watch_filter=wanted, debounce=DEBOUNCE_MS, step=STEP_MS,
                stop_event=self._stop, recursive=recursive,
            ):
                for path in sorted({path for _, path in changes}):
                    where, relative = self._targets[path]
                    self._report(where, self.roots[where], relative)
        except Exception as exc:  # a watcher failure must never stop the run
            self.on_error(f"the manual-edit watcher stopped: {type(exc).__name__}: {exc}")
