"""Command palette entries for every proctor action that applies right now."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.markup import escape

from engine.logs import strip_control

if TYPE_CHECKING:
    from tui.app import ProctorApp

# (action, title, help): the palette's wording of the app's bindings.
ACTIONS: tuple[tuple[str, str, str], ...] = (
    ("show_tab('run')", "Show the run", "live training log, progress and R² chart"),
    ("show_tab('review')", "Show the review", "the pending proposal and its diff"),
    ("show_tab('tree')", "Show the tree", "every node, its diffs, metrics and log"),
    ("show_tab('logs')", "Show the logs", "analysis, memory, reasoning, instructions"),
    ("accept", "Accept the proposal", "approve the pending proposal as it is"),
    ("reject", "Reject the proposal", "reject it with a reason the agent reads"),
    ("edit", "Edit and accept", "edit the proposed files in $EDITOR, accept your version"),
    ("toggle_diff", "Toggle side-by-side diff", "unified or side-by-side code diffs"),
    ("previous_slot", "Previous slot", "the run and live log of the slot before"),
    ("next_slot", "Next slot", "the run and live log of the next slot"),
    ("previous_review", "Previous waiting proposal", "another slot's proposal that waits"),
    ("next_review", "Next waiting proposal", "another slot's proposal that waits"),
    ("toggle_tree_layout", "Tree or table", "the node tree with guides, or the flat table"),
    ("revert", "Revert a node", "a new node with the code before this change"),
    ("adopt_manual", "Adopt the manual edit", "make the human edit the next node's code"),
    ("ignore_manual", "Ignore the manual edit", "dismiss the detected human edit"),
    ("pause", "Pause the run", "finish nothing new until resumed"),
    ("resume", "Resume the run", "continue a paused run"),
    ("help", "Help", "the keys and what they do"),
    ("quit", "Quit", "leave the app"),
)


class ProctorCommands(Provider):
    """Offers the app's actions, only those that apply now (as the footer does)."""

    @property
    def proctor(self) -> ProctorApp:
        return self.app  # type: ignore[return-value]

    def _available(self) -> list[tuple[str, str, str]]:
        app = self.proctor
        entries = [entry for entry in ACTIONS if app.action_applies(entry[0])]
        return entries + [entry for entry in self._each_slot_and_review()
                          if app.action_applies(entry[0])]

    def _each_slot_and_review(self) -> list[tuple[str, str, str]]:
        """One entry per slot (its live log) and per waiting proposal (to decide it)."""
        state = self.proctor.state
        entries = []
        for slot in range(1, state.slot_count + 1):
            run = state.slot_runs.get(slot)
            where = run.where if run is not None and run.where else (
                state.slots[slot - 1] if slot <= len(state.slots) else "")
            doing = f"iteration {run.iteration}" if run is not None else "no run yet"
            entries.append((f"show_slot({slot})", f"Show slot {slot}",
                            _quoted(f"{doing}; {where}".strip("; "))))
        for review in state.waiting_reviews:
            entries.append((f"pick_review({review.iteration})",
                            f"Review the proposal of iteration {review.iteration}",
                            _quoted(review.proposal.mutation
                                    or review.config_diff.replace("\n", "; "))))
        return entries

    async def discover(self) -> Hits:
        for action, title, help_text in self._available():
            yield DiscoveryHit(title, partial(self.proctor.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for action, title, help_text in self._available():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title),
                          partial(self.proctor.run_action, action), help=help_text)


def _quoted(text: str) -> str:
    """Text an agent or a cluster wrote, as the palette's help (which reads markup)."""
    return escape(strip_control(text))
