"""The zygote: a helper that imports torch and numpy once (running no torch operation, never
touching CUDA) and forks one child per run, so a run pays for a fork, not for `import torch`.

Started by ZygoteRunner as `python -m engine.runner.zygote_server --control-fd 3 ...` with the
scrubbed environment. Messages are JSON, one per SOCK_SEQPACKET packet on the control socket:

  supervisor -> zygote  {"id", "harness", "argv", "env", "setup"} + the run's output pipe fd
                        (+ its results channel, when setup.results_channel: the run's fd 3)
  zygote -> supervisor  {"type": "ready", "pid", "warnings"}
                        {"type": "started", "id", "pid", "start_time"}
                        {"type": "failed", "id", "error"}
                        {"type": "exit", "pid", "status", "maxrss_kb"}

The zygote dies with the supervisor (PR_SET_PDEATHSIG, and EOF on the control socket); each
run child dies with the zygote. A run child is the run's leader; the sandbox (see
`sandbox.py`) forks the process that runs the harness below it. The zygote is a child
subreaper, so a run's orphans stay its descendants and can be found. It is non-dumpable:
runs cannot read its environment.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import faulthandler
import gc
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import traceback

from engine.runner import isolation


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zygote_server")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--preload", default="")
    args = parser.parse_args(argv)

    isolation.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != args.parent_pid:
        return 0  # the supervisor died before we could ask to die with it
    isolation.make_non_dumpable()
    isolation.become_subreaper()
    if sys.path and sys.path[0] == os.getcwd():
        del sys.path[0]  # `-m` put the supervisor's cwd first; runs put their workspace there
    os.chdir(os.environ.get("HOME", "/"))
    sock = socket.socket(fileno=args.control_fd)

    warnings = []
    for name in filter(None, args.preload.split(",")):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (a missing preload only costs speed)
            warnings.append(f"the zygote could not preload {name}: {exc!r}")
    _purge_models()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # A forked child cannot use CUDA initialised in its parent: refuse to serve.
        _send(sock, {"type": "ready", "fatal": "CUDA was initialised while preloading"})
        return 1

    # The preloaded objects move to the permanent generation: a child's garbage collections
    # then never walk (and copy-on-write-fault) the zygote's whole heap.
    gc.freeze()
    _collapse_into_huge_pages()

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD wakes the selector
    runs: set[int] = set()
    _send(sock, {"type": "ready", "pid": os.getpid(), "warnings": warnings})

    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
                if not data:
                    return 0  # the supervisor closed the channel; our runs die with us
                _start_run(sock, json.loads(data), fds, runs)
            else:
                os.read(wake_read, 4096)
                _reap(sock, runs)


_HUGE_PAGE = 2 << 20
_MADV_COLLAPSE = 25  # Linux 6.1: make the range's pages transparent huge pages now


def _collapse_into_huge_pages() -> None:
    """Back the preloaded heap with huge pages: each fork then shares one entry per 2 MB
    instead of copying 512, and each exit drops as few (a run's three forks and exits cost
    about half as much). Best effort: where the kernel refuses, runs are only slower."""
    madvise = ctypes.CDLL(None).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, end in _dense_anonymous_ranges():
        madvise(start, end - start, _MADV_COLLAPSE)


def _dense_anonymous_ranges() -> list[tuple[int, int]]:
    """The 2 MB-aligned parts of our writable private mappings that are at least half
    populated with anonymous memory (a sparse one would grow to whole huge pages)."""
    ranges = []
    span: tuple[int, int] | None = None
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if "-" in fields[0]:  # a mapping's first line: its range, permissions, ...
                low, high = (int(part, 16) for part in fields[0].split("-"))
                span = (low, high) if fields[1] == "rw-p" else None
            elif fields[0] == "Anonymous:" and span and int(fields[1]) * 2048 >= span[1] - span[0]:
                start = -(-span[0] // _HUGE_PAGE) * _HUGE_PAGE  # rounded up
                end = span[1] // _HUGE_PAGE * _HUGE_PAGE
                if end > start:
                    ranges.append((start, end))
    return ranges


def _start_run(sock: socket.socket, request: dict, fds: list[int], runs: set[int]) -> None:
    expected = 2 if request.get("setup", {}).get("results_channel") else 1
    if len(fds) != expected:
        for fd in fds:
            os.close(fd)
        error = f"expected {expected} descriptors, got {len(fds)}"
        _send(sock, {"type": "failed", "id": request.get("id"), "error": error})
        return
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        _send(sock, {"type": "failed", "id": request["id"], "error": f"fork failed: {exc}"})
        return
    if pid == 0:
        _become_run(request, fds)
    gc.freeze()  # objects made while serving stay out of the children's collections too
    for fd in fds:
        os.close(fd)
    stat = isolation.read_stat(pid)  # not reaped before the next select: always readable
    runs.add(pid)
    start_time = stat.start_time if stat is not None else None
    _send(sock, {"type": "started", "id": request["id"], "pid": pid, "start_time": start_time})


def _reap(sock: socket.socket, runs: set[int]) -> None:
    """Reap every exited child (adopted orphans too); report the runs' leaders."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in runs:
            runs.discard(pid)
            report = {"type": "exit", "pid": pid, "status": status, "maxrss_kb": usage.ru_maxrss}
            _send(sock, report)


def _become_run(request: dict, fds: list[int]) -> None:
    """In the forked child: become the run's leader and (in the sandbox's harness process
    below it) run the harness. Never returns."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        first_unused = 3
        if len(fds) == 2:
            os.dup2(fds[1], 3)  # the results channel, where a fresh process would have it
            first_unused = 4
        os.closerange(first_unused, os.sysconf("SC_OPEN_MAX"))  # the control socket above all
        try:
            isolation.apply_child_setup(isolation.ChildSetup.from_dict(request["setup"]))
        except (OSError, ValueError, TypeError) as exc:
            print(f"{isolation.SETUP_FAILED_PREFIX} {exc}", file=sys.stderr, flush=True)
            os._exit(isolation.SETUP_FAILED_EXIT)
        isolation.set_dumpable(True)  # like a freshly exec'd process; the zygote stays closed
        os.environ.clear()
        os.environ.update(request["env"])
        _forget_temp_dir()
        code = _run_harness(request["harness"], request["argv"], request["setup"]["workspace"])
    except BaseException:  # noqa: BLE001 (report anything, then leave without unwinding)
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # the pipe may be gone
                stream.flush()
        os._exit(code)


def _run_harness(harness: str, argv: list[str], workspace: str) -> int:
    """What `python -m <harness> argv...` with cwd=workspace would do, in this process."""
    # Touching every module name would copy-on-write-fault a page per name: look once. (A
    # `models.x` cannot be loaded without `models`. The workspace was never in our import
    # caches, so they need no invalidation either.)
    if "models" in sys.modules:
        _purge_models()
    sys.path.insert(0, workspace)
    sys.dont_write_bytecode = True
    _reseed()
    faulthandler.enable(all_threads=True)
    getattr(atexit, "_clear", lambda: None)()  # handlers of the zygote's imports are not ours
    sys.argv = [harness, *argv]
    try:
        runpy.run_module(harness, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 (exactly what the interpreter would print)
        traceback.print_exc()
        code = 1
    getattr(atexit, "_run_exitfuncs", lambda: None)()
    return code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _purge_models() -> None:
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]


def _forget_temp_dir() -> None:
    """tempfile caches the zygote's TMPDIR (invisible in the sandbox): the run's counts."""
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None


def _reseed() -> None:
    """A forked child inherits its parent's random state; a fresh process would not."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


if __name__ == "__main__":
    sys.exit(main())
