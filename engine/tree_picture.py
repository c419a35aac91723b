"""The tree picture at a block's end, drawn by a short-lived child process.

Drawing it takes about a second of matplotlib with the GIL held, which in the engine's own
process stalled its event loop at every block's end. `draw_tree_picture` starts
`python -m engine.tree_picture RUN_DIR UP_TO PATH` instead: the child opens the run's journal
read-only, draws the nodes of iterations up to UP_TO (`engine.report.write_tree_picture`:
nothing without matplotlib) and exits, within DRAW_LIMIT_S even if the engine is gone. It
inherits no secret, its stderr goes nowhere, and a picture it could not write is one line on
its stdout, which the engine reports."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.journal import Journal
from engine.records import nodes_from_journal
from engine.report import write_tree_picture
from engine.runner.isolation import environment_without_secrets

DRAWER = (sys.executable, "-m", "engine.tree_picture")  # the child, before its arguments
DRAW_LIMIT_S = 30.0  # a drawer still going then is killed (it usually takes 1 to 3 s)
COULD_NOT_WRITE = 3  # the child's exit status when the picture could not be written


async def draw_tree_picture(run_dir: Path, up_to: int, path: Path) -> str | None:
    """Draw the tree of `run_dir`'s nodes up to iteration `up_to` to `path` in a child
    process; returns why the picture could not be written, None otherwise (drawn, skipped
    without matplotlib, or the drawer failed: a picture is never worth a run's trouble).
    The child is killed when this is cancelled or after DRAW_LIMIT_S."""
    try:
        child = await asyncio.create_subprocess_exec(
            *DRAWER, str(run_dir), str(up_to), str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=environment_without_secrets(),
            start_new_session=True)  # Ctrl-C in the terminal is the engine's to handle
    except OSError as exc:
        return f"the drawer did not start: {exc}"
    said = b""
    try:
        said, _ = await asyncio.wait_for(child.communicate(), DRAW_LIMIT_S)
    except TimeoutError:
        pass
    finally:
        if child.returncode is None:  # too slow, or cancelled as the engine stops
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
    if child.returncode == COULD_NOT_WRITE:
        return said.decode(errors="replace").strip() or "it could not be written"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The child: draw RUN_DIR's tree up to iteration UP_TO to PATH."""
    run_dir, up_to, path = argv if argv is not None else sys.argv[1:]
    with Journal.open_for_client(run_dir) as journal:
        nodes = [node for node in nodes_from_journal(journal) if node.id <= int(up_to)]
    try:
        write_tree_picture(nodes, Path(path))
    except OSError as exc:
        print(exc)
        return COULD_NOT_WRITE
    return 0


if __name__ == "__main__":
    signal.alarm(int(DRAW_LIMIT_S))  # ends itself as the engine would, should that be gone
    sys.exit(main())
