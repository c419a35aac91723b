"""The app's settings: typed, with environment overrides, and switches tests turn off."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

ENV_PREFIX = "PROCTOR_TUI_"


def _env_bool(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class TuiSettings:
    """How the app behaves; `from_env` reads `PROCTOR_TUI_<FIELD>` overrides."""

    watch_files: bool = True  # poll the Logs view's files for changes
    file_poll_s: float = 1.0
    journal_poll_s: float = 0.25  # attached mode: how often the journal is read
    ui_flush_s: float = 0.1  # how often batched engine events reach the widgets
    live_log_lines: int = 5000  # the live training log keeps at most this many lines
    pending_log_lines: int = 5000  # lines waiting for the next flush (older are skipped)
    show_clock: bool = True  # elapsed/ETA in the status line (snapshot tests turn it off)
    bell: bool = True
    toasts: bool = True  # notices as toasts (snapshot tests turn them off: they expire)
    clock: Callable[[], float] = field(default=time.time, compare=False)

    @classmethod
    def from_env(cls, **overrides: object) -> TuiSettings:
        """Defaults, then `PROCTOR_TUI_*` variables, then `overrides`."""
        values: dict[str, object] = {}
        for spec in fields(cls):
            raw = os.environ.get(ENV_PREFIX + spec.name.upper())
            if raw is None or spec.name == "clock":
                continue
            default = getattr(cls, spec.name)
            try:
                values[spec.name] = (_env_bool(raw) if isinstance(default, bool)
                                     else type(default)(raw))
            except ValueError:
                continue  # a malformed override keeps the default
        return replace(cls(**values), **overrides)
