"""The runner against real faulty processes (FAULTS.md rows 1-8, 23, 26, 29, 33), in both modes.

Each fake harness under tests/runner_scripts/<case>/ is a workspace; it notes the pid (as seen
inside its sandbox) and start time of every process it makes in ./pids.txt, and every test
checks that none of them survives the run. Most cases run trusted, so that they can report
on the results channel; the sandbox itself is tested in test_sandbox.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from engine.config import Limits, Timeouts
from engine.runner import (
    ProcessIdentity,
    RunRequest,
    RunStatus,
    ZygoteRunner,
    kill_orphan,
    make_runner,
)
from engine.runner.containment import cgroup_base
from engine.runner.isolation import all_processes, build_environment, is_running, read_stat
from engine.runner.output import LINE_CAP, TRUNCATION_MARKER, OutputSink
from engine.runner.zygote_server import _dense_anonymous_ranges

pytestmark = pytest.mark.asyncio(loop_scope="module")

SCRIPTS = Path(__file__).parent / "runner_scripts"
from conftest import MODES  # noqa: E402 (one list for the fixture and the tests)

TEST_LIMITS = Limits(memory_mb=1024, file_size_mb=16, open_files=256, processes=48, log_mb=1)
TEST_TIMEOUTS = Timeouts(wall_s=30, no_output_s=30, kill_grace_s=1)
HAVE_CGROUP = cgroup_base()[0] is not None


@dataclass
class Case:
    """A copy of one fake harness workspace, with its config and output paths."""

    workspace: Path
    out: Path
    lines: list[str] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    identities: list[ProcessIdentity] = field(default_factory=list)

    def request(
        self, timeouts: Timeouts = TEST_TIMEOUTS, trusted: bool = True, **limits: float | None
    ) -> RunRequest:
        return RunRequest(
            workspace=self.workspace,
            argv=("--config", str(self.workspace / "case.json")),
            log_path=self.out / "train.log",
            trusted=trusted,
            timeouts=timeouts,
            limits=TEST_LIMITS.model_copy(update=limits),
        )

    async def run(self, runner, request: RunRequest | None = None):
        def on_output(batch: list[str]) -> None:
            self.batches.append(batch)
            self.lines.extend(batch)

        return await runner.run(
            request or self.request(), on_output=on_output, on_started=self.identities.append
        )

    @property
    def log(self) -> str:
        return (self.out / "train.log").read_text(errors="replace")

    def noted_processes(self) -> list[tuple[int, int]]:
        pids = self.workspace / "pids.txt"
        if not pids.exists():
            return []
        return [tuple(map(int, line.split())) for line in pids.read_text().splitlines()]


@pytest.fixture
def make_case(tmp_path: Path) -> Callable[..., Case]:
    made = itertools.count()

    def make(name: str, **config: object) -> Case:
        workspace = tmp_path / f"{name}-{next(made)}"
        shutil.copytree(SCRIPTS / name, workspace)
        shutil.copy(SCRIPTS / "fakekit.py", workspace / "models" / "fakekit.py")
        (workspace / "case.json").write_text(json.dumps(config))
        return Case(workspace, workspace.with_name(f"{workspace.name}-out"))

    return make


def running(pid: int, start_time: int) -> bool:
    """Whether a process a run noted (its pid inside the run's PID namespace) still lives."""
    return host_pid(pid, start_time) is not None


def host_pid(pid: int, start_time: int) -> int | None:
    """The host pid of a live process that is `pid` in its own (innermost) PID namespace."""
    for stat in all_processes():
        if stat.start_time == start_time and stat.running and innermost_pid(stat.pid) == pid:
            return stat.pid
    return None


def innermost_pid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def wait_until(condition: Callable[[], bool], deadline_s: float = 5.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def assert_nothing_survives(case: Case, expected_at_least: int = 1) -> None:
    processes = case.noted_processes()
    assert len(processes) >= expected_at_least, processes
    alive = lambda: [p for p in processes if running(*p)]  # noqa: E731
    assert wait_until(lambda: not alive()), f"still running: {alive()}"


# ---------------------------------------------------------------------------- normal runs


async def test_metrics_come_only_from_the_results_channel(runner, make_case) -> None:
    case = make_case("normal", lines=5)
    result = await case.run(runner)
    assert result.status is RunStatus.OK, result
    assert result.metrics["final_r2"] == 0.25  # the printed "final_r2: 0.99" changes nothing
    assert result.exit_code == 0 and result.signal is None and result.error is None
    assert "step 4 loss 0.200" in case.lines and "final_r2: 0.99" in case.lines
    assert case.lines[-3:] == ["progress 10%", "progress 50%", "progress 100%"]
    assert "step 0 loss 1.000\n" in case.log
    leader = case.identities[0]
    assert leader.pid == leader.pgid and leader.start_time > 0
    assert case.noted_processes()[0][0] == 2  # the harness: next to pid 1 of its own namespace
    assert result.hyperparameters["torch_preloaded"] is (runner.mode == "zygote")
    assert result.peak_rss_mb and result.peak_rss_mb > 1
    assert_nothing_survives(case)


async def test_each_run_executes_the_workspace_code_as_it_is_now(runner, make_case) -> None:
    case = make_case("normal")
    first = await case.run(runner)
    # Same length and (likely) the same mtime second: a cached .pyc must not be used.
    (case.workspace / "models" / "trainer.py").write_text("VALUE = 0.75\n")
    second = await case.run(runner)
    assert (first.metrics["final_r2"], second.metrics["final_r2"]) == (0.25, 0.75)
    assert not list(case.workspace.rglob("*.pyc"))


async def test_a_trusted_run_without_a_result_failed(runner, make_case) -> None:
    case = make_case("silent_loop")
    request = case.request(timeouts=replace_timeouts(no_output_s=0.5))
    result = await case.run(runner, request)
    assert result.status is RunStatus.TIMEOUT and result.metrics == {}
    quiet = make_case("forger")  # exits 0; writes nothing on the channel it holds
    result = await quiet.run(runner)
    assert result.status is RunStatus.FAILED and "results channel" in result.error


async def test_an_untrusted_run_has_no_channel_and_forges_nothing(runner, make_case) -> None:
    case = make_case("forger", forge=True)
    result = await case.run(runner, case.request(trusted=False))
    assert result.status is RunStatus.OK, result  # exit 0, and nothing else counts
    assert result.metrics == {} and result.hyperparameters == {}
    found = json.loads((case.workspace / "found.json").read_text())
    assert found["fd3"].startswith("closed"), found
    assert '{"status": "ok", "metrics": {"final_r2": 1.0}}' in case.lines  # printed, ignored
    assert_nothing_survives(case)


@pytest.mark.parametrize(("code", "status"), [(3, RunStatus.DIVERGED), (2, RunStatus.FAILED)])
async def test_an_untrusted_run_reports_by_exit_code(runner, make_case, code, status) -> None:
    case = make_case("forger", exit=code)
    result = await case.run(runner, case.request(trusted=False))
    assert result.status is status and result.exit_code == code, result
    assert result.metrics == {}


def replace_timeouts(**changes: float) -> Timeouts:
    return TEST_TIMEOUTS.model_copy(update=changes)


async def test_a_bad_request_is_one_clear_error(runner, tmp_path) -> None:
    missing = tmp_path / "nowhere"
    request = RunRequest(missing, (), tmp_path / "log")
    result = await runner.run(request)
    assert result.status is RunStatus.FAILED and "is not a directory" in result.error
    unseen = replace(request, workspace=tmp_path, read_only=(missing,))
    assert "does not exist" in (await runner.run(unseen)).error
    bad_name = replace(request, workspace=tmp_path, harness="models/harness.py")
    assert "is not a module name" in (await runner.run(bad_name)).error
    (tmp_path / "a-file").write_text("")
    unwritable = replace(request, workspace=tmp_path, log_path=tmp_path / "a-file" / "log")
    assert "cannot prepare the run" in (await runner.run(unwritable)).error


# ---------------------------------------------------------------------------- faults 1-8


@pytest.mark.parametrize("how", ["null_read", "signal"])
async def test_segfault_is_crashed_with_a_faulthandler_tail(runner, make_case, how) -> None:
    case = make_case("segfault", how=how)
    result = await case.run(runner)
    assert result.status is RunStatus.CRASHED, result
    assert result.signal == signal.SIGSEGV and result.exit_code is None
    assert "SIGSEGV" in result.error
    assert "Fatal Python error: Segmentation fault" in result.traceback_tail
    assert "harness.py" in result.traceback_tail  # the Python stack of the crash
    assert_nothing_survives(case)
    again = await make_case("normal").run(runner)  # the loop goes on
    assert again.status is RunStatus.OK


@pytest.mark.parametrize("which", ["no_output", "wall"])
async def test_silent_infinite_loop_times_out(runner, make_case, which) -> None:
    case = make_case("silent_loop")
    if which == "no_output":
        timeouts = replace_timeouts(no_output_s=1.0)
    else:
        timeouts = replace_timeouts(wall_s=1.0)
    result = await case.run(runner, case.request(timeouts=timeouts))
    assert result.status is RunStatus.TIMEOUT, result
    assert ("no-output" if which == "no_output" else "wall-clock") in result.error
    assert result.signal == signal.SIGTERM  # it went at the first, polite signal
    assert_nothing_survives(case)


async def test_printing_infinite_loop_is_capped(runner, make_case) -> None:
    case = make_case("print_loop")
    request = case.request(timeouts=replace_timeouts(wall_s=1.5), log_mb=0.25)
    result = await case.run(runner, request)
    assert result.status is RunStatus.TIMEOUT and "wall-clock" in result.error
    assert result.log_truncated
    log = case.log
    assert TRUNCATION_MARKER in log
    assert len(log) < 0.25 * 2**20 + 50_000  # the cap plus the marker and 40 tail lines
    assert max(len(batch) for batch in case.batches) <= 1001  # batches stay bounded
    assert_nothing_survives(case)


@pytest.mark.parametrize("hang", [False, True])
async def test_grandchildren_die_with_the_run(runner, make_case, hang) -> None:
    case = make_case("grandchild", hang=hang)
    timeouts = replace_timeouts(no_output_s=1.0)
    result = await case.run(runner, case.request(timeouts=timeouts))
    assert result.status is (RunStatus.TIMEOUT if hang else RunStatus.OK), result
    assert_nothing_survives(case, expected_at_least=3)  # leader, child, detached daemon


async def test_fork_loop_is_stopped_by_the_process_limit(runner, make_case) -> None:
    case = make_case("fork_bomb", count=40)
    result = await case.run(runner, case.request(processes=12))
    assert result.status is RunStatus.RESOURCE_LIMIT, result
    assert "process limit (12)" in result.error
    assert_nothing_survives(case)


async def test_unbounded_allocation_is_oom(runner, make_case) -> None:
    case = make_case("alloc")
    memory_mb = 1024 if runner.mode == "zygote" else 384  # the zygote's torch maps ~700 MB
    result = await case.run(runner, case.request(memory_mb=memory_mb))
    assert result.status is RunStatus.OOM, result
    assert f"memory limit ({memory_mb} MB)" in result.error
    assert "MemoryError" in result.traceback_tail
    assert_nothing_survives(case)


async def test_huge_file_hits_the_file_size_limit(runner, make_case) -> None:
    case = make_case("huge_file")
    result = await case.run(runner, case.request(file_size_mb=1))
    assert result.status is RunStatus.RESOURCE_LIMIT, result
    assert "file-size limit (1 MB)" in result.error
    assert (case.workspace / "huge.bin").stat().st_size <= 2**20
    assert_nothing_survives(case)


async def test_nan_is_recorded_as_diverged(runner, make_case) -> None:
    case = make_case("diverged")
    result = await case.run(runner)
    assert result.status is RunStatus.DIVERGED and result.exit_code == 3
    assert result.error == "loss became NaN at step 0" and result.metrics == {}


# ---------------------------------------------------------------------------- faults 23, 26

SECRET = "sk-ant-test-0123456789abcdef"


async def test_runs_see_no_secret_and_no_network(runner, make_case, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("INNOCENT_LOOKING", f"prefix-{SECRET}")
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        case = make_case("snoop", port=listener.getsockname()[1])
        request = replace(
            case.request(), env={"CUDA_VISIBLE_DEVICES": "", "HF_TOKEN": "hf_dont_pass_me"}
        )
        result = await case.run(runner, request)
    finally:
        listener.close()
    assert result.status is RunStatus.OK, result
    found = result.hyperparameters
    assert "CUDA_VISIBLE_DEVICES" in found["env"] and "HF_TOKEN" not in found["env"]
    assert not [name for name in found["env"] if "KEY" in name or "TOKEN" in name]
    assert found["env"]["HOME"] == found["env"]["TMPDIR"] == "/tmp"  # the run's private /tmp
    # Its parent (the sandbox's pid 1) and grandparent (none: the namespace ends there).
    assert all(text.startswith("unreadable") for text in found["environs"].values()), found
    assert found["stdin_bytes"] == 0
    assert found["network"].startswith("failed"), found["network"]
    for text in (case.log, "\n".join(case.lines), repr(result)):
        assert SECRET not in text and "hf_dont_pass_me" not in text
    assert any("HF_TOKEN" in warning for warning in result.warnings)
    assert_nothing_survives(case)


async def test_stdin_is_closed_and_a_10mb_line_is_handled(runner, make_case) -> None:
    case = make_case("long_line")
    result = await case.run(runner, case.request(log_mb=1))
    assert result.status is RunStatus.OK, result
    assert result.metrics["stdin_bytes"] == 0
    assert result.log_truncated and TRUNCATION_MARKER in case.log
    assert (case.out / "train.log").stat().st_size < 1.2 * 2**20
    assert max(map(len, case.lines)) <= LINE_CAP + 30
    assert case.lines[0].endswith(f"…[{10 * 2**20} bytes]")
    assert "after the long line" in case.lines
    assert_nothing_survives(case)


# ---------------------------------------------------------------------------- stop, orphans


async def test_stop_current_kills_the_group(runner, make_case) -> None:
    case = make_case("grandchild", hang=True)
    task = asyncio.create_task(case.run(runner))
    assert await _wait_async(lambda: len(case.noted_processes()) >= 3)
    await runner.stop_current()
    result = await task
    assert result.status is RunStatus.STOPPED
    assert_nothing_survives(case, expected_at_least=3)


async def test_the_log_file_has_each_batch_while_the_run_goes(runner, make_case) -> None:
    """Viewers in other processes (an attached app, `status`) tail the file itself."""
    case = make_case("print_then_wait")
    task = asyncio.create_task(case.run(runner))
    assert await _wait_async(lambda: bool(case.lines))
    assert "first line of the run" in case.log  # not held back in a write buffer
    await runner.stop_current()
    assert (await task).status is RunStatus.STOPPED


async def _wait_async(condition: Callable[[], bool], deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def test_kill_orphan_never_signals_a_forged_or_recycled_identity(tmp_path) -> None:
    """Row 33: a forged `active_run` naming a live stranger (its own session and group
    leader, exact start time) gets no signal, with or without a claimed cgroup."""
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stat = read_stat(sleeper.pid)
        assert stat is not None and stat.pid == stat.pgid == stat.sid
        forged_cgroup = cgroup_base()[0] / "run-1-0" if HAVE_CGROUP else tmp_path / "run-1-0"
        forgeries = [
            ProcessIdentity(sleeper.pid, sleeper.pid, stat.start_time + 1),  # recycled pid
            ProcessIdentity(sleeper.pid, sleeper.pid, stat.start_time),  # exact, no cgroup
            ProcessIdentity(sleeper.pid, sleeper.pid, stat.start_time, "/sys/fs/cgroup"),
            ProcessIdentity(sleeper.pid, sleeper.pid, stat.start_time, str(forged_cgroup)),
        ]
        for forged in forgeries:
            assert kill_orphan(forged) is False, forged
            assert sleeper.poll() is None, forged
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_kill_orphan_kills_a_run_it_can_prove_is_one(runner, make_case) -> None:
    """The other side of row 33: a live run's own identity passes every check and the whole
    run goes (its leader's death ends the sandbox's PID namespace)."""
    case = make_case("grandchild", hang=True)
    task = asyncio.create_task(case.run(runner))
    assert await _wait_async(lambda: len(case.noted_processes()) >= 3)
    assert kill_orphan(case.identities[0]) is True
    result = await task
    assert result.signal == signal.SIGKILL, result
    assert_nothing_survives(case, expected_at_least=3)


_SUPERVISOR = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from engine.runner import RunRequest, make_runner
    from engine.config import Timeouts

    async def main(mode, workspace, out):
        runner = make_runner(mode, preload=())
        workspace, out = Path(workspace), Path(out)
        def started(identity):
            zygote = getattr(runner, "zygote_pid", None)
            print(json.dumps({"identity": identity.__dict__, "zygote": zygote}), flush=True)
        request = RunRequest(workspace, ("--config", str(workspace / "case.json")),
                             out / "log", trusted=True,
                             timeouts=Timeouts(wall_s=60, no_output_s=60))
        await runner.run(request, on_started=started)

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.parametrize("mode", MODES)
async def test_a_dead_supervisor_takes_its_runs_along(make_case, mode, tmp_path) -> None:
    case = make_case("grandchild", hang=True)
    supervisor = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR, mode, str(case.workspace), str(tmp_path / "o")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        announced = json.loads(supervisor.stdout.readline())
        assert await _wait_async(lambda: len(case.noted_processes()) >= 3)
    finally:
        supervisor.kill()
        supervisor.wait()
    identity = ProcessIdentity(**announced["identity"])
    assert wait_until(lambda: not is_running(identity.pid, identity.start_time)), (
        "the leader outlived its supervisor"
    )
    if announced["zygote"]:
        zygote = read_stat(announced["zygote"])
        assert wait_until(lambda: zygote is None or not is_running(zygote.pid, zygote.start_time))
    # The leader's death ends the sandbox's PID namespace: the detached daemon goes with it.
    assert_nothing_survives(case, expected_at_least=3)
    kill_orphan(identity)  # the restarted engine's clean-up finds nothing, and frees the cgroup
    if identity.cgroup:
        assert not Path(identity.cgroup).exists()


async def test_a_dead_zygote_is_replaced_on_the_next_run(make_case) -> None:
    runner = ZygoteRunner(preload=())
    try:
        assert (await make_case("normal").run(runner)).status is RunStatus.OK
        first = runner.zygote_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        result = await make_case("normal").run(runner)
        assert result.status is RunStatus.OK, result
        assert runner.zygote_pid not in (None, first)
    finally:
        await runner.aclose()
    assert runner.zygote_pid is None


async def test_the_zygote_collapses_only_whole_huge_pages_of_dense_memory() -> None:
    block = bytearray(b"x" * (16 << 20))  # 16 MB of anonymous memory, every page touched
    low = ctypes.addressof((ctypes.c_char * len(block)).from_buffer(block))
    high = low + len(block)
    huge = 2 << 20
    ranges = _dense_anonymous_ranges()
    assert all(start % huge == 0 and end % huge == 0 and end > start for start, end in ranges)
    assert any(start <= low + huge and end >= high - huge for start, end in ranges)


# ---------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("mode", MODES)
async def test_process_tree_containment_without_cgroups(make_case, mode) -> None:
    """The non-root fallback: the process limit by watchdog, the group and tree killed, and
    the detached daemon ends with the sandbox's PID namespace."""
    runner = make_runner(mode, preload=(), containment="process-tree")
    try:
        bomb = make_case("fork_bomb", count=40)
        result = await bomb.run(runner, bomb.request(processes=12))
        assert result.status is RunStatus.RESOURCE_LIMIT, result
        assert_nothing_survives(bomb)
        left = make_case("grandchild", hang=False)
        assert (await left.run(runner)).status is RunStatus.OK
    finally:
        await runner.aclose()
    assert_nothing_survives(left, expected_at_least=3)


@pytest.mark.skipif(not HAVE_CGROUP, reason="needs a writable cgroup with a pids controller")
async def test_cgroup_containment_is_used_when_available(runner, make_case) -> None:
    case = make_case("normal")
    result = await case.run(runner)
    assert result.status is RunStatus.OK
    cgroup = case.identities[0].cgroup
    assert cgroup is not None and "/proctor/run-" in cgroup
    assert not Path(cgroup).exists()  # removed after the run


# ---------------------------------------------------------------------------- pieces


async def test_environment_is_an_allow_list_without_secrets() -> None:
    source = {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "2",
        "ANTHROPIC_API_KEY": SECRET,
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
        "TORCH_HOME": f"/x/{SECRET}",
        "EDITOR": "vim",
        "PYTHONPATH": "/elsewhere",
    }
    env, refused = build_environment(
        {"CUDA_VISIBLE_DEVICES": "0", "GITHUB_TOKEN": "t"}, "/scratch", "/scratch/tmp", source
    )
    assert refused == ["GITHUB_TOKEN"]
    assert (env["HOME"], env["TMPDIR"]) == ("/scratch", "/scratch/tmp")
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert (env["PATH"], env["LC_ALL"], env["OMP_NUM_THREADS"]) == ("/usr/bin", "C.UTF-8", "2")
    for name in ("ANTHROPIC_API_KEY", "AWS_SECRET_ACCESS_KEY", "TORCH_HOME", "EDITOR"):
        assert name not in env
    assert "PYTHONPATH" not in env


async def test_output_sink_splits_caps_and_batches(tmp_path) -> None:
    sink = OutputSink(tmp_path / "log", log_cap_bytes=64, line_cap=8, max_pending_lines=3)
    for chunk in (b"one\r", b"\ntwo\rthr", b"ee\n", b"z" * 100, b"\nfive\nsix\n"):
        sink.feed(chunk)
    sink.finish()
    assert sink.take_batch() == [
        "one",
        "two",
        "three",
        "[proctor] … 3 lines not shown here (see the log)",
    ]
    assert list(sink.tail) == ["one", "two", "three", "zzzzzzzz…[100 bytes]", "five", "six"]
    log = (tmp_path / "log").read_bytes().decode()
    assert sink.log_truncated and log.startswith("one\r\ntwo\rthree\n") and TRUNCATION_MARKER in log
    assert log.rstrip().endswith("six")
