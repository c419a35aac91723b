"""Modal dialogs: confirm a destructive action, ask for a reason, show the keys."""

from __future__ import annotations

from typing import TypeVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown

from tui.widgets.plain import plain

T = TypeVar("T")

_DIALOG_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{
    width: 72; height: auto; max-height: 90%;
    border: thick $primary; background: $panel; padding: 1 2;
}}
{name} Horizontal {{ height: auto; align-horizontal: right; margin-top: 1; }}
{name} Button {{ margin-left: 2; }}
{name} Label {{ width: 100%; }}
"""


class _Dialog(ModalScreen[T]):
    """A message, what a subclass puts under it (`fields`), then Cancel and one action."""

    VARIANT = "primary"

    def __init__(self, message: str, action_label: str) -> None:
        super().__init__()
        self.message = message  # may quote what others wrote: shown as plain text
        self.action_label = action_label

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(plain(self.message), id="question")
            yield from self.fields()
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button(self.action_label, id="act", variant=self.VARIANT)

    def fields(self) -> ComposeResult:
        yield from ()


class ConfirmScreen(_Dialog[bool]):
    """Yes/no before something that cannot be taken back; dismisses with the answer."""

    DEFAULT_CSS = _DIALOG_CSS.format(name="ConfirmScreen")
    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]
    VARIANT = "error"

    def __init__(self, question: str, confirm_label: str = "Yes") -> None:
        super().__init__(question, confirm_label)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "act")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class ReasonScreen(_Dialog[str | None]):
    """Asks for a line of text (a rejection reason); dismisses with it, or None."""

    DEFAULT_CSS = _DIALOG_CSS.format(name="ReasonScreen")
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="reason.cancel")]

    def __init__(self, prompt: str, placeholder: str = "") -> None:
        super().__init__(prompt, "Send")
        self.placeholder = placeholder

    def fields(self) -> ComposeResult:
        yield Input(placeholder=self.placeholder, id="reason")
        yield Label("", id="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._send(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "act":
            self._send(self.query_one(Input).value)
        else:
            self.dismiss(None)

    def _send(self, text: str) -> None:
        if not text.strip():
            self.query_one("#hint", Label).update("a reason is needed: the agent reads it")
            return
        self.dismiss(text.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """The keys and what they do, as markdown."""

    DEFAULT_CSS = _DIALOG_CSS.format(name="HelpScreen") + """
    HelpScreen > Vertical { width: 90; }
    HelpScreen VerticalScroll { height: auto; max-height: 30; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="help.close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(), VerticalScroll():
            yield Markdown(self.text)

    def action_close(self) -> None:
        self.dismiss(None)
