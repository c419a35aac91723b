"""The sandbox of every run: namespaces, a new root, an unprivileged uid and Landlock, applied
in forked children (no exec needed, so the zygote keeps its speed).

A sandboxed run is three processes:

  L  the run's leader, what the supervisor sees. It unshares a user namespace (when not root)
     and mount, PID, network, IPC and cgroup namespaces, forks I and only waits: it forwards
     SIGTERM/SIGINT to I and ends exactly as H ended (same exit code, or same signal).
  I  pid 1 of the new PID namespace; trusted, no run code ever runs in it. It builds the new
     root, forks H, reaps, reports H's wait status to L and exits; with it the kernel kills
     every process left in the namespace, so nothing of a run outlives it.
  H  the harness: becomes an unprivileged uid (when root and untrusted), drops every
     capability, sets no_new_privs, restricts itself with Landlock and returns to the caller,
     which runs the harness.

The new root holds, at their own paths, the system directories and the Python installation
read-only, the request's read-only and read-write paths, a private /tmp and /dev/shm, a
minimal /dev and a fresh /proc; everything else (the checkout, the run folders, the home and
its keys) does not exist inside. Where the OS lacks a layer, what is possible is applied, the
run's output says what is missing, and `probe()` reports it for `proctor doctor` and the run
warnings.

Stdlib + ctypes only: the subprocess launcher loads this file as a script, and the probe runs
it as `python -I -S sandbox.py --probe`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import json
import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

SANDBOX_UID = 65534  # nobody: an untrusted run's uid when proctor runs as root
MISSING_PREFIX = "proctor sandbox: layer missing: "  # what a run prints first when it lacks one
_STATUS_BYTES = 4

# ---------------------------------------------------------------------------- syscalls

_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_RELATIME = 1 << 21
_MNT_DETACH = 2
# statvfs f_flag bit -> the mount flag that keeps it; locked on mounts from a more privileged
# namespace, so a remount must repeat them (as bubblewrap does).
_KEPT_FLAGS = {1: _MS_RDONLY, 2: _MS_NOSUID, 4: _MS_NODEV, 8: _MS_NOEXEC, 16: 16, 64: 64,
               1024: 1024, 2048: 2048, 4096: _MS_RELATIME}

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYSCALLS = {  # the Landlock numbers are the same on every architecture
    "x86_64": {"pivot_root": 155},
    "aarch64": {"pivot_root": 41},
}
_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_ADD_RULE = 445
_LANDLOCK_RESTRICT_SELF = 446

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library, loaded once, with errno kept."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.unshare.argtypes = [ctypes.c_int]
    return _libc


def check(result: int, what: str) -> int:
    """Raise OSError with errno when a libc call failed (returned -1)."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg: int, what: str) -> None:
    """prctl(option, arg, 0, 0, 0), raising OSError on failure."""
    check(libc().prctl(option, arg, 0, 0, 0), what)


def set_parent_death_signal(sig: int) -> None:
    """Receive `sig` when the parent (thread) that forked us exits."""
    prctl(_PR_SET_PDEATHSIG, sig, "prctl(PR_SET_PDEATHSIG)")


def set_dumpable(dumpable: bool) -> None:
    """PR_SET_DUMPABLE: a non-dumpable process's /proc files (environ, mem) are closed to
    same-user processes without CAP_SYS_PTRACE."""
    prctl(_PR_SET_DUMPABLE, int(dumpable), "prctl(PR_SET_DUMPABLE)")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    result = libc().mount(encode(source), target.encode(), encode(fstype), flags, encode(data))
    check(result, f"mount {source or fstype} on {target}")


def _pivot_root(new_root: str, put_old: str) -> None:
    number = _SYSCALLS.get(platform.machine(), {}).get("pivot_root")
    if number is None:
        raise OSError(0, f"pivot_root: unknown syscall number on {platform.machine()}")
    check(libc().syscall(number, new_root.encode(), put_old.encode()), "pivot_root")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_privileges(run_as: int | None = None) -> None:
    """Drop every capability (bounding and ambient sets too, so no exec regains one), become
    `run_as` (uid and gid, no supplementary groups) when given, and set no_new_privs."""
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        last = int(handle.read())
    for cap in range(last + 1):  # needs CAP_SETPCAP, so before any uid change
        try:
            prctl(_PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")
        except OSError:
            break  # no CAP_SETPCAP (a normal user): there is nothing to drop
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT)")
    if run_as is not None:
        os.setgroups([])
        os.setresgid(run_as, run_as, run_as)
        os.setresuid(run_as, run_as, run_as)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    check(libc().capset(ctypes.byref(header), (_CapData * 2)()), "capset")
    prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


# ---------------------------------------------------------------------------- Landlock

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REFER = 1 << 13
_FS_TRUNCATE = 1 << 14
_FS_IOCTL_DEV = 1 << 15
_FS_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP = 1 << 0
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1
READ = _FS_READ_FILE | _FS_READ_DIR | _FS_EXECUTE
DEVICE = _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    result = libc().syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    return max(result, 0)


def _all_fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute ... make_sym
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


@dataclass
class Ruleset:
    """A Landlock ruleset being built: every file right of the running ABI handled, TCP bind
    and connect handled with no rule (ABI >= 4), abstract sockets and signals scoped (ABI >= 6)."""

    abi: int
    fd: int
    handled: int

    @classmethod
    def create(cls) -> Ruleset:
        abi = landlock_abi()
        if abi < 1:
            raise OSError(0, "Landlock is not available in this kernel")
        handled = _all_fs_rights(abi)
        attr = _RulesetAttr(
            handled,
            _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
            _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0,
        )
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        fd = check(libc().syscall(_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                                  ctypes.c_size_t(size), ctypes.c_uint32(0)),
                   "landlock_create_ruleset")
        return cls(abi, fd, handled)

    def allow(self, path: str, rights: int) -> None:
        """Allow `rights` beneath `path` (file rights only, when it is not a directory)."""
        try:
            path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # not there: nothing to grant (a missing rule only ever denies more)
        try:
            if not stat.S_ISDIR(os.fstat(path_fd).st_mode):
                rights &= _FS_FILE_RIGHTS
            rule = _PathBeneathAttr(rights & self.handled, path_fd)
            check(libc().syscall(_LANDLOCK_ADD_RULE, self.fd, 1, ctypes.byref(rule), 0),
                  f"landlock_add_rule {path}")  # 1: LANDLOCK_RULE_PATH_BENEATH
        finally:
            os.close(path_fd)

    def restrict_self(self) -> None:
        """Enforce the ruleset on this process and its future children (needs no_new_privs)."""
        try:
            check(libc().syscall(_LANDLOCK_RESTRICT_SELF, self.fd, 0), "landlock_restrict_self")
        finally:
            os.close(self.fd)


def landlock_coverage(abi: int) -> dict[str, str | None]:
    """For each Landlock layer: None when this ABI provides it, else why not."""
    def needs(version: int) -> str | None:
        if abi >= version:
            return None
        return "Landlock is missing" if abi < 1 else f"needs Landlock ABI {version}, have {abi}"

    return {"landlock files": needs(1), "landlock network": needs(4),
            "landlock scoping": needs(6)}


# ---------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class SandboxSpec:
    """What a run may see. Paths are absolute host paths and appear at the same place inside."""

    workspace: str
    read_only: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()
    python_paths: tuple[str, ...] = ()  # the interpreter's directories: read-only
    run_as: int | None = None  # uid and gid the harness becomes (only when started as root)
    scratch: str | None = None  # a writable HOME for when no new root can be built
    tmp_mb: int = 4096  # each private tmpfs (/tmp, /dev/shm): memory the run could pin

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SandboxSpec:
        values = dict(data)
        for name in ("read_only", "read_write", "hide", "python_paths"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@functools.cache
def python_paths() -> tuple[str, ...]:
    """The directories of this Python installation a run needs: the prefixes, the real
    directory of the interpreter and the installation's library folders. Never sys.path as
    such: it holds the working folder proctor was started from (a project, its .git)."""
    found = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                           sys.base_exec_prefix)}
    found.add(os.path.dirname(os.path.realpath(sys.executable)))
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        found.add(os.path.realpath(sysconfig.get_path(name)))
    return tuple(sorted(path for path in found if os.path.isdir(path)))


# ---------------------------------------------------------------------------- the new root

_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps/*", "/dev/dri/*")
_DEV_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
              "/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2"}
_OLD_ROOT = "/oldroot"
_BIND_KINDS = ("ro", "rw")


@dataclass(frozen=True)
class Mount:
    """One entry of the new root: kind is ro/rw (a bind of the same host path), dev (a bind
    of a device node), tmpfs, proc, sys, link (a symlink to `source`) or mask (hides it)."""

    target: str
    kind: str
    source: str = ""

    @property
    def depth(self) -> int:
        return self.target.rstrip("/").count("/")


def plan_root(spec: SandboxSpec) -> list[Mount]:
    """The new root's entries in mount order (parents before children, masks last); computed
    on the host view, before any namespace exists."""
    hidden = [os.path.realpath(p) for p in spec.hide]
    wanted: dict[str, Mount] = {}
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            wanted[path] = Mount(path, "link", os.readlink(path))
        elif os.path.isdir(path):
            wanted[path] = Mount(path, "ro")
    for kind, paths in (("ro", (*spec.python_paths, *spec.read_only)),
                        ("rw", (spec.workspace, *spec.read_write))):
        for path in paths:
            real = os.path.realpath(path)
            if os.path.exists(real) and not any(_inside(real, h) for h in hidden):
                wanted[real] = Mount(real, kind)
    for path, size_mb in (("/tmp", spec.tmp_mb), ("/dev", 1), ("/dev/shm", spec.tmp_mb)):
        wanted[path] = Mount(path, "tmpfs", f"{size_mb}m")
    wanted["/proc"] = Mount("/proc", "proc")
    wanted["/sys"] = Mount("/sys", "sys")
    for pattern in (*_DEVICES, *_GPU_DEVICES):
        for node in glob.glob(pattern):
            if stat.S_ISCHR(os.stat(node).st_mode):
                wanted[node] = Mount(node, "dev")
    for link, target in _DEV_LINKS.items():
        wanted[link] = Mount(link, "link", target)
    ordered = _without_redundant(sorted(wanted.values(), key=lambda m: m.depth))
    masks = [Mount(h, "mask") for h in hidden if os.path.exists(h) and _exposed(h, ordered)]
    return ordered + masks


def _container(path: str, mounts: Iterable[Mount]) -> Mount | None:
    """The deepest entry whose target contains `path`."""
    best = None
    for mount in mounts:
        if _inside(path, mount.target) and (best is None or mount.depth >= best.depth):
            best = mount
    return best


def _without_redundant(ordered: list[Mount]) -> list[Mount]:
    """Drop binds that lie inside a bind of the same kind (nothing different in between)."""
    kept: list[Mount] = []
    for mount in ordered:
        parent = _container(mount.target, kept)
        if mount.kind in _BIND_KINDS and parent is not None and parent.kind == mount.kind:
            continue
        kept.append(mount)
    return kept


def _exposed(path: str, mounts: list[Mount]) -> bool:
    parent = _container(path, mounts)
    return parent is not None and parent.kind in _BIND_KINDS


def pivot_to_tmpfs() -> None:
    """In I (new mount namespace): make a tmpfs the root, the host tree at /oldroot. Fails
    (OSError) before anything is changed where the OS refuses mounts."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    # Like bubblewrap: a tmpfs over /tmp becomes the root, and the host's /tmp stays
    # reachable under /oldroot for the binds.
    _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755")
    os.mkdir("/tmp" + _OLD_ROOT, 0o755)
    os.chdir("/tmp")
    _pivot_root(".", _OLD_ROOT.lstrip("/"))
    os.chdir("/")


def populate_root(plan: list[Mount]) -> list[str]:
    """Make the planned entries, detach the host tree and seal the mounts. Returns what could
    not be provided (a fresh /proc or /sys); any other failure raises (the run cannot start)."""
    problems = []
    for mount in plan:
        problem = _make(mount)
        if problem:
            problems.append(problem)
    check(libc().umount2(_OLD_ROOT.encode(), _MNT_DETACH), "umount old root")
    os.rmdir(_OLD_ROOT)
    _seal(plan)
    return problems


def _make(mount: Mount) -> str | None:
    target = mount.target
    if mount.kind == "link":
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        os.symlink(mount.source, target)
    elif mount.kind == "tmpfs":
        os.makedirs(target, 0o755, exist_ok=True)
        mode = "0755" if target == "/dev" else "1777"
        _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode={mode},size={mount.source}")
    elif mount.kind == "proc":
        os.makedirs(target, 0o755, exist_ok=True)
        try:
            _mount("proc", target, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        except OSError as exc:
            return f"proc: a fresh /proc cannot be mounted ({exc.strerror})"
    elif mount.kind == "sys":
        os.makedirs(target, 0o755, exist_ok=True)
        return _mount_sys(target)
    elif mount.kind == "mask":
        _mask(target)
    else:
        _bind(_OLD_ROOT + target, target)
    return None


def _bind(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if not os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    _mount(source, target, None, _MS_BIND | _MS_REC)


def _mount_sys(target: str) -> str | None:
    """/sys without what is mounted beneath it (cgroupfs above all): a non-recursive bind,
    or, where that is refused (in a user namespace), a fresh read-only sysfs."""
    try:
        _mount(_OLD_ROOT + "/sys", target, None, _MS_BIND)
        return None
    except OSError:
        pass
    try:
        _mount("sysfs", target, "sysfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError as exc:
        return f"sys: /sys is not available inside ({exc.strerror})"
    return None


def _mask(target: str) -> None:
    if os.path.isdir(target):
        _mount("tmpfs", target, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "mode=0755")
    else:
        _mount(_OLD_ROOT + "/dev/null", target, None, _MS_BIND)


def _seal(plan: list[Mount]) -> None:
    """Remount every bind (host submounts included) nosuid/nodev, read-only where the plan
    says so, keeping the flags the source mount has locked; then the root read-only."""
    for point in _mount_points():
        owner = _container(point, plan)
        if owner is None or owner.kind not in (*_BIND_KINDS, "sys", "mask"):
            continue
        flags = _MS_NOSUID | _MS_NODEV | (0 if owner.kind == "rw" else _MS_RDONLY)
        _remount(point, flags)
    _remount("/", _MS_RDONLY)


def _remount(point: str, flags: int) -> None:
    kept = os.statvfs(point).f_flag
    for bit, flag in _KEPT_FLAGS.items():
        if kept & bit:
            flags |= flag
    _mount(None, point, None, _MS_REMOUNT | _MS_BIND | flags)


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4]
            points.append(point.encode().decode("unicode_escape"))  # \040 for a space
    return list(dict.fromkeys(points))


# ---------------------------------------------------------------------------- the processes


@dataclass
class Confinement:
    """What the harness process got: the Landlock ABI in force (0: none) and each layer that
    is missing, with why."""

    landlock_abi: int = 0
    missing: dict[str, str] = field(default_factory=dict)


def enter(spec: SandboxSpec) -> Confinement:
    """Sandbox the calling process (a run's leader, single-threaded, after its rlimits and
    cgroup). Returns only in H, confined, with cwd = the workspace; L and I never return."""
    plan = plan_root(spec)
    flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWCGROUP
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        flags |= _CLONE_NEWUSER
    try:
        check(libc().unshare(flags), "unshare")
    except OSError as exc:
        reason = f"no namespaces ({exc.strerror or exc}); Landlock alone"
        missing = {name: reason for name in ("pid namespace", "proc", "network namespace",
                                              "filesystem view")}
        return _confine(spec, plan, root_built=False, missing=missing)
    if uid != 0:
        _map_ids(uid, gid)
    set_parent_death_signal(signal.SIGKILL)  # a credential change may have cleared it
    return _fork_init(spec, plan)


def _map_ids(uid: int, gid: int) -> None:
    """In a fresh user namespace: keep our own uid and gid (the only ones we may map)."""
    # A non-dumpable process's /proc files are root's (a zygote's child is one): we could
    # not write our own maps.
    set_dumpable(True)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)
    set_dumpable(False)


_FORWARDED = (signal.SIGTERM, signal.SIGINT)


def _fork_init(spec: SandboxSpec, plan: list[Mount]) -> Confinement:
    status_read, status_write = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)  # until each side has its handlers
    init = os.fork()
    if init != 0:
        os.close(status_write)
        _mirror(init, status_read)
    os.close(status_read)
    return _init(spec, plan, status_write)


def _forward_to(pid: int) -> None:
    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)


def _mirror(init: int, status_read: int) -> None:
    """L: wait for I, then end the way H ended. Never returns."""
    _forward_to(init)
    received = b""
    while chunk := os.read(status_read, _STATUS_BYTES):
        received += chunk
    _, init_status = os.waitpid(init, 0)
    if len(received) == _STATUS_BYTES:
        _end_like(int.from_bytes(received, "little", signed=True))
    _end_like(init_status)


def _end_like(status: int) -> None:
    """Exit with the same code, or die of the same signal, as a child whose wait status this is."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ImportError):
            import faulthandler  # its handler would print our own stack into the run's log

            faulthandler.disable()
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _init(spec: SandboxSpec, plan: list[Mount], status_write: int) -> Confinement:
    """I: build the root, fork H, and (in I) reap until H ends; returns only in H."""
    set_parent_death_signal(signal.SIGKILL)
    set_dumpable(False)
    umask = os.umask(0o022)  # the root's directories must be traversable by the run's uid
    missing: dict[str, str] = {}
    try:
        pivot_to_tmpfs()
    except OSError as exc:
        root_built = False
        reason = f"no new root ({exc.strerror or exc}); host paths under Landlock"
        missing.update({"filesystem view": reason, "proc": reason})
    else:
        root_built = True
        for problem in populate_root(plan):
            layer, _, why = problem.partition(": ")
            missing[layer] = why
    harness = os.fork()
    if harness == 0:
        os.close(status_write)
        os.umask(umask)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        return _confine(spec, plan, root_built=root_built, missing=missing)
    _forward_to(harness)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == harness:
            break
    os.write(status_write, status.to_bytes(_STATUS_BYTES, "little", signed=True))
    os._exit(0)  # the kernel now kills everything left in the PID namespace


def _confine(spec: SandboxSpec, plan: list[Mount], *, root_built: bool,
             missing: dict[str, str]) -> Confinement:
    """H: chdir to the workspace, then Landlock rules (made while still privileged), uid and
    capabilities dropped, the rules enforced."""
    os.chdir(os.path.realpath(spec.workspace))
    confinement = Confinement(missing=dict(missing))
    try:
        ruleset = Ruleset.create()
    except OSError as exc:
        ruleset = None
        confinement.missing.update({name: why or str(exc.strerror or exc)
                                    for name, why in landlock_coverage(0).items()})
    if ruleset is not None:
        _add_rules(ruleset, spec, plan, root_built, confinement)
    drop_privileges(spec.run_as)
    if ruleset is not None:
        ruleset.restrict_self()
        confinement.landlock_abi = ruleset.abi
        for name, why in landlock_coverage(ruleset.abi).items():
            if why:
                confinement.missing[name] = why
    for name, why in confinement.missing.items():
        print(f"{MISSING_PREFIX}{name}: {why}", file=sys.stderr, flush=True)
    return confinement


def _add_rules(ruleset: Ruleset, spec: SandboxSpec, plan: list[Mount], root_built: bool,
               confinement: Confinement) -> None:
    rights = {"ro": READ, "sys": READ, "rw": ruleset.handled, "dev": DEVICE}
    for mount in plan:
        if mount.kind in rights:
            ruleset.allow(mount.target, rights[mount.kind])
    if root_built:
        ruleset.allow("/proc", READ)
        # Its own entries (threads included) writable: CUDA fails (error 304) unless it can
        # open them for writing with O_TRUNC (it names its threads there).
        ruleset.allow(os.path.realpath("/proc/self"), READ | _FS_WRITE_FILE | _FS_TRUNCATE)
        ruleset.allow("/dev", _FS_READ_DIR)  # listing it (libraries look for GPU nodes)
        for private in ("/tmp", "/dev/shm"):
            ruleset.allow(private, ruleset.handled)
        return
    ruleset.allow(os.path.realpath("/proc/self"), READ)  # the host's /proc: only our own entry
    if spec.scratch:
        ruleset.allow(spec.scratch, ruleset.handled)
    if any(m.kind == "mask" for m in plan):
        confinement.missing["hidden paths"] = "no new root: paths in `hide` stay readable"


# ---------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class Layer:
    """One layer of the sandbox: whether it holds here, and what was seen."""

    name: str
    active: bool
    detail: str


@functools.cache
def probe() -> tuple[Layer, ...]:
    """Run one real sandboxed child (as runs are made: uid 65534 when root) and check from
    inside which layers hold. Cached: done once per process."""
    run_as = SANDBOX_UID if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="proctor-probe-") as folder:
        os.chmod(folder, 0o755)
        workspace, hidden, scratch = (os.path.join(folder, n) for n in ("ws", "hidden", "home"))
        for path in (workspace, hidden, scratch):
            os.mkdir(path, 0o755)
            if run_as is not None and path != hidden:
                os.chown(path, run_as, run_as)
        spec = SandboxSpec(workspace=workspace, python_paths=python_paths(), run_as=run_as,
                           scratch=scratch)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            question = {"spec": spec.to_dict(), "port": listener.getsockname()[1],
                        "hidden": hidden, "parent": os.getpid()}
            try:
                completed = subprocess.run(
                    [sys.executable, "-I", "-S", os.path.realpath(__file__), "--probe",
                     json.dumps(question)],
                    capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError) as exc:
                return (Layer("sandbox", False, f"the probe could not run: {exc}"),)
    lines = completed.stdout.strip().splitlines()
    try:
        return tuple(Layer(**layer) for layer in json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        why = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return (Layer("sandbox", False, f"the probe failed (exit {completed.returncode}): {why}"),)


def missing_layers() -> list[Layer]:
    """The layers `probe()` found missing."""
    return [layer for layer in probe() if not layer.active]


def _probe_inside(question: dict) -> None:
    """Probe entry: sandbox ourselves like a run, then report each layer as JSON on stdout."""
    spec = SandboxSpec.from_dict(question["spec"])
    confinement = enter(spec)
    layers = [
        _check_pid_namespace(question["parent"]),
        _check_proc(question["parent"]),
        _check_network(question["port"]),
        _check_filesystem(question["hidden"]),
        *_check_landlock(confinement),
        _check_uid(spec.run_as),
        _check_privileges(),
    ]
    explained = [_with_reason(layer, confinement.missing.get(layer.name)) for layer in layers]
    print(json.dumps([asdict(layer) for layer in explained]), flush=True)


def _with_reason(layer: Layer, why: str | None) -> Layer:
    """A missing layer's detail with the reason the sandbox gave for it, when it gave one."""
    if layer.active or not why or why in layer.detail:
        return layer
    return Layer(layer.name, False, f"{layer.detail}: {why}")


def _check_pid_namespace(parent: int) -> Layer:
    try:
        os.kill(parent, 0)
        seen = "the probe's parent can be signalled"
    except ProcessLookupError:
        return Layer("pid namespace", True, "own PID namespace: host processes do not exist")
    except PermissionError:
        seen = "host processes exist (signals refused)"
    return Layer("pid namespace", False, seen)


def _check_proc(parent: int) -> Layer:
    if os.path.exists(f"/proc/{parent}"):
        return Layer("proc", False, "the host's /proc: every process is listed")
    if not os.path.exists("/proc/self/status"):
        return Layer("proc", False, "no /proc inside")
    return Layer("proc", True, "a fresh /proc that lists only the run's processes")


def _check_network(port: int) -> Layer:
    interfaces = [name for _, name in socket.if_nameindex()]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return Layer("network namespace", False,
                         f"TCP to the host's 127.0.0.1:{port} connected (interfaces {interfaces})")
    except OSError as exc:
        reached = f"TCP to the host's 127.0.0.1 refused ({exc.strerror or exc})"
    if interfaces != ["lo"]:
        return Layer("network namespace", False, f"{reached}, but host interfaces {interfaces}")
    return Layer("network namespace", True, f"own network namespace (lo only); {reached}")


def _check_filesystem(hidden: str) -> Layer:
    if os.path.exists(hidden):
        return Layer("filesystem view", False, "the host's directories are all visible")
    return Layer("filesystem view", True,
                 "a new root: only the system, Python, workspace and granted paths exist")


def _check_landlock(confinement: Confinement) -> list[Layer]:
    abi = confinement.landlock_abi
    what = {"landlock files": "file access limited to the granted paths",
            "landlock network": "TCP bind and connect denied",
            "landlock scoping": "no signals or abstract sockets outside the run"}
    return [Layer(name, why is None, why or f"{what[name]} (ABI {abi})")
            for name, why in landlock_coverage(abi).items()]


def _check_uid(run_as: int | None) -> Layer:
    uid = os.getuid()
    if run_as is not None:
        ok = uid == run_as and os.getgid() == run_as and not os.getgroups()
        return Layer("unprivileged uid", ok, f"proctor is root; runs as uid {uid}")
    return Layer("unprivileged uid", uid != 0, f"runs as uid {uid}, proctor's own user")


def _check_privileges() -> Layer:
    with open("/proc/self/status") as handle:
        status = dict(line.split(":", 1) for line in handle if ":" in line)
    effective = int(status.get("CapEff", "0").strip(), 16)
    bounding = int(status.get("CapBnd", "0").strip(), 16)
    no_new_privs = status.get("NoNewPrivs", "0").strip() == "1"
    ok = effective == 0 and bounding == 0 and no_new_privs
    detail = f"capabilities {effective:x} (bounding {bounding:x}), no_new_privs {no_new_privs}"
    return Layer("no privileges", ok, detail)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        _probe_inside(json.loads(sys.argv[2]))
    else:
        print("usage: sandbox.py --probe QUESTION_JSON", file=sys.stderr)
        sys.exit(2)
