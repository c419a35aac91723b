"""A scrolling view that renders only its visible lines, with a follow (tail) mode.

Subclasses say how many lines there are and what line `i` is; this class draws the visible
ones, follows new lines while the view sits at the bottom, stops following when the user
scrolls up (counting the lines they have not seen), and follows again at the bottom."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Size
from textual.message import Message
from textual.reactive import var
from textual.scroll_view import ScrollView
from textual.strip import Strip

from engine.logs import strip_control

MAX_WIDTH = 1000  # horizontal scrolling stops here; longer lines are cut
_MARKER_STYLE = Style(dim=True, italic=True)
_ERROR_STYLE = Style(color="red")
_ERROR_WORDS = ("Traceback", "Error", "error:", "FAILED")


def line_style(line: str) -> Style | None:
    """Proctor's own markers dim, error lines red; everything else plain."""
    if line.startswith("[proctor]") or line.startswith("──"):
        return _MARKER_STYLE
    if any(word in line for word in _ERROR_WORDS):
        return _ERROR_STYLE
    return None


def printable(line: str) -> str:
    """A line safe to draw: terminal escapes and control characters removed, tabs expanded,
    anything else unprintable replaced."""
    if line.isprintable():
        return line
    line = strip_control(line).expandtabs(4)
    if line.isprintable():
        return line
    return "".join(ch if ch.isprintable() else "�" for ch in line)


class LineView(ScrollView, can_focus=True):
    """Base of the log widgets: draws visible lines only; follows the end when asked."""

    DEFAULT_CSS = """
    LineView {
        background: $surface;
        overflow: auto auto;
        &:focus { background-tint: $foreground 5%; }
    }
    """
    BINDINGS = [Binding("f", "follow", "Follow", show=False, id="log.follow")]

    follow: var[bool] = var(True, init=False)

    class FollowChanged(Message):
        """Following switched on/off, or unseen lines arrived while it was off."""

        def __init__(self, view: LineView, follow: bool, unseen: int) -> None:
            super().__init__()
            self.view = view
            self.follow = follow
            self.unseen = unseen

        @property
        def control(self) -> LineView:
            return self.view

    def __init__(self, *, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.unseen = 0
        self._width = 0
        self._cache: LRUCache[int, Strip] = LRUCache(512)

    # -- what subclasses provide -----------------------------------------------------------

    @property
    def line_count(self) -> int:
        raise NotImplementedError

    def get_line(self, index: int) -> str:
        raise NotImplementedError

    # -- content changes -------------------------------------------------------------------

    def content_changed(self, added: int, removed_front: int = 0, widest: int = 0) -> None:
        """Call after lines were appended (`added`) or dropped from the front."""
        self._width = min(MAX_WIDTH, max(self._width, widest))
        if removed_front:
            self._cache.clear()  # every index moved
        self.virtual_size = Size(self._width, self.line_count)
        if self.follow:
            self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)
        else:
            if removed_front:  # keep the lines the user is reading in place
                self.scroll_to(y=max(0, self.scroll_y - removed_front), animate=False, force=True,
                               immediate=True)
            if added:
                self.unseen += added
                self.post_message(self.FollowChanged(self, False, self.unseen))
        self.refresh()

    def reset(self) -> None:
        """Forget every line (the subclass has emptied its storage)."""
        self._cache.clear()
        self._width = 0
        self.unseen = 0
        self.virtual_size = Size(0, self.line_count)
        self.scroll_to(0, 0, animate=False, immediate=True, force=True)
        if not self.follow:
            self.follow = True
        self.refresh()

    # -- follow mode -----------------------------------------------------------------------

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        at_end = round(new_value) >= self.max_scroll_y
        if at_end and not self.follow:
            self.follow = True
        elif not at_end and self.follow and new_value < old_value:
            self.follow = False  # the user scrolled up

    def watch_follow(self, follow: bool) -> None:
        if follow:
            self.unseen = 0
        self.post_message(self.FollowChanged(self, follow, self.unseen))

    def action_follow(self) -> None:
        """Jump to the end and follow new lines."""
        self.follow = True
        self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)

    # -- drawing ---------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        width = self.size.width
        base = self.rich_style
        if index >= self.line_count:
            return Strip.blank(width, base)
        strip = self._cache.get(index)
        if strip is None:
            text = printable(self.get_line(index))[:MAX_WIDTH]
            extra = line_style(text)
            style = base + extra if extra is not None else base
            strip = Strip([Segment(text, style)])
            self._cache[index] = strip
        return strip.crop_extend(scroll_x, scroll_x + width, base)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._cache.clear()
