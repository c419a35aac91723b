"""The Logs view: the run's documents. Markdown files are rendered (their latest part when
large); logs go to the indexed file viewer. The shown file is re-read when it changes."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import ContentSwitcher, Markdown, OptionList
from textual.widgets.option_list import Option

from engine.logs import strip_control
from engine.paths import RunPaths
from tui.widgets.file_log import FileLog
from tui.widgets.plain import plain

MARKDOWN_TAIL_BYTES = 64 * 1024  # a markdown document larger than this shows its end
_NEVER_SHOWN = (-1, -1)
_SOFT_BREAK = re.compile(r"(?<=[^\n])\n(?=[^\n])")


@dataclass(frozen=True)
class Document:
    """One entry of the list: a label, a file, and how to show it."""

    key: str
    label: str
    path: Path
    markdown: bool


def run_documents(run_dir: Path, instructions: Path | None, training: dict[int, int],
                  *, several_slots: bool = False) -> list[Document]:
    """The documents of a run folder, in the order the list shows them; `training` names
    the node whose training log each slot shows (slot -> node)."""
    paths = RunPaths(run_dir)
    docs = [Document(path.stem, path.name, path, markdown) for path, markdown in (
        (paths.analysis, True), (paths.memory, True), (paths.reasoning, False),
        (paths.scores, False))]
    for slot, node in sorted(training.items()):
        key, label = ((f"training-{slot}", f"slot {slot} log (node {node})")
                      if several_slots else ("training", f"training log (node {node})"))
        docs.append(Document(key, label, paths.training_log(node), False))
    if instructions is not None:
        docs.append(Document("instructions", f"instructions: {instructions.name}",
                             instructions, True))
    for folder, label in ((paths.protocols_dir, "protocol"),
                          (paths.memory_snapshots_dir, "memory")):
        for path in sorted(folder.glob("block_*.md")):
            block = path.stem.removeprefix("block_")
            docs.append(Document(f"{folder.name}/{path.name}", f"{label} block {block}", path,
                                 True))
    return docs


def hard_breaks(text: str) -> str:
    """Keep the run logs' line structure: markdown would join single newlines."""
    return _SOFT_BREAK.sub("  \n", text)


def markdown_tail(path: Path, limit: int = MARKDOWN_TAIL_BYTES) -> str:
    """A markdown file, or its last `limit` bytes from a heading on (with a note)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            if size <= limit:
                return hard_breaks(strip_control(handle.read().decode("utf-8", "replace")))
            handle.seek(size - limit)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return f"*{path.name} does not exist yet.*"
    heading = text.find("\n#")
    text = text[heading + 1:] if heading >= 0 else text
    note = f"*… the first {size - len(text.encode())} bytes are in {path}*"
    return f"{note}\n\n{hard_breaks(strip_control(text))}"


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class LogsView(Horizontal):
    """The list of documents and the selected one."""

    DEFAULT_CSS = """
    LogsView #doc-list { width: 30; height: 1fr; border-right: solid $primary-darken-2; }
    LogsView #doc-body { width: 1fr; height: 1fr; }
    LogsView #doc-md-pane { padding: 0 1; }
    LogsView #doc-log { height: 1fr; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.documents: list[Document] = []
        self.current: Document | None = None
        self._signature: tuple[int, int] | None = _NEVER_SHOWN

    def compose(self) -> ComposeResult:
        yield OptionList(id="doc-list")
        with ContentSwitcher(initial="doc-md-pane", id="doc-body"):
            with VerticalScroll(id="doc-md-pane"):
                yield Markdown("*No run yet.*", id="doc-md")
            yield FileLog(id="doc-log")

    def set_documents(self, documents: list[Document]) -> None:
        """Refresh the list (keeps the selection); opens the first document at first."""
        if [d.key for d in documents] == [d.key for d in self.documents] and \
                [d.path for d in documents] == [d.path for d in self.documents]:
            return
        self.documents = documents
        options = self.query_one("#doc-list", OptionList)
        current = self.current.key if self.current else None
        options.clear_options()
        options.add_options([Option(plain(doc.label), id=doc.key) for doc in documents])
        keys = [doc.key for doc in documents]
        if current in keys:
            options.highlighted = keys.index(current)
            replacement = documents[keys.index(current)]
            if self.current is not None and replacement.path != self.current.path:
                self.select(replacement)
        elif documents:
            options.highlighted = 0
            self.select(documents[0])

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        for doc in self.documents:
            if doc.key == event.option.id and doc != self.current:
                self.select(doc)

    def select(self, doc: Document) -> None:
        """Show one document."""
        self.current = doc
        self._signature = _NEVER_SHOWN
        switcher = self.query_one("#doc-body", ContentSwitcher)
        if doc.markdown:
            switcher.current = "doc-md-pane"
            self.check()
        else:
            switcher.current = "doc-log"
            self.query_one("#doc-log", FileLog).open(doc.path)
            self._signature = _signature(doc.path)

    def check(self) -> None:
        """Re-read the shown document if it changed on disk (the app calls this on a timer)."""
        doc = self.current
        if doc is None:
            return
        signature = _signature(doc.path)
        if signature == self._signature:
            return
        self._signature = signature
        if doc.markdown:
            self.query_one("#doc-md", Markdown).update(markdown_tail(doc.path))
        else:
            log = self.query_one("#doc-log", FileLog)
            if log.path != doc.path:
                log.open(doc.path)
            else:
                log.check()
