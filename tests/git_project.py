"""A copy of the fake experiment as a real git repository, and what tests ask of it."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fakeproject"
# A fixed identity, so the tests do not depend on the machine's git config.
GIT_ENV = {"GIT_AUTHOR_NAME": "Test Human", "GIT_AUTHOR_EMAIL": "human@example.org",
           "GIT_COMMITTER_NAME": "Test Human", "GIT_COMMITTER_EMAIL": "human@example.org",
           "GIT_CONFIG_NOSYSTEM": "1"}


def git(root: Path, *args: str, check: bool = True) -> str:
    """Run git in `root` the way a user would (their hooks and config apply)."""
    completed = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                               env={**os.environ, **GIT_ENV}, check=False)
    if check and completed.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {completed.stderr}")
    return completed.stdout.strip()


def copy_fake(root: Path) -> Path:
    shutil.copytree(FAKE, root, ignore=shutil.ignore_patterns("__pycache__", "log"))
    return root


def make_git_project(root: Path) -> Path:
    """The fake project in `root`, committed as the base (log/ ignored, like the real one)."""
    copy_fake(root)
    (root / ".gitignore").write_text("log/\n__pycache__/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Test Human")
    git(root, "config", "user.email", "human@example.org")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "base")
    return root


@dataclass(frozen=True)
class UserState:
    """What proctor must never change in the user's repository."""

    head: str
    branch: str
    status: str
    index_bytes: bytes
    index_mtime_ns: int

    @classmethod
    def of(cls, root: Path) -> UserState:
        index = root / ".git" / "index"
        data, mtime = index.read_bytes(), index.stat().st_mtime_ns
        # --no-optional-locks: the check itself must not refresh (rewrite) the index
        status = git(root, "--no-optional-locks", "status", "--porcelain",
                     "--untracked-files=all")
        return cls(git(root, "rev-parse", "HEAD"), git(root, "symbolic-ref", "HEAD"),
                   status, data, mtime)
