"""Editing a proposal's files in the user's $EDITOR (the app suspends itself around it)."""

from __future__ import annotations

import os
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path


class EditorError(Exception):
    """The editor could not be run or failed; the message is for the user."""


def editor_command() -> list[str]:
    """$VISUAL, else $EDITOR, else vi, split like a shell would."""
    text = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise EditorError(f"cannot parse the editor command '{text}': {exc}") from None
    if not argv:
        raise EditorError("the editor command is empty (set $EDITOR)")
    return argv


def edit_files(files: dict[str, str], run: Callable[[list[str]], int]) -> dict[str, str]:
    """Write `files` (relative path -> text) to a temporary folder, let the editor change them
    (`run` executes the argv and returns its exit code) and return their new texts."""
    argv = editor_command()
    with tempfile.TemporaryDirectory(prefix="proctor-edit-") as folder:
        root = Path(folder)
        paths = []
        for relative, text in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            paths.append(str(path))
        try:
            code = run([*argv, *paths])
        except OSError as exc:
            raise EditorError(f"cannot run the editor '{argv[0]}': {exc.strerror}") from None
        if code != 0:
            raise EditorError(f"the editor exited with code {code}; nothing was sent")
        return {relative: (root / relative).read_text(encoding="utf-8", errors="replace")
                for relative in files}
