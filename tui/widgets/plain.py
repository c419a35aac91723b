"""Text that an agent, a child process or a human wrote, made safe to draw: shown as its own
characters (never read as markup) and without terminal escapes or control characters."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

from engine.logs import strip_control


def plain(text: object, style: str | Style = "") -> Text:
    """`text` as a rich Text that is never markup, stripped of escapes (newlines and tabs
    stay)."""
    return Text(strip_control(str(text)), style=style)
