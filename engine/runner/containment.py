"""How the supervisor finds every process of a run, and caps how many it may have.

Preferred: one cgroup per run under a `pids` controller (v2, or v1 as on this host), created
by the supervisor and joined by the run's leader before any harness code runs. `pids.max`
enforces the process limit in the kernel (a fork beyond it fails with EAGAIN) and
`cgroup.procs` lists every member however it detached (setsid, double fork). Needs a writable
/sys/fs/cgroup, which in practice means root.

Fallback: process-tree tracking. Members are the descendants of a walk root (the leader, or
in zygote mode the zygote, which is a child subreaper and so adopts the run's orphans),
every process seen in an earlier walk (matched by start time) and the run's process group.
A watchdog polls them and the run is killed above the limit. In subprocess mode a process
that double-forks and detaches between two polls (0.25 s) can escape.

Both count tasks the way the kernel's pids controller does: threads included.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

from engine.runner import isolation

ContainmentChoice = Literal["auto", "cgroup", "process-tree"]
_run_numbers = itertools.count()


class Containment(ABC):
    """The set of processes that belong to one run."""

    cgroup_dir: str | None = None

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.pgid: int | None = None

    def attach(self, leader: int, walk_root: int) -> None:
        """Record the run's leader (its pgid: it is a session leader) and the walk root."""
        self.pgid = leader

    @abstractmethod
    def members(self) -> set[int]:
        """Live (non-zombie) processes of the run now."""

    def poll(self) -> None:  # noqa: B027 (most containments have nothing to refresh)
        """Refresh whatever tracking needs refreshing (called every ~0.25 s)."""

    @abstractmethod
    def limit_exceeded(self) -> bool:
        """Whether the run has hit its process limit."""

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release the containment once nothing of the run is left."""


class CgroupContainment(Containment):
    def __init__(self, directory: Path, limit: int | None) -> None:
        super().__init__(limit)
        self.cgroup_dir = str(directory)
        (directory / "pids.max").write_text("max" if limit is None else str(limit))

    def members(self) -> set[int]:
        return isolation.cgroup_members(self.cgroup_dir)

    def limit_exceeded(self) -> bool:
        try:
            events = Path(self.cgroup_dir, "pids.events").read_text().split()
        except OSError:
            return False
        # "max N": how many forks the limit has refused.
        return "max" in events and int(events[events.index("max") + 1]) > 0

    def close(self) -> None:
        # A survivor we could not kill keeps it busy; kill_orphan or a later start cleans up.
        with contextlib.suppress(OSError):
            os.rmdir(self.cgroup_dir)


class TreeContainment(Containment):
    def __init__(self, limit: int | None) -> None:
        super().__init__(limit)
        self._root: int | None = None
        self._include_root = True
        self._seen: dict[int, int] = {}  # pid -> start time
        self._tasks = 0

    def attach(self, leader: int, walk_root: int) -> None:
        super().attach(leader, walk_root)
        self._root = walk_root
        self._include_root = walk_root == leader
        self.poll()

    def _walk(self) -> list[isolation.ProcStat]:
        if self._root is None:
            return []
        found = []
        stack = [self._root]
        while stack:
            pid = stack.pop()
            stat = isolation.read_stat(pid)
            if stat is None:
                continue
            if (pid != self._root or self._include_root) and stat.running:
                found.append(stat)
            stack.extend(isolation.children_of(pid))
        return found

    def poll(self) -> None:
        found = self._walk()
        for stat in found:
            self._seen[stat.pid] = stat.start_time
        self._tasks = sum(stat.threads for stat in found)

    def members(self) -> set[int]:
        live = {stat.pid for stat in self._walk()}
        live |= {pid for pid, start in self._seen.items() if isolation.is_running(pid, start)}
        if self.pgid is not None:
            live |= {p.pid for p in isolation.all_processes() if p.pgid == self.pgid and p.running}
        return live

    def limit_exceeded(self) -> bool:
        return self.limit is not None and self._tasks > self.limit


def _own_cgroup_dirs() -> list[Path]:
    """Our own cgroup's directory in each writable hierarchy with a pids controller,
    cgroup v2 first."""
    own: dict[str, str] = {}  # controller list ("" for v2) -> our path
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    v2: list[Path] = []
    v1: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        mount_root, mount_point, fstype, options = fields[3], fields[4], tail[0], tail[2]
        if fstype == "cgroup2" and "" in own:
            relative = os.path.relpath(own[""], mount_root)
            v2.append(Path(mount_point, relative))
        elif fstype == "cgroup" and "pids" in options.split(","):
            for controllers, path in own.items():
                if "pids" in controllers.split(","):
                    v1.append(Path(mount_point, os.path.relpath(path, mount_root)))
    return [d.resolve() for d in v2 + v1]


def _prepare_base(own_dir: Path) -> Path:
    """`proctor/` under our cgroup, ready for per-run children with a pids controller."""
    if (own_dir / "cgroup.controllers").exists():  # v2: enable pids for our children
        if "pids" not in (own_dir / "cgroup.controllers").read_text().split():
            raise OSError("no pids controller")
        base = own_dir / "proctor"
        base.mkdir(exist_ok=True)
        (own_dir / "cgroup.subtree_control").write_text("+pids")
        (base / "cgroup.subtree_control").write_text("+pids")
    else:
        base = own_dir / "proctor"
        base.mkdir(exist_ok=True)
    probe = base / f"run-{os.getpid()}-probe"
    probe.mkdir(exist_ok=True)
    try:
        (probe / "pids.max").write_text("max")
    finally:
        probe.rmdir()
    _remove_stale(base)
    return base


def _remove_stale(base: Path) -> None:
    """Empty run cgroups left by supervisors that are gone (busy ones stay for kill_orphan)."""
    for child in base.glob("run-*"):
        owner = child.name.split("-")[1]
        if owner.isdigit() and not isolation.is_running(int(owner)):
            try:
                child.rmdir()
            except OSError:
                continue


@functools.cache
def cgroup_base() -> tuple[Path | None, str]:
    """Where per-run cgroups go, or None with the reason none can be made here."""
    reasons = []
    try:
        candidates = _own_cgroup_dirs()
    except (OSError, ValueError, IndexError) as exc:
        return None, f"cannot read the cgroup layout: {exc}"
    for own_dir in candidates:
        try:
            return _prepare_base(own_dir), ""
        except OSError as exc:
            reasons.append(f"{own_dir}: {exc.strerror or exc}")
    return None, "; ".join(reasons) or "no cgroup hierarchy with a pids controller"


def make_containment(
    choice: ContainmentChoice, limit: int | None
) -> tuple[Containment, str | None]:
    """A containment for one run, with a warning when the preferred kind is not available."""
    if choice != "process-tree":
        base, reason = cgroup_base()
        if base is not None:
            directory = base / f"run-{os.getpid()}-{next(_run_numbers)}"
            try:
                directory.mkdir()
                return CgroupContainment(directory, limit), None
            except OSError as exc:
                reason = f"{directory}: {exc}"
        if choice == "cgroup":
            raise RuntimeError(f"no usable cgroup for runs: {reason}")
        return TreeContainment(limit), (
            "no writable cgroup with a pids controller; runs are tracked by process tree "
            f"(a double-forked process may escape) ({reason})"
        )
    return TreeContainment(limit), None
