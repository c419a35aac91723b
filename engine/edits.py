"""Validated code edits: exact search/replace on whitelisted files, all or nothing.

Edits are applied to in-memory file texts (a node's code); nothing touches disk until the
whole proposal is valid. Writing a node's files out goes through `safe_target` so a symlink
planted on a whitelisted path is refused, never followed."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from engine.atomic import write_atomic
from engine.proposal import CodeEdit

MAX_FILE_BYTES = 256 * 1024
MAX_EDIT_BYTES = 64 * 1024
PARSE_TIMEOUT_S = 10.0
PARSE_MEMORY_BYTES = 2 * 1024**3


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


# The child limits its own memory (no preexec_fn: the engine has threads) so a
# pathological file cannot take the machine's memory with it.
_PARSE_SCRIPT = f"""
import ast, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({PARSE_MEMORY_BYTES}, {PARSE_MEMORY_BYTES}))
for path, text in json.load(sys.stdin).items():
    try:
        ast.parse(text, path)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        line = getattr(exc, "lineno", None)
        where = f"{{path}}, line {{line}}" if line else path
        detail = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
        sys.stderr.write(f"{{where}}: {{type(exc).__name__}}: {{detail}}\\n")
        text_line = getattr(exc, "text", None)
        if text_line:
            sys.stderr.write("    " + text_line.rstrip() + "\\n")
        sys.exit(1)
"""


def _occurrence_lines(text: str, search: str, limit: int = 5) -> str:
    lines, start = [], 0
    while len(lines) < limit and (found := text.find(search, start)) >= 0:
        lines.append(str(text.count("\n", 0, found) + 1))
        start = found + 1
    return ", ".join(lines)


def check_parses(files: Mapping[str, str]) -> None:
    """Parse the Python files among `files` in one separate, time- and memory-limited process
    so a pathological file cannot hurt the engine; EditError naming the file and line."""
    python = {path: text for path, text in files.items() if path.endswith(".py")}
    if not python:
        return
    try:
        completed = subprocess.run(
            [sys.executable, "-I", "-c", _PARSE_SCRIPT],
            input=json.dumps(python), capture_output=True, text=True, timeout=PARSE_TIMEOUT_S,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except subprocess.TimeoutExpired:
        names = ", ".join(sorted(python))
        raise EditError(f"{names}: parsing the edited file took over {PARSE_TIMEOUT_S} s") from None
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines()
        detail = "\n".join(lines[-4:]) if lines else f"exit code {completed.returncode}"
        raise EditError(f"the edited file does not parse:\n{detail}")


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
                f" It starts on lines {_occurrence_lines(text, edit.search)}; include more "
                "surrounding lines to make it unique.")
            raise EditError(f"edit {number} ({path}): the search text {where}.{hint}")
        new_text = text.replace(edit.search, edit.replace, 1)
        if len(new_text.encode()) > MAX_FILE_BYTES:
            raise EditError(f"edit {number} ({path}): the result exceeds {MAX_FILE_BYTES} bytes")
        changed[path] = new_text
    check_parses(changed)
    return changed


def validate_files(
    files: Mapping[str, str], before: Mapping[str, str], whitelist: Iterable[str]
) -> dict[str, str]:
    """Whole new texts for some editable files (a human's edited version): the same checks
    as edits (whitelist, size, parses); returns those that differ from `before`."""
    whitelist = list(whitelist)
    changed: dict[str, str] = {}
    for path, text in files.items():
        clean = normalise_path(path, whitelist)
        if not isinstance(text, str):
            raise EditError(f"{clean}: the new content must be text")
        if len(text.encode()) > MAX_FILE_BYTES:
            raise EditError(f"{clean}: the new content exceeds {MAX_FILE_BYTES} bytes")
        if "\0" in text:
            raise EditError(f"{clean}: the new content contains a NUL byte")
        if before.get(clean) != text:
            changed[clean] = text
    check_parses(changed)
    return changed


def write_files(root: Path, files: Mapping[str, str], *, durable: bool = True) -> None:
    """Write validated texts under `root`, each atomically; every target is checked first
    (no symlink anywhere on its path), so a refusal writes nothing."""
    targets = {relative: safe_target(root, relative) for relative in files}
    for relative, target in targets.items():
        if target.exists() and not target.is_file():
            raise EditError(f"'{relative}' is not a regular file", policy_violation=True)
    for relative, text in files.items():
        targets[relative].parent.mkdir(parents=True, exist_ok=True)
        write_atomic(targets[relative], text, durable=durable)


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
