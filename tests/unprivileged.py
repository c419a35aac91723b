"""Running a command as an unprivileged user (uid/gid 65534) from a test that runs as root,
as CI does; a test run by a normal user runs it as it is.

The default Python of these machines lives under /root (mode 0700), which an unprivileged
user cannot traverse: the command gets a private mount namespace in which /root is an empty
0755 tmpfs holding only a bind of the Python installation."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

NOBODY = 65534
_WRAPPER = """
set -e
if [ -n "$PROCTOR_TEST_HOLD" ]; then
    mount --bind "$PROCTOR_TEST_PYTHON" "$PROCTOR_TEST_HOLD"
    mount -t tmpfs -o mode=0755 proctor-test-root /root
    mkdir -p "$PROCTOR_TEST_PYTHON"
    mount --bind "$PROCTOR_TEST_HOLD" "$PROCTOR_TEST_PYTHON"
fi
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "$@"
"""


def available() -> str | None:
    """None when commands can be run unprivileged here, else why not."""
    if os.geteuid() != 0:
        return None
    missing = [tool for tool in ("unshare", "setpriv", "mount") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


def argv_as_nobody(argv: list[str]) -> list[str]:
    """`argv` run as uid 65534 (as it is when we are not root); its environment must come
    from `environment_for_nobody`."""
    if os.geteuid() != 0:
        return argv
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _WRAPPER,
            "sh", *argv]


def environment_for_nobody(env: dict[str, str], hold: Path) -> dict[str, str]:
    """The variables `argv_as_nobody` needs, added to `env`. `hold`: a folder for the bind of
    the Python installation."""
    python = Path(sys.base_prefix).resolve()
    if os.geteuid() == 0 and python.is_relative_to("/root"):
        hold.mkdir(parents=True, exist_ok=True)
        return {**env, "PROCTOR_TEST_HOLD": str(hold), "PROCTOR_TEST_PYTHON": str(python)}
    return env


def give_to_nobody(path: Path) -> None:
    """Make `path` (a tree) the unprivileged user's, when we are root."""
    if os.geteuid() != 0:
        return
    for top, folders, files in os.walk(path):
        for name in (".", *folders, *files):
            os.chown(os.path.join(top, name), NOBODY, NOBODY, follow_symlinks=False)
