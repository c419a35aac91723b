"""The headless consumer of engine events: a live status line on a terminal, plain lines
otherwise (a log file, a pipe, CI). A reader that goes away (`proctor run | head`) ends the
printing, never the run.

With several slots the iterations' lines interleave, so each names its iteration and its
slot: `[slot 2] iteration 7: training node 7 on local slot 2`."""

from __future__ import annotations

import contextlib
import math
import os
import select
import sys
import time
from typing import TextIO

from engine import events as ev
from engine.logs import strip_control


def reader_gone(stream: TextIO) -> bool:
    """Whether `stream` is a pipe whose reader has closed it (writes fail with EPIPE)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def discard_output(stream: TextIO) -> None:
    """Point `stream`'s descriptor at /dev/null, so nothing more written to it fails: not
    the next line, not Python's flush at exit ("Exception ignored ... BrokenPipeError")."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def _r2(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


class HeadlessPrinter:
    """Turns events into lines; on a TTY keeps one redrawn progress line at the bottom."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None,
                 echo_log: bool = False):
        stream = sys.stdout if stream is None else stream  # as it is now, not at import
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.echo_log = echo_log
        self.run = ""
        self.started = time.monotonic()
        self.iteration = 0
        self.total = 0
        self.best: float | None = None
        self.step = 0
        self.steps = 0
        self.slots = 1
        self._slot_of: dict[int, int] = {}  # iteration -> the slot its run started in
        self._slot_tag: dict[int, int] = {}  # iteration -> its slot, from its start
        self._progress: dict[int, tuple[int, int]] = {}  # iteration -> (step, total), k > 1
        self._status_shown = False
        self._closed = False  # the reader went away: print nothing more

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.TrainingStarted):
            self._slot_of[event.iteration] = event.slot
        if isinstance(event, ev.IterationStarted | ev.TrainingStarted):
            self._slot_tag[event.iteration] = event.slot
        text = self._describe(event)
        if text is not None:
            if self.slots > 1:
                text = self._tagged(event, text)
            self._line(strip_control(text))  # runs, agents and humans wrote parts of it
        if isinstance(event, ev.NodeFinished | ev.IterationSkipped):
            self._slot_of.pop(event.iteration, None)
            self._slot_tag.pop(event.iteration, None)
            self._progress.pop(event.iteration, None)
        if self.live and isinstance(event, ev.TrainingProgress | ev.IterationStarted
                                    | ev.NodeFinished | ev.LogLines):
            self._status()

    def _describe(self, event: ev.Event) -> str | None:
        match event:
            case ev.RunOpened(run=run, run_dir=run_dir, total_iterations=total,
                              resumed_at=resumed, sandbox_missing=missing, slots=slots):
                self.run, self.total, self.slots = run, total, max(1, len(slots))
                again = f", resuming iteration {resumed}" if resumed else ""
                header = f"run {run}: {total} iterations, files in {run_dir}{again}"
                places = [f"  {len(slots)} slots: {', '.join(slots)}"] if len(slots) > 1 else []
                return "\n".join([header, *places, *(f"  WARNING: sandbox layer missing: {layer}"
                                                      for layer in missing)])
            case ev.IterationStarted(iteration=iteration, block=block, total_iterations=total):
                self.iteration, self.total, self.step, self.steps = iteration, total, 0, 0
                return f"iteration {iteration}/{total} (block {block})"
            case ev.ProposalReady(iteration=iteration, proposal=proposal, diff=diff,
                                  config_diff=config_diff, awaiting_review=waiting,
                                  proposal_id=proposal_id):
                parent = "root" if proposal.parent_id is None else proposal.parent_id
                lines = [f"  proposal: parent={parent} strategy={proposal.strategy} "
                         f"mutation={proposal.mutation or config_diff or 'none'}"]
                if waiting:
                    # several may wait at once: then each command names its proposal
                    pick = f" --proposal {proposal_id}" if self.slots > 1 and proposal_id else ""
                    lines.append(diff.rstrip() if diff else config_diff)
                    lines.append(f"  waiting for review: proctor approve {self.run}{pick}  |  "
                                 f"proctor reject {self.run}{pick} --reason TEXT")
                return "\n".join(lines)
            case ev.ProposalDecided(approved=approved, reason=reason, by=by) if by != "policy":
                return f"  {'approved' if approved else 'rejected'} by {by}" + (
                    f": {reason}" if reason else "")
            case ev.ProposalInvalid(error=error, attempt=attempt):
                return f"  invalid proposal (try {attempt}): {error}"
            case ev.TrainingStarted(node_id=node_id, pid=pid, where=where):
                if self.slots == 1 and pid:
                    return f"  training node {node_id} (pid {pid})"
                place = f" on {where}" if where else ""
                return f"  training node {node_id}{place}" + (f" (pid {pid})" if pid else "")
            case ev.LogLines(lines=lines) if self.echo_log:
                return "\n".join(f"    | {line}" for line in lines)
            case ev.TrainingProgress(iteration=iteration, step=step, total=total):
                self.step, self.steps = step, total
                if iteration in self._slot_of:
                    self._progress[iteration] = (step, total)
                return None
            case ev.NodeFinished(node_id=node_id, status=status, metrics=metrics, error=error,
                                 best_r2=best):
                self.best = best
                detail = f"R2={_r2(metrics.get('final_r2'))}" if status == "done" else (
                    error or status)
                return f"  node {node_id}: {status}, {detail}; best R2 so far {_r2(best)}"
            case ev.IterationSkipped(iteration=iteration, reason=reason):
                return f"  iteration {iteration} skipped: {reason}"
            case ev.AgentCost(cost_usd=cost, total_usd=total):
                return f"  agent cost ${cost:.4f} (run total ${total:.2f})"
            case ev.PolicyViolation(iteration=iteration, error=error):
                return f"  policy violation in iteration {iteration}: {error}"
            case ev.CodeCommitted(node_id=node_id, commit=commit):
                return f"  node {node_id} code committed as {commit[:10]}"
            case ev.NodeReverted(node_id=node_id, reverted_id=reverted):
                return f"  node {node_id} reverts node {reverted} (its parent's code)"
            case ev.ManualEditDetected(path=path, where=where, diff=diff):
                return (f"manual edit of {path} in the {where}:\n{diff.rstrip()}\n"
                        "  adopt it from the TUI, or leave it: nothing is overwritten")
            case ev.ManualEditResolved(path=path, adopted=adopted, node_id=node_id):
                verdict = f"adopted as node {node_id}" if adopted else "ignored"
                return f"manual edit of {path or 'the editable files'} {verdict}"
            case ev.ProposalStale(iteration=iteration, path=path):
                return (f"  the proposal of iteration {iteration} is stale: {path} was edited "
                        "by hand since; review it again")
            case ev.EditedVersionInvalid(error=error):
                return f"  the edited version is invalid, the proposal still waits: {error}"
            case ev.Paused(reason=reason):
                return f"paused: {reason}  (proctor resume {self.run} to continue)"
            case ev.Resumed():
                return "resumed"
            case ev.EngineError(message=message):
                return f"warning: {message}"
            case ev.RunFinished(reason=reason, best_node=best_node, best_r2=best):
                where = f"best node {best_node} (R2 {_r2(best)})" if best_node else "no result"
                return f"finished: {reason}; {where}"
        return None

    def _tagged(self, event: ev.Event, text: str) -> str:
        """`text` about one iteration with that iteration named on its first line, and every
        line led by its slot (`[slot 2] iteration 7: ...`)."""
        iteration = getattr(event, "iteration", None)
        if isinstance(event, ev.CodeCommitted | ev.NodeReverted):
            iteration = event.node_id  # a node's id is its iteration's number
        if not isinstance(iteration, int):
            return text
        slot = self._slot_tag.get(iteration)
        tag = f"[slot {slot}] " if slot is not None else ""
        lines = text.splitlines()
        if isinstance(event, ev.LogLines):
            return "\n".join(f"{tag or f'[iteration {iteration}] '}{line.lstrip()}"
                             for line in lines)
        first = lines[0].strip()
        if not first.startswith(f"iteration {iteration}"):
            first = f"iteration {iteration}: {first}"
        return "\n".join([tag + first, *(tag + line for line in lines[1:])])

    def _line(self, text: str) -> None:
        prefix = "\r\x1b[2K" if self._status_shown else ""
        self._status_shown = False
        self._write(prefix + text + "\n")

    def _status(self) -> None:
        elapsed = time.monotonic() - self.started
        bar = ""
        if self.slots > 1:
            bar = f"  training {len(self._slot_of)}/{self.slots} slots:" + "".join(
                f" [slot {slot}] it {iteration} {self._fraction(iteration)}"
                for iteration, slot in sorted(self._slot_of.items(), key=lambda item: item[1]))
        elif self.steps:
            done = int(20 * self.step / self.steps)
            bar = f" [{'#' * done}{'.' * (20 - done)}] {self.step}/{self.steps}"
        self._write(
            f"\r\x1b[2Kiteration {self.iteration}/{self.total}{bar}  best R2 {_r2(self.best)}"
            f"  elapsed {int(elapsed // 60)}m{int(elapsed % 60):02d}s"
        )
        self._status_shown = not self._closed

    def _fraction(self, iteration: int) -> str:
        step, total = self._progress.get(iteration, (0, 0))
        return f"{step}/{total}" if total else "starting"

    def _write(self, text: str) -> None:
        """Write and flush; a closed reader (EPIPE) ends the printing, and a line that cannot
        be written (a full disk under engine.out) is dropped: never the engine (the journal
        holds what the lines say)."""
        if self._closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self._closed = True
            discard_output(self.stream)
        except OSError:
            pass
