"""A unified diff, syntax-highlighted, shown unified or side by side."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest

from rich.console import Group, RenderableType
from rich.style import Style
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from engine.logs import strip_control

MAX_DIFF_LINES = 4000  # beyond this the view says so; change.diff has the whole diff
THEME = "monokai"
_ADDED = Style(bgcolor="#12361b")
_REMOVED = Style(bgcolor="#4a1518")
_HUNK = Style(color="cyan", bold=True)
_FILE = Style(bold=True)


@dataclass(frozen=True)
class DiffLine:
    """One line of a unified diff with its old/new line numbers (None where absent)."""

    kind: str  # " ", "+", "-", "@" (hunk header), "f" (file header)
    text: str
    old: int | None = None
    new: int | None = None


def parse_unified(diff: str) -> list[DiffLine]:
    """The lines of a unified diff, numbered."""
    parsed: list[DiffLine] = []
    old = new = 0
    for raw in diff.splitlines():
        if raw.startswith(("--- ", "+++ ")):
            parsed.append(DiffLine("f", raw))
        elif raw.startswith("@@"):
            try:
                ranges = raw.split("@@")[1].split()
                old = int(ranges[0][1:].split(",")[0])
                new = int(ranges[1][1:].split(",")[0])
            except (IndexError, ValueError):
                pass
            parsed.append(DiffLine("@", raw))
        elif raw.startswith("+"):
            parsed.append(DiffLine("+", raw[1:], None, new))
            new += 1
        elif raw.startswith("-"):
            parsed.append(DiffLine("-", raw[1:], old, None))
            old += 1
        elif raw.startswith("\\"):
            continue  # "\ No newline at end of file"
        else:
            parsed.append(DiffLine(" ", raw[1:] if raw.startswith(" ") else raw, old, new))
            old += 1
            new += 1
    return parsed


def _language(lines: list[DiffLine]) -> str:
    for line in lines:
        if line.kind == "f" and line.text.rstrip().endswith(".py"):
            return "python"
    return "text"


class _Highlighter:
    def __init__(self, language: str):
        self.syntax = Syntax("", language, theme=THEME, background_color="default")

    def __call__(self, code: str, background: Style | None = None) -> Text:
        text = self.syntax.highlight(code)
        text.rstrip()
        if background is not None:
            text.stylize(background)
        return text


def render_unified(diff: str) -> RenderableType:
    """The diff as coloured lines, code highlighted."""
    lines = parse_unified(diff)[:MAX_DIFF_LINES]
    highlight = _Highlighter(_language(lines))
    out = Text()
    for line in lines:
        if line.kind == "f":
            out.append(line.text, _FILE)
        elif line.kind == "@":
            out.append(line.text, _HUNK)
        else:
            background = {"+": _ADDED, "-": _REMOVED}.get(line.kind)
            sign = Text(line.kind, style=background or "")
            out.append_text(sign)
            out.append_text(highlight(line.text, background))
        out.append("\n")
    return out


def render_side_by_side(diff: str) -> RenderableType:
    """Old on the left, new on the right; removed and added runs face each other."""
    lines = parse_unified(diff)[:MAX_DIFF_LINES]
    highlight = _Highlighter(_language(lines))
    table = Table.grid(expand=True, padding=(0, 1))
    table.add_column(justify="right", style="dim", width=4)
    table.add_column(ratio=1, overflow="ellipsis", no_wrap=True)
    table.add_column(justify="right", style="dim", width=4)
    table.add_column(ratio=1, overflow="ellipsis", no_wrap=True)
    removed: list[DiffLine] = []
    added: list[DiffLine] = []

    def flush() -> None:
        for left, right in zip_longest(removed, added):
            table.add_row(
                str(left.old) if left else "", highlight(left.text, _REMOVED) if left else "",
                str(right.new) if right else "", highlight(right.text, _ADDED) if right else "",
            )
        removed.clear()
        added.clear()

    for line in lines:
        if line.kind == "-":
            removed.append(line)
            continue
        if line.kind == "+":
            added.append(line)
            continue
        flush()
        if line.kind in ("f", "@"):
            style = _FILE if line.kind == "f" else _HUNK
            table.add_row("", Text(line.text, style), "", "")
        else:
            code = highlight(line.text)
            table.add_row(str(line.old), code, str(line.new), code.copy())
    flush()
    return table


class DiffView(Static):
    """Shows `diff`; `side_by_side` switches the layout. Put it in a scrolling container."""

    DEFAULT_CSS = "DiffView { width: 1fr; height: auto; }"

    diff: reactive[str] = reactive("", init=False)
    side_by_side: reactive[bool] = reactive(False, init=False)

    def __init__(self, empty: str = "no code changes", *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(Text(empty, style="dim"), id=id, classes=classes)
        self.empty = empty

    def watch_diff(self) -> None:
        self._render_diff()

    def watch_side_by_side(self) -> None:
        self._render_diff()

    def _render_diff(self) -> None:
        if not self.diff.strip():
            self.update(Text(self.empty, style="dim"))
            return
        diff = strip_control(self.diff)  # an agent wrote it: no escape reaches the terminal
        body = render_side_by_side(diff) if self.side_by_side else render_unified(diff)
        total = self.diff.count("\n")
        if total > MAX_DIFF_LINES:
            body = Group(body, Text(f"… {total - MAX_DIFF_LINES} more lines in change.diff",
                                    style="dim"))
        self.update(body)
