"""How far a run is, read from the lines it prints: the one parser of progress lines.

Two phases print progress: the prepare step simulating the dataset (`models/data.py`:
`simulated frame 40/200`) and the training (`models/trainer.py`: `step 300/2000 loss …`, and
the harness's own `[harness] step 300/2000 loss …` after a quiet spell)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from engine.events import TrainingProgress

SIMULATION = "simulation"
TRAINING = "training"

# At most 12 digits a number: a child printing a huge one must not make int() raise.
_PROGRESS = re.compile(
    r"\b(?:(?P<frame>simulated frame)|step)\s+(?P<done>\d{1,12})\s*/\s*(?P<total>\d{1,12})"
    r"(?!\d)")


def parse_progress(iteration: int, line: str) -> TrainingProgress | None:
    """The progress one line reports, or None (a total of 0 reports nothing)."""
    match = _PROGRESS.search(line)
    if match is None or int(match["total"]) == 0:
        return None
    phase = SIMULATION if match["frame"] else TRAINING
    return TrainingProgress(iteration, int(match["done"]), int(match["total"]), phase)


def latest_progress(iteration: int, lines: Sequence[str]) -> TrainingProgress | None:
    """The progress the last progress line of a batch reports, or None when none does."""
    for line in reversed(lines):
        progress = parse_progress(iteration, line)
        if progress is not None:
            return progress
    return None
