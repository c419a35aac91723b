"""The Anthropic API key: from `ANTHROPIC_API_KEY` or a private key file, never anywhere else.

The key lives only in memory of the engine process: it is never written to the journal, a
log, a prompt or an error message (`redact` scrubs it from any text that might carry it), and
the runner's allow-listed child environment never includes it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

KEY_ENV = "ANTHROPIC_API_KEY"
REDACTED = "[redacted]"


class ApiKeyError(ValueError):
    """No usable key; the message says what to do (and never contains a key)."""


def load_api_key(key_file: str | Path | None = None) -> str:
    """The key from `ANTHROPIC_API_KEY`, else from `key_file` (which must be private: mode
    0600 or stricter, owned by this user)."""
    from_env = os.environ.get(KEY_ENV, "").strip()
    if from_env:
        return from_env
    if key_file is None:
        raise ApiKeyError(
            f"no Anthropic API key: set {KEY_ENV} or exploration.anthropic.key_file "
            "(or use --agent heuristic)"
        )
    return read_key_file(Path(key_file).expanduser())


def read_key_file(path: Path) -> str:
    """The first non-empty line of a private key file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ApiKeyError(f"the API key file {path} does not exist") from None
    except OSError as exc:
        raise ApiKeyError(f"cannot read the API key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ApiKeyError(f"the API key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ApiKeyError(
            f"the API key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}):"
            f" refusing it; run `chmod 600 {path}`"
        )
    if info.st_uid != os.getuid():
        raise ApiKeyError(f"the API key file {path} belongs to another user: refusing it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeyError(f"cannot read the API key file {path}: {type(exc).__name__}") from None
    key = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not key:
        raise ApiKeyError(f"the API key file {path} is empty")
    return key


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by a marker."""
    if not secret:
        return text
    return text.replace(secret, REDACTED)
