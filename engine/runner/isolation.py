"""Process isolation for training runs, and the one place that kills a run's processes.

What every run gets, in both modes: a new session (its own process group), rlimits (address
space, file size, open files, no core files), stdin on /dev/null, an allow-listed environment,
death with its parent, membership of a containment (see `containment.py`) through which
every process of the run can be found and killed, and the sandbox of `sandbox.py` (its own
namespaces and root, an unprivileged uid, no capabilities, Landlock).

Stdlib only: the subprocess mode runs this very file as a launcher script
(`python -I -S isolation.py SETUP_JSON -- python -m harness ...`), which applies the setup
and then execs the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__:
    from engine.runner import sandbox
else:  # the subprocess launcher (`python -I -S isolation.py`): load the sibling file
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import sandbox

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
    extra: Mapping[str, str], home: str, tmp: str, source: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The environment of a run: allow-listed variables of `source` (default os.environ), the
    caller's extras, HOME and TMPDIR. Returns it with the extra names refused as secrets."""
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
    env["TMPDIR"] = tmp
    return env, refused


def environment_without_secrets(source: Mapping[str, str] | None = None) -> dict[str, str]:
    """`source` (default os.environ) without the variables that look like credentials, nor any
    whose value carries one: what a worker process, a batch submission or a helper child of
    the engine (the tree picture's drawer) may inherit."""
    source = os.environ if source is None else source
    values = [value for name, value in source.items()
              if is_secret_name(name) and len(value) >= 8]  # shorter would match by chance
    return {name: value for name, value in source.items()
            if not is_secret_name(name) and not any(secret in value for secret in values)}


# ---------------------------------------------------------------------------- child setup


@dataclass(frozen=True)
class ChildSetup:
    """Everything a freshly forked run applies to itself before any harness code runs.
    `sandbox` None (no sandbox) exists only for the overhead benchmark's comparison."""

    workspace: str
    memory_bytes: int | None = None
    file_size_bytes: int | None = None
    open_files: int | None = None
    cgroup_dir: str | None = None
    sandbox: sandbox.SandboxSpec | None = None
    results_channel: bool = False  # fd 3 is the results pipe and must stay open
    die_with_parent: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildSetup:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> ChildSetup:
        values = dict(data)
        if values.get("sandbox") is not None:
            values["sandbox"] = sandbox.SandboxSpec.from_dict(values["sandbox"])
        return cls(**values)


_PR_SET_CHILD_SUBREAPER = 36
set_dumpable = sandbox.set_dumpable
set_parent_death_signal = sandbox.set_parent_death_signal


def make_non_dumpable() -> bool:
    """Make this process non-dumpable; False where the OS does not allow it."""
    try:
        set_dumpable(False)
    except (OSError, AttributeError):
        return False
    return True


def become_subreaper() -> bool:
    """Adopt orphaned descendants (so double-forked processes stay findable under us)."""
    try:
        sandbox.prctl(_PR_SET_CHILD_SUBREAPER, 1, "prctl(PR_SET_CHILD_SUBREAPER)")
    except (OSError, AttributeError):
        return False
    return True


def _set_limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def apply_child_setup(setup: ChildSetup) -> None:
    """Apply the setup to the calling process (a run's leader, before any harness code).
    Returns in the process that is to run the harness: with a sandbox, that is H, two forks
    below the caller (see `sandbox.py`), confined and in the workspace.

    Order matters: the cgroup is joined while still privileged; the sandbox comes last."""
    if setup.cgroup_dir is not None:
        Path(setup.cgroup_dir, "cgroup.procs").write_text(str(os.getpid()))
    _set_limit(resource.RLIMIT_CORE, 0)
    if setup.memory_bytes is not None:
        _set_limit(resource.RLIMIT_AS, setup.memory_bytes)
    if setup.file_size_bytes is not None:
        _set_limit(resource.RLIMIT_FSIZE, setup.file_size_bytes)
    if setup.open_files is not None:
        _set_limit(resource.RLIMIT_NOFILE, setup.open_files)
    if setup.die_with_parent:
        set_parent_death_signal(signal.SIGKILL)
    if setup.sandbox is None:
        sandbox.drop_privileges()
        os.chdir(setup.workspace)
    else:
        sandbox.enter(setup.sandbox)


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
    """Kill what is left of a run whose supervisor died, from its recorded identity (which a
    crash may have left stale, and which proctor does not take on trust): every member of its
    cgroup when that is a real proctor run cgroup, and its leader's process group only when
    the leader is provably the run's (see `_is_run_leader`). Returns whether anything was
    killed."""
    cgroup = identity.cgroup if identity.cgroup and _is_proctor_cgroup(identity.cgroup) else None
    leader_is_ours = _is_run_leader(identity, cgroup)

    def members() -> set[int]:
        found = cgroup_members(cgroup) if cgroup else set()
        if leader_is_ours and is_running(identity.pid, identity.start_time):
            found.add(identity.pid)
        return found

    killed = kill_run_now(identity.pgid if leader_is_ours else None, members)
    if cgroup:
        with contextlib.suppress(OSError):  # still busy, or already gone
            os.rmdir(cgroup)
    return killed


def _is_run_leader(identity: ProcessIdentity, cgroup: str | None) -> bool:
    """Whether identity.pid is still that run's leader: the same start time, its own session
    and group leader, the sandbox's namespaces made below it, and a member of the run's cgroup
    where the run had one. A recycled pid or a forged identity fails one of these."""
    stat = read_stat(identity.pid)
    if stat is None or not stat.running or stat.start_time != identity.start_time:
        return False
    if not (stat.pid == stat.pgid == stat.sid == identity.pgid):
        return False
    if identity.cgroup and (cgroup is None or identity.pid not in cgroup_members(cgroup)):
        return False
    return _made_pid_namespace(identity.pid)


def _made_pid_namespace(pid: int) -> bool:
    """Whether the process unshared a PID namespace for its children (as a sandboxed run's
    leader does, and an unrelated process does not)."""
    try:
        own = os.readlink(f"/proc/{pid}/ns/pid")
        children = os.readlink(f"/proc/{pid}/ns/pid_for_children")
    except OSError:
        return False
    return own != children


def _is_proctor_cgroup(path: str) -> bool:
    resolved = os.path.realpath(path)
    return resolved.startswith("/sys/fs/cgroup/") and "/proctor/run-" in resolved


# ---------------------------------------------------------------------------- launcher


def _launch(argv: list[str]) -> None:
    """Script entry: apply the setup, close inherited descriptors (but the results channel),
    exec the command in the harness process."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: isolation.py SETUP_JSON -- COMMAND...", file=sys.stderr)
        os._exit(2)
    try:
        setup = ChildSetup.from_json(argv[0])
        apply_child_setup(setup)
    except (OSError, ValueError, TypeError) as exc:
        print(f"{SETUP_FAILED_PREFIX} {exc}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED_EXIT)
    os.closerange(4 if setup.results_channel else 3, os.sysconf("SC_OPEN_MAX"))
    command = argv[2:]
    os.execv(command[0], command)


if __name__ == "__main__":
    _launch(sys.argv[1:])
