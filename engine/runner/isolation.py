"""Process isolation for training runs, and the one place that kills a run's processes.

What every run gets, in both modes: a new session (its own process group), rlimits (address
space, file size, open files, no core files), stdin on /dev/null, an allow-listed environment
with a scratch HOME, a fresh network namespace where the OS allows it, no capabilities and
no_new_privs when started as root, death with its parent, and membership of a containment
(see `containment.py`) through which every process of the run can be found and killed.

Stdlib only: the subprocess mode runs this very file as a launcher script
(`python -I -S isolation.py SETUP_JSON -- python -m harness ...`), which applies the setup
and then execs the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

SETUP_FAILED_EXIT = 125
SETUP_FAILED_PREFIX = "proctor runner: isolation setup failed:"

# ---------------------------------------------------------------------------- environment

_ALLOWED_NAMES = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "LD_LIBRARY_PATH",
        "PYTHONHASHSEED",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "CUBLAS_WORKSPACE_CONFIG",
    }
)
_ALLOWED_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "TORCH_", "PYTORCH_", "NVIDIA_")
_SECRET_NAME = re.compile(r"^ANTHROPIC_|KEY|SECRET|TOKEN|PASSW|CREDENTIAL", re.IGNORECASE)
# Set for every run, after the caller's extras, so nothing can switch them off.
_FIXED = {
    "PYTHONUNBUFFERED": "1",  # the log streams live
    "PYTHONDONTWRITEBYTECODE": "1",  # no stale .pyc can shadow an edit made within the same second
    "PYTHONFAULTHANDLER": "1",  # a segfault leaves a Python stack in the log
    "PYTHONNOUSERSITE": "1",
}


def is_secret_name(name: str) -> bool:
    """Whether a variable name looks like it holds a credential (never passed to a run)."""
    return bool(_SECRET_NAME.search(name))


def _is_allowed_name(name: str) -> bool:
    return name in _ALLOWED_NAMES or name.startswith(_ALLOWED_PREFIXES)


def build_environment(
    extra: Mapping[str, str], home: str, source: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The environment of a run: allow-listed variables of `source` (default os.environ), the
    caller's extras, a scratch HOME/TMPDIR. Returns it with the extra names refused as secrets."""
    source = os.environ if source is None else source
    secret_values = [v for k, v in source.items() if is_secret_name(k) and len(v) >= 8]
    env = {k: v for k, v in source.items() if _is_allowed_name(k) and not is_secret_name(k)}
    refused = []
    for name, value in extra.items():
        if is_secret_name(name):
            refused.append(name)
        else:
            env[name] = str(value)
    # A secret pasted into an innocent-looking variable stays out too.
    env = {k: v for k, v in env.items() if not any(s in v for s in secret_values)}
    env.setdefault("PATH", os.defpath)
    env.update(_FIXED)
    env["HOME"] = home
    env["TMPDIR"] = str(Path(home) / "tmp")
    return env, refused


# ---------------------------------------------------------------------------- child setup


@dataclass(frozen=True)
class ChildSetup:
    """Everything a freshly forked run applies to itself before any harness code runs."""

    workspace: str
    memory_bytes: int | None = None
    file_size_bytes: int | None = None
    open_files: int | None = None
    cgroup_dir: str | None = None
    new_network: bool = False
    drop_privileges: bool = False
    die_with_parent: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildSetup:
        return cls(**json.loads(text))


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CLONE_NEWNET = 0x40000000


def _prctl(option: int, arg: int, what: str) -> None:
    prctl = _c().prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _check(prctl(option, arg, 0, 0, 0), what)


def set_dumpable(dumpable: bool) -> None:
    """PR_SET_DUMPABLE: a non-dumpable process's /proc files (environ, mem) are closed to
    same-user processes without CAP_SYS_PTRACE, i.e. to the runs."""
    _prctl(_PR_SET_DUMPABLE, int(dumpable), "prctl(PR_SET_DUMPABLE)")


def make_non_dumpable() -> bool:
    """Make this process non-dumpable; False where the OS does not allow it."""
    try:
        set_dumpable(False)
    except (OSError, AttributeError):
        return False
    return True


def set_parent_death_signal(sig: int) -> None:
    """Receive `sig` when the parent (thread) that forked us exits."""
    _prctl(_PR_SET_PDEATHSIG, sig, "prctl(PR_SET_PDEATHSIG)")


def become_subreaper() -> bool:
    """Adopt orphaned descendants (so double-forked processes stay findable under us)."""
    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1, "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError):
        return False
    return True


def _unshare_network() -> None:
    unshare = _c().unshare
    unshare.argtypes = [ctypes.c_int]
    _check(unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_privileges() -> None:
    """Drop every capability (bounding set too, so an exec as uid 0 regains none) and set
    no_new_privs. Without CAP_SYS_PTRACE a root child cannot read a non-dumpable parent's
    /proc/<pid>/environ."""
    if os.geteuid() == 0:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for cap in range(last + 1):
            try:
                _prctl(_PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")
            except OSError:
                break  # no CAP_SETPCAP (a restricted container): the capset below still holds
        with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
            _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT)")
        header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (_CapData * 2)()
        _check(_c().capset(ctypes.byref(header), data), "capset")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def _set_limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def apply_child_setup(setup: ChildSetup) -> None:
    """Apply the setup to the calling process (a run's leader, before any harness code).

    Order matters: cgroup and network namespace need privileges that are dropped last."""
    if setup.cgroup_dir is not None:
        Path(setup.cgroup_dir, "cgroup.procs").write_text(str(os.getpid()))
    if setup.new_network:
        _unshare_network()
    _set_limit(resource.RLIMIT_CORE, 0)
    if setup.memory_bytes is not None:
        _set_limit(resource.RLIMIT_AS, setup.memory_bytes)
    if setup.file_size_bytes is not None:
        _set_limit(resource.RLIMIT_FSIZE, setup.file_size_bytes)
    if setup.open_files is not None:
        _set_limit(resource.RLIMIT_NOFILE, setup.open_files)
    if setup.die_with_parent:
        set_parent_death_signal(signal.SIGKILL)
    if setup.drop_privileges:
        _drop_privileges()
    os.chdir(setup.workspace)


@functools.cache
def network_isolation_problem() -> str | None:
    """None when runs can get a fresh network namespace here, else why not (probed once)."""
    try:
        completed = subprocess.run(
            [sys.executable, "-I", "-S", __file__, "--probe-network"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probe failed: {exc}"
    if completed.returncode == 0:
        return None
    return completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "unknown"


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessIdentity:
    """Who a run's leader is, stable against pid reuse (start_time: /proc/<pid>/stat field 22);
    `cgroup` is the run's cgroup directory when it has one."""

    pid: int
    pgid: int
    start_time: int
    cgroup: str | None = None


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    threads: int
    start_time: int

    @property
    def running(self) -> bool:
        """Not a zombie: a zombie has already let go of everything but its exit status."""
        return self.state not in ("Z", "X", "x")


def read_stat(pid: int) -> ProcStat | None:
    """The /proc/<pid>/stat facts of a process, or None when it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        threads=int(fields[17]),
        start_time=int(fields[19]),
    )


def is_running(pid: int, start_time: int | None = None) -> bool:
    """Whether pid is a live (non-zombie) process, with that start time if one is given."""
    stat = read_stat(pid)
    if stat is None or not stat.running:
        return False
    return start_time is None or stat.start_time == start_time


def all_processes() -> list[ProcStat]:
    """A snapshot of every process visible in /proc."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                out.append(stat)
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of a process (all its threads'), from /proc/<pid>/task/*/children."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out.extend(int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class ExitInfo:
    """How a run's leader ended: a raw wait status and peak RSS, or why neither is known."""

    wait_status: int | None
    maxrss_kb: int | None = None
    lost: str | None = None


async def wait_for_exit(pid: int) -> ExitInfo:
    """Reap our child `pid` without blocking the loop (pidfd where available, else a thread)."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        _, status, usage = await loop.run_in_executor(None, os.wait4, pid, 0)
        return ExitInfo(status, usage.ru_maxrss)
    readable = loop.create_future()
    loop.add_reader(pidfd, lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    _, status, usage = os.wait4(pid, 0)
    return ExitInfo(status, usage.ru_maxrss)


# ---------------------------------------------------------------------------- killing
# The one place that sends signals to a run's processes.


def signal_run(pgid: int | None, pids: Iterable[int], sig: int) -> None:
    """Send `sig` to a run's process group (if given) and to each of `pids`; processes that
    are already gone are skipped."""
    if pgid is not None and pgid > 1:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def terminate_run(
    pgid: int,
    members: Callable[[], set[int]],
    grace_s: float,
    leader_done: Callable[[], bool],
) -> None:
    """SIGTERM the run's group and members, wait up to `grace_s` for all of them to go, then
    SIGKILL whatever is left until nothing remains (or 10 s pass)."""
    signal_run(pgid, members(), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if leader_done() and not members():
            return
        await asyncio.sleep(0.02)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        left = members()
        signal_run(pgid, left, signal.SIGKILL)
        if not left:
            return
        await asyncio.sleep(0.01)


def kill_run_now(
    pgid: int | None, members: Callable[[], set[int]], deadline_s: float = 5.0
) -> bool:
    """SIGKILL a run's group and members until none remain; True if any were found."""
    found = False
    deadline = time.monotonic() + deadline_s
    while True:
        left = members()
        signal_run(pgid, left, signal.SIGKILL)
        if not left or time.monotonic() > deadline:
            return found or bool(left)
        found = True
        time.sleep(0.01)


def cgroup_members(cgroup_dir: str) -> set[int]:
    """Live processes listed in a cgroup."""
    try:
        text = Path(cgroup_dir, "cgroup.procs").read_text()
    except OSError:
        return set()
    return {pid for pid in map(int, text.split()) if is_running(pid)}


def kill_orphan(identity: ProcessIdentity) -> bool:
    """Kill what is left of a run whose supervisor died: its process group when the leader pid
    still exists with the same start time (a recycled pid is never hit), and every process of
    its cgroup. With the leader gone, only group members started after it are killed.
    Returns whether anything was killed."""
    leader = read_stat(identity.pid)
    if leader is not None and leader.start_time != identity.start_time:
        leader_matches = False
        group_usable = False  # the pid was recycled: its group is someone else's
    else:
        leader_matches = leader is not None and leader.running
        group_usable = True

    def members() -> set[int]:
        found = set()
        if identity.cgroup and _is_proctor_cgroup(identity.cgroup):
            found |= cgroup_members(identity.cgroup)
        if group_usable:
            found |= {
                p.pid
                for p in all_processes()
                if p.pgid == identity.pgid and p.running and p.start_time >= identity.start_time
            }
        return found

    killed = kill_run_now(identity.pgid if leader_matches else None, members)
    if identity.cgroup and _is_proctor_cgroup(identity.cgroup):
        with contextlib.suppress(OSError):  # still busy, or already gone
            os.rmdir(identity.cgroup)
    return killed or leader_matches


def _is_proctor_cgroup(path: str) -> bool:
    resolved = os.path.realpath(path)
    return resolved.startswith("/sys/fs/cgroup/") and "/proctor/run-" in resolved


# ---------------------------------------------------------------------------- launcher


def _launch(argv: list[str]) -> None:
    """Script entry: apply the setup, close inherited descriptors, exec the command."""
    if argv[:1] == ["--probe-network"]:
        try:
            _unshare_network()
        except OSError as exc:
            print(exc, file=sys.stderr)
            os._exit(1)
        os._exit(0)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: isolation.py SETUP_JSON -- COMMAND...", file=sys.stderr)
        os._exit(2)
    try:
        apply_child_setup(ChildSetup.from_json(argv[0]))
    except (OSError, ValueError, TypeError) as exc:
        print(f"{SETUP_FAILED_PREFIX} {exc}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED_EXIT)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    command = argv[2:]
    os.execv(command[0], command)


if __name__ == "__main__":
    _launch(sys.argv[1:])
