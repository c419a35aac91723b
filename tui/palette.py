"""Command palette entries for every proctor action that applies right now."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

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
        return [entry for entry in ACTIONS if app.action_applies(entry[0])]

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
