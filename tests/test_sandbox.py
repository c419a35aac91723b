"""The sandbox of every run (FAULTS.md rows 23, 30-32) against hostile code, in both runner
modes, as the caller and as an unprivileged user (dropped to from root, as in CI).

tests/runner_scripts/hostile tries each way out and notes what it got; every attempt must be
denied, and the test checks from outside that nothing happened: no file written outside the
workspace, no connection accepted, no process signalled, no secret seen, no process left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import unprivileged
from test_runner import running

from engine.config import Limits, Timeouts
from engine.runner import RunRequest, RunResult, RunStatus, sandbox
from engine.runner.containment import cgroup_base

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "runner_scripts"
from conftest import MODES  # noqa: E402 (one list for the fixture and the tests)

IS_ROOT = os.geteuid() == 0
SECRET_NAME = "PROCTOR_TEST_ANTHROPIC_API_KEY"
TIMEOUTS = Timeouts(wall_s=60, no_output_s=60, kill_grace_s=1)
WRITES = {"file next to the workspace", "git hook", "git config", "venv site-packages",
          "read-only data"}
SECRET_READS = {"environ of the test", "environ of its parent", "key file in the home",
                "key file hidden in read-only data"}


@dataclass
class Scene:
    """A scratch folder (reachable by uid 65534) holding everything the hostile code aims
    at, owned by the uid the run will have, so that only the sandbox stands in the way."""

    root: Path
    run_uid: int
    secret: str = field(default_factory=lambda: "sk-ant-" + secrets.token_hex(16))
    token: str = field(default_factory=lambda: secrets.token_hex(6))

    def __post_init__(self) -> None:
        self.workspace = self.root / "ws"
        shutil.copytree(SCRIPTS / "hostile", self.workspace)
        shutil.copy(SCRIPTS / "fakekit.py", self.workspace / "models" / "fakekit.py")
        self.home = self.root / "home"
        self.home.mkdir(mode=0o700)
        self.key_file = self.home / "anthropic.key"
        self.data = self.root / "data"
        self.data.mkdir()
        (self.data / "data.txt").write_text("training data\n")
        self.hidden_key = self.data / "anthropic.key"
        self.git_dir = self.root / "project" / ".git"
        subprocess.run(["git", "init", "-q", str(self.git_dir.parent)], check=True)
        self.git_config = (self.git_dir / "config").read_text()
        self.planted_pth = Path(sysconfig.get_paths()["purelib"]) / f"planted-{self.token}.pth"
        self.log = self.root / "log" / "train.log"
        self.log.parent.mkdir()
        for key in (self.key_file, self.hidden_key):
            key.write_text(self.secret + "\n")
            key.chmod(0o600)
        give(self.root, self.run_uid)

    def request(self, trusted: bool) -> RunRequest:
        return RunRequest(
            workspace=self.workspace,
            argv=("--config", str(self.workspace / "case.json")),
            log_path=self.log,
            read_only=(self.data,),
            hide=(self.hidden_key,),
            trusted=trusted,
            timeouts=TIMEOUTS,
            limits=Limits(memory_mb=None, processes=64),
        )

    def write_case(self, targets: Targets, daemon: bool = True) -> None:
        base = cgroup_base()[0]
        cgroup_procs = ["/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/unified/cgroup.procs",
                        "/sys/fs/cgroup/pids/cgroup.procs"]
        if base is not None:
            cgroup_procs.append(str(base / "cgroup.procs"))
        case = {
            "test_pid": os.getpid(), "parent_pid": targets.victim.pid,
            "key_file": str(self.key_file), "hidden_key": str(self.hidden_key),
            "data_dir": str(self.data), "tcp_port": targets.tcp.getsockname()[1],
            "unix_socket": str(targets.unix_path), "abstract_name": targets.abstract_name,
            "outside_file": str(self.root / "planted.txt"), "git_dir": str(self.git_dir),
            "planted_pth": str(self.planted_pth), "cgroup_procs": cgroup_procs,
            "private_tmp_name": f"proctor-private-{self.token}.txt", "daemon": daemon,
        }
        (self.workspace / "case.json").write_text(json.dumps(case))
        os.chown(self.workspace / "case.json", self.run_uid, self.run_uid)


def give(tree: Path, uid: int) -> None:
    """chown a tree to `uid` (as root; a normal user's files are its own already)."""
    if not IS_ROOT:
        return
    for top, folders, files in os.walk(tree):
        for name in (".", *folders, *files):
            os.chown(os.path.join(top, name), uid, uid, follow_symlinks=False)


@dataclass
class Targets:
    """What lives outside the run: listeners it must not reach and a victim process (with the
    secret in its environment) it must neither read nor signal."""

    tcp: socket.socket
    unix: socket.socket
    unix_path: Path
    abstract: socket.socket
    abstract_name: str
    victim: subprocess.Popen

    def accepted(self) -> list[str]:
        reached = []
        for name, server in (("tcp to 127.0.0.1", self.tcp), ("unix socket path", self.unix),
                             ("abstract unix socket", self.abstract)):
            server.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                connection, _ = server.accept()
                connection.close()
                reached.append(name)
        return reached


@contextlib.contextmanager
def targets(scene: Scene, as_nobody: bool) -> Iterator[Targets]:
    sockets = scene.root / "sockets"
    sockets.mkdir(mode=0o777)
    sockets.chmod(0o777)
    unix_path = sockets / "agent.sock"
    abstract_name = f"proctor-test-{scene.token}"
    env = {**os.environ, SECRET_NAME: scene.secret, "HOME": str(scene.home)}
    victim_argv = ["sleep", "300"]
    if as_nobody:
        env = unprivileged.environment_for_nobody(env, scene.root / "hold")
        victim_argv = unprivileged.argv_as_nobody(victim_argv)
    with contextlib.ExitStack() as stack:
        tcp = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        unix = stack.enter_context(socket.socket(socket.AF_UNIX))
        unix.bind(str(unix_path))
        unix_path.chmod(0o777)
        unix.listen()
        abstract = stack.enter_context(socket.socket(socket.AF_UNIX))
        abstract.bind("\0" + abstract_name)
        abstract.listen()
        victim = subprocess.Popen(victim_argv, env=env, start_new_session=True)
        try:
            yield Targets(tcp, unix, unix_path, abstract, abstract_name, victim)
        finally:
            victim.kill()
            victim.wait()


@pytest.fixture
def scratch(reachable_tmp: Path) -> Path:
    return reachable_tmp


@pytest.fixture
def signals_to_us() -> Iterator[list[int]]:
    """SIGUSR1s this test process receives (the hostile code aims one at it)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda sig, _: received.append(sig))
    try:
        yield received
    finally:
        signal.signal(signal.SIGUSR1, previous)


def check_nothing_got_out(
    scene: Scene, reach: Targets, result: RunResult, lost: frozenset[str] = frozenset()
) -> dict:
    """Every attack but the `lost` ones (known to get through where a layer is missing)
    denied and without effect outside; every positive check done."""
    assert result.status is RunStatus.OK, result
    report = json.loads((scene.workspace / "report.json").read_text())
    # A write may "succeed" into the run's private /tmp (the scratch folder is under /tmp):
    # writes are judged by what reached the host, below.
    got = {name: outcome for name, outcome in report["attacks"].items()
           if not outcome.startswith("denied") and name not in WRITES | lost}
    assert got == {}, got
    failed = {name: outcome for name, outcome in report["positives"].items()
              if not outcome.startswith("GOT")}
    assert failed == {}, failed
    # ... and from outside: nothing written, reached, signalled, seen or left behind
    assert not (scene.root / "planted.txt").exists()
    assert not (scene.git_dir / "hooks" / "pre-commit").exists()
    assert (scene.git_dir / "config").read_text() == scene.git_config
    assert not scene.planted_pth.exists()
    assert not (scene.data / "planted.txt").exists()
    assert not Path(f"/tmp/proctor-private-{scene.token}.txt").exists()
    assert (scene.workspace / "written.txt").exists()
    assert set(reach.accepted()) <= lost
    assert reach.victim.poll() is None, "the run signalled a process outside it"
    if not lost & SECRET_READS:
        for text in (scene.log.read_text(), json.dumps(report), repr(result)):
            assert scene.secret not in text
    if not lost and not sandbox.missing_layers():  # then no run may lack one either
        assert not [w for w in result.warnings if "SANDBOX" in w], result.warnings
    noted = (scene.workspace / "pids.txt").read_text().splitlines()
    if json.loads((scene.workspace / "case.json").read_text())["daemon"]:
        assert len(noted) == 2, noted  # the harness and its double-forked, setsid() daemon
        assert not running(*map(int, noted[1].split())), "the daemon outlived the run"
    return report


def run_in_driver(scene: Scene, mode: str, wrap: list[str]) -> RunResult:
    """The scene's untrusted run in a fresh supervisor (tests/runner_scripts/run_one.py) that
    runs as uid 65534 through `wrap`."""
    request = scene.request(trusted=False)
    fields = {"workspace": str(request.workspace), "argv": list(request.argv),
              "log_path": str(request.log_path), "read_only": [str(scene.data)],
              "hide": [str(scene.hidden_key)]}
    env = {**os.environ, SECRET_NAME: scene.secret, "HOME": str(scene.home)}
    env = unprivileged.environment_for_nobody(env, scene.root / "hold")
    argv = [*wrap, sys.executable, str(SCRIPTS / "run_one.py"), mode, json.dumps(fields)]
    if not wrap:
        argv = unprivileged.argv_as_nobody(argv)
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return RunResult.from_dict(json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture(autouse=True)
def remove_planted(scratch: Path) -> Iterator[None]:
    yield
    for planted in Path(sysconfig.get_paths()["purelib"]).glob("planted-*.pth"):
        planted.unlink()  # only there if the sandbox failed: never leave it in the venv


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
async def test_hostile_code_gets_nowhere_as_the_caller(
    runner, scratch, signals_to_us, monkeypatch, trusted
) -> None:
    """As root, an untrusted run is uid 65534 and a trusted one uid 0 without capabilities:
    the targets are owned by that uid, so only the sandbox stops the attempts."""
    run_uid = os.getuid() if trusted or not IS_ROOT else unprivileged.NOBODY
    scene = Scene(scratch, run_uid)
    monkeypatch.setenv(SECRET_NAME, scene.secret)
    with targets(scene, as_nobody=False) as reach:
        scene.write_case(reach)
        result = await runner.run(scene.request(trusted))
        report = check_nothing_got_out(scene, reach, result)
    assert signals_to_us == []
    assert report["uid"] == run_uid
    assert result.metrics == {} and result.hyperparameters == {}


@pytest.mark.parametrize("mode", MODES)
async def test_hostile_code_gets_nowhere_as_an_unprivileged_user(mode, scratch) -> None:
    """proctor itself runs as uid 65534 (a normal user): user namespaces and Landlock must
    hold without any privilege."""
    if unprivileged.available() is not None:
        pytest.skip(f"cannot run as an unprivileged user here: {unprivileged.available()}")
    scene = Scene(scratch, unprivileged.NOBODY if IS_ROOT else os.getuid())
    with targets(scene, as_nobody=True) as reach:
        scene.write_case(reach)
        result = run_in_driver(scene, mode, wrap=[])
        report = check_nothing_got_out(scene, reach, result)
    assert report["uid"] == scene.run_uid


# Where a user cannot make namespaces, only Landlock holds: these get through (a Unix socket
# path, a hidden file inside an exposed folder), and the runs say so.
FALLBACK_LOST = frozenset({"unix socket path", "key file hidden in read-only data"})
NO_NAMESPACES = ["pid namespace", "proc", "network namespace", "filesystem view"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to take user namespaces away from a user")
@pytest.mark.parametrize("mode", MODES)
async def test_without_user_namespaces_landlock_holds_and_runs_say_what_is_missing(
    mode, scratch
) -> None:
    without = [sys.executable, str(SCRIPTS / "without_userns.py")]
    scene = Scene(scratch, unprivileged.NOBODY)
    with targets(scene, as_nobody=True) as reach:
        scene.write_case(reach, daemon=False)  # no PID namespace: a daemon could escape
        result = run_in_driver(scene, mode, wrap=without)
        check_nothing_got_out(scene, reach, result, lost=FALLBACK_LOST)
    for layer in NO_NAMESPACES:
        assert any(w.startswith(f"SANDBOX LAYER MISSING: {layer}:") for w in result.warnings)
        assert any(w.startswith(f"SANDBOX LAYER MISSING in this run: {layer}:")
                   for w in result.warnings), result.warnings
    doctor = subprocess.run([*without, sys.executable, "-m", "tui.cli", "doctor"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    for layer in NO_NAMESPACES:
        assert f"MISSING  {layer}" in doctor.stdout
    assert "active   landlock files" in doctor.stdout
    assert "No space left on device" in doctor.stdout  # the reason: the namespace limit


async def test_doctor_prints_every_layer() -> None:
    argv = [sys.executable, "-m", "tui.cli", "doctor"]
    doctor = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    missing = sandbox.missing_layers()
    assert doctor.returncode == (1 if missing else 0), doctor.stdout + doctor.stderr
    for layer in sandbox.probe():
        state = "active " if layer.active else "MISSING"
        assert f"{state}  {layer.name}" in doctor.stdout


async def test_the_probe_names_every_layer_and_runs_warn_of_missing_ones(runner, scratch):
    layers = sandbox.probe()
    assert [layer.name for layer in layers] == [
        "pid namespace", "proc", "network namespace", "filesystem view", "landlock files",
        "landlock network", "landlock scoping", "unprivileged uid", "no privileges",
    ]
    assert all(layer.detail for layer in layers)
    scene = Scene(scratch, os.getuid())
    (scene.workspace / "case.json").write_text("{}")
    result = await runner.run(RunRequest(scene.workspace, ("--config", "case.json"), scene.log,
                                         harness="models.fakekit", trusted=True))
    warned = [w for w in result.warnings if w.startswith("SANDBOX LAYER MISSING")]
    assert len(warned) == len(sandbox.missing_layers())
    if sandbox.landlock_abi() >= 6 and IS_ROOT:  # this kernel offers every layer
        assert sandbox.missing_layers() == []
