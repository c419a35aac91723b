"""Validated code edits: exact search/replace on whitelisted files, all or nothing.

Edits are applied to in-memory file texts (a node's code); nothing touches disk until the
whole proposal is valid. Writing a node's files out goes through `safe_target` so a symlink
planted on a whitelisted path is refused, never followed."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from engine.proposal import CodeEdit

MAX_FILE_BYTES = 256 * 1024
MAX_EDIT_BYTES = 64 * 1024
PARSE_TIMEOUT_S = 10.0


class EditError(ValueError):
    """An edit that cannot be applied; the message goes back to the agent."""

    def __init__(self, message: str, *, policy_violation: bool = False):
        super().__init__(message)
        self.policy_violation = policy_violation


def normalise_path(path: str, whitelist: Iterable[str]) -> str:
    """The whitelisted relative path `path` names, or EditError (a policy violation)."""
    allowed = set(whitelist)
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path or not path.strip():
        raise EditError(f"'{path}' is not an editable file: use one of {sorted(allowed)}",
                        policy_violation=True)
    clean = str(pure)
    if clean not in allowed:
        raise EditError(f"'{path}' is not an editable file: use one of {sorted(allowed)}",
                        policy_violation=True)
    return clean


def safe_target(root: Path, relative: str) -> Path:
    """`root/relative`, refusing any symlink on the way (the file itself included)."""
    current = root
    for part in PurePosixPath(relative).parts:
        current = current / part
        if current.is_symlink():
            raise EditError(f"'{relative}' goes through a symlink ({current}); refusing to "
                            "follow it", policy_violation=True)
    return current


def read_code(root: Path, files: Iterable[str]) -> dict[str, str]:
    """Read the whitelisted files under `root` without following symlinks."""
    texts = {}
    for relative in files:
        target = safe_target(root, relative)
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise EditError(f"'{relative}' is larger than {MAX_FILE_BYTES} bytes")
        texts[relative] = data.decode("utf-8")
    return texts


def _did_you_mean(text: str, search: str) -> str:
    """The lines of `text` closest to the first line of `search`, for the agent's retry."""
    lines = text.splitlines()
    wanted = next((line for line in search.splitlines() if line.strip()), search)
    close = difflib.get_close_matches(wanted, lines, n=3, cutoff=0.5)
    if not close:
        return ""
    quoted = []
    for match in close:
        index = lines.index(match)
        quoted.append(f"  line {index + 1}: {match!r}")
    return " Did you mean:\n" + "\n".join(quoted)


def check_parses(path: str, text: str) -> None:
    """Parse `text` in a separate process so a pathological file cannot hurt the engine."""
    if not path.endswith(".py"):
        return
    try:
        completed = subprocess.run(
            [sys.executable, "-I", "-c",
             "import ast, sys; ast.parse(sys.stdin.read(), sys.argv[1])", path],
            input=text, capture_output=True, text=True, timeout=PARSE_TIMEOUT_S,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except subprocess.TimeoutExpired:
        raise EditError(f"{path}: parsing the edited file took over {PARSE_TIMEOUT_S} s") from None
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines()
        detail = "\n".join(lines[-4:]) if lines else f"exit code {completed.returncode}"
        raise EditError(f"{path}: the edited file does not parse:\n{detail}")


def apply_edits(
    files: Mapping[str, str], edits: Iterable[CodeEdit], whitelist: Iterable[str]
) -> dict[str, str]:
    """New texts of the files the edits touch; raises EditError and changes nothing if any
    edit is invalid."""
    whitelist = list(whitelist)
    changed: dict[str, str] = {}
    for number, edit in enumerate(edits, start=1):
        path = normalise_path(edit.file, whitelist)
        if len(edit.search.encode()) + len(edit.replace.encode()) > MAX_EDIT_BYTES:
            raise EditError(f"edit {number} ({path}) is larger than {MAX_EDIT_BYTES} bytes")
        if not edit.search:
            raise EditError(f"edit {number} ({path}): the search text is empty")
        text = changed.get(path, files.get(path))
        if text is None:
            raise EditError(f"edit {number}: '{path}' does not exist at this node")
        count = text.count(edit.search)
        if count != 1:
            where = "does not occur" if count == 0 else f"occurs {count} times (must be once)"
            hint = _did_you_mean(text, edit.search) if count == 0 else (
                " Include more surrounding lines to make it unique.")
            raise EditError(f"edit {number} ({path}): the search text {where}.{hint}")
        new_text = text.replace(edit.search, edit.replace, 1)
        if len(new_text.encode()) > MAX_FILE_BYTES:
            raise EditError(f"edit {number} ({path}): the result exceeds {MAX_FILE_BYTES} bytes")
        changed[path] = new_text
    for path, text in changed.items():
        check_parses(path, text)
    return changed


def unified_diff(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    """A git-style unified diff of the files that differ."""
    chunks = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path, ""), after.get(path, "")
        if old == new:
            continue
        chunks.extend(difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True),
            fromfile=f"a/{path}", tofile=f"b/{path}",
        ))
    return "".join(line if line.endswith("\n") else line + "\n" for line in chunks)


def line_counts(before: str, after: str) -> tuple[int, int]:
    """(+added, -removed) lines between two texts, as a diff counts them."""
    added = removed = 0
    for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return added, removed
