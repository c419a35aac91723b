"""Modal dialogs: confirm a destructive action, ask for a reason, show the keys."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown

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


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no before something that cannot be taken back; dismisses with the answer."""

    DEFAULT_CSS = _DIALOG_CSS.format(name="ConfirmScreen")
    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, confirm_label: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, id="question")
            with Horizontal():
                yield Button("Cancel", id="no")
                yield Button(self.confirm_label, id="yes", variant="error")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class ReasonScreen(ModalScreen[str | None]):
    """Asks for a line of text (a rejection reason); dismisses with it, or None."""

    DEFAULT_CSS = _DIALOG_CSS.format(name="ReasonScreen")
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="reason.cancel")]

    def __init__(self, prompt: str, placeholder: str = "") -> None:
        super().__init__()
        self.prompt = prompt
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.prompt)
            yield Input(placeholder=self.placeholder, id="reason")
            yield Label("", id="hint")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Send", id="send", variant="primary")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._send(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "send":
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
