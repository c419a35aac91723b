"""What an agent hands the engine: one `Proposal` per iteration. Agents never run anything."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Strategy(StrEnum):
    """The protocol's strategy table (see the instruction file)."""

    BASELINE = "baseline"
    EXPLOIT = "exploit"
    BOUNDARY_PROBE = "boundary-probe"
    SWITCH_PARAMETER = "switch-parameter"
    EXPLORE = "explore"
    RETEST = "re-test"
    RECOMBINE = "recombine"
    FORCED_BRANCH = "forced-branch"
    CODE_CHANGE = "code-modification"
    REPAIR = "repair"
    REVERT = "revert"
    MANUAL = "manual-edit"


class CodeEdit(BaseModel):
    """Exact search/replace on one whitelisted file (path relative to the project root)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    search: str
    replace: str


class CodeChange(BaseModel):
    """How a code change reads in analysis.md and the commit message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    function: str = ""
    change: str


class Proposal(BaseModel):
    """One proposed experiment: a parent, config changes, optional code edits and the prose."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parent_id: int | None
    strategy: Strategy
    config_changes: dict[str, Any] = Field(default_factory=dict)
    edits: tuple[CodeEdit, ...] = ()
    code_change: CodeChange | None = None
    mutation: str = ""
    parent_rule: str = ""
    hypothesis: str = ""
    analysis: str = ""
    memory: str | None = None

    @property
    def changes_code(self) -> bool:
        return bool(self.edits)
