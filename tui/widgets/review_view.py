"""The Review view: the pending proposal (prose, config changes, code diff) and any manual
edits a human made to the editable files. When several proposals wait (one per slot), a line
lists them and the human picks which one the view shows and the keys decide."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from engine.logs import strip_control
from tui.state import Review, RunState
from tui.widgets.diff_view import DiffView
from tui.widgets.plain import plain

if TYPE_CHECKING:
    from tui.snapshot import RunSnapshot


def _section(title: str, body: str, empty: str = "–") -> Group:
    body = strip_control(body).strip()
    return Group(Text(title, style="bold"), plain(body or empty, "" if body else "dim"),
                 Text(""))


class ReviewView(VerticalScroll):
    """Everything a human needs to decide on a proposal, top to bottom."""

    DEFAULT_CSS = """
    ReviewView { padding: 0 1; }
    ReviewView #review-picker { display: none; margin-bottom: 1; }
    ReviewView #review-picker.shown { display: block; }
    ReviewView #review-title { text-style: bold; margin-bottom: 1; }
    ReviewView #review-title.waiting { background: $warning 30%; }
    ReviewView .heading { text-style: bold; margin-top: 1; }
    ReviewView #review-warning { color: $error; display: none; }
    ReviewView #review-warning.shown { display: block; }
    ReviewView #manual { display: none; border: round $warning; padding: 0 1; }
    ReviewView #manual.shown { display: block; }
    """

    def compose(self) -> ComposeResult:
        yield Static("", id="review-picker")
        yield Static("No proposal yet.", id="review-title")
        yield Static("", id="review-warning")
        yield Static("", id="review-prose")
        yield Static("Code diff", classes="heading", id="diff-heading")
        yield DiffView(id="review-diff")
        with VerticalScroll(id="manual"):
            yield Static("", id="manual-title")
            yield DiffView("", id="manual-diff")
        yield Static("", id="revert-target", classes="heading")

    @property
    def diff_view(self) -> DiffView:
        return self.query_one("#review-diff", DiffView)

    def show(self, state: RunState, snapshot: RunSnapshot | None, review: Review | None,
             sent: bool, decided: frozenset[int] = frozenset()) -> None:
        """Redraw from the state, detailing `review`; `sent`: a decision for it is on its way;
        `decided`: the keys of the waiting proposals a decision was sent for."""
        self._show_picker(state.waiting_reviews, review, decided)
        title = self.query_one("#review-title", Static)
        if review is None:
            title.update("No proposal waiting." if state.iteration else "No proposal yet.")
            title.set_class(False, "waiting")
            self.query_one("#review-prose", Static).update("")
            self.diff_view.diff = ""
        else:
            proposal = review.proposal
            if review.awaiting and not sent:
                heading = f"Iteration {review.iteration}: proposal waiting for your review"
                keys = "  a accept · r reject · " + ("e edit · " if proposal.edits else "") + \
                    "s side by side"
                title.update(Text.assemble((heading, "bold"), (keys, "dim")))
            elif review.awaiting:
                title.update(f"Iteration {review.iteration}: decision sent, waiting for the "
                             "engine")
            else:
                title.update(f"Iteration {review.iteration}: proposal (decided by the policy "
                             "or a human)")
            title.set_class(review.awaiting and not sent, "waiting")
            parent = "root" if proposal.parent_id is None else f"node {proposal.parent_id}"
            meta = Text.assemble(
                ("parent ", "dim"), parent, ("  strategy ", "dim"), plain(proposal.strategy),
                ("  mutation ", "dim"), plain(proposal.mutation or "–"), "\n")
            if proposal.parent_rule:
                meta.append_text(Text.assemble(("parent rule ", "dim"),
                                               plain(proposal.parent_rule), "\n"))
            self.query_one("#review-prose", Static).update(Group(
                meta, Text(""),
                _section("Analysis", proposal.analysis),
                _section("Hypothesis", proposal.hypothesis),
                _section("Config changes", review.config_diff, "none"),
                _section("Code change",
                         proposal.code_change.change if proposal.code_change else "",
                         "none" if not proposal.edits else "–"),
            ))
            self.diff_view.diff = review.diff
        warning = self.query_one("#review-warning", Static)
        problems = []
        if review is not None and review.stale_paths:
            problems.append("stale: a human changed " + ", ".join(review.stale_paths)
                            + " since this proposal was made")
        if review is not None and review.edit_error:
            problems.append(f"your edited version was refused: {review.edit_error}")
        warning.update(plain("\n".join(problems)))
        warning.set_class(bool(problems), "shown")
        self._show_manual(state)
        target = snapshot.latest_code_change() if snapshot else None
        self.query_one("#revert-target", Static).update(
            f"Latest applied code change: node {target} (v: revert it)" if target else "")

    def _show_picker(self, waiting: list[Review], shown: Review | None,
                     decided: frozenset[int]) -> None:
        """`3 proposals wait: [iteration 7] iteration 9 (sent) iteration 10   [ ] switch`."""
        picker = self.query_one("#review-picker", Static)
        picker.set_class(len(waiting) > 1, "shown")
        if len(waiting) < 2:
            return
        line = Text.assemble((f"{len(waiting)} proposals wait:", "bold"))
        for review in waiting:
            label = f" iteration {review.iteration}" + (" (sent)" if review.key in decided
                                                          else "") + " "
            line.append(" ")
            line.append(label, "reverse bold" if shown is not None and review.key == shown.key
                        else "")
        line.append("   [ ] switch", "dim")
        picker.update(line)

    def _show_manual(self, state: RunState) -> None:
        panel = self.query_one("#manual", VerticalScroll)
        edits = list(state.manual_edits.values())
        panel.set_class(bool(edits), "shown")
        if not edits:
            return
        first = edits[0]
        others = f" (+{len(edits) - 1} more)" if len(edits) > 1 else ""
        self.query_one("#manual-title", Static).update(Text.assemble(
            ("Manual edit detected: ", "bold"), plain(f"{first.path} in the {first.where}"),
            others,
            ("   m adopt as the next node's code · i ignore", "dim")))
        self.query_one("#manual-diff", DiffView).diff = first.diff
