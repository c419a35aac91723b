"""Edited training code that attacks proctor on purpose (tests/hostile/trainer.py), through
the real harness, the four sandboxed steps and both runner modes, as root and as an
unprivileged user. Nothing it does may change the metric, the journal, the checkout or
anything outside its workspace; it must see no secret, open no connection, signal nothing
outside its run and leave no process behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import unprivileged

from engine.journal import Journal, Step

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ATTACKS = ["metric_code", "atexit", "journal", "escape", "secrets", "network", "signals",
           "files"]
SECRET_NAME = "PROCTOR_TEST_ANTHROPIC_API_KEY"


@dataclass
class Listeners:
    """Everything the hostile code may try to reach, and whether anything got through."""

    tcp: socket.socket
    unix: socket.socket
    abstract: socket.socket
    abstract_name: str
    unix_path: Path
    accepted: list[str] = field(default_factory=list)

    def poll(self) -> list[str]:
        for name, server in (("tcp", self.tcp), ("unix", self.unix),
                             ("abstract", self.abstract)):
            server.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                conn, _ = server.accept()
                conn.close()
                self.accepted.append(name)
        return self.accepted


@contextlib.contextmanager
def listeners(folder: Path) -> Iterator[Listeners]:
    tcp = socket.create_server(("127.0.0.1", 0))
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    unix_path = folder / "agent.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix_path.chmod(0o777)
    unix.listen()
    name = f"proctor-test-{secrets.token_hex(6)}"
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + name)
    abstract.listen()
    try:
        yield Listeners(tcp, unix, abstract, name, unix_path)
    finally:
        for server in (tcp, unix, abstract):
            server.close()


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True,
                          text=True).stdout


def make_project(folder: Path) -> Path:
    """A git project with the real experiment, whose trainer is the hostile one."""
    project = folder / "project"
    shutil.copytree(ROOT / "models", project / "models",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(project / "models" / "trainer.py", project / "models" / "honest_trainer.py")
    shutil.copy(HERE / "hostile" / "trainer.py", project / "models" / "trainer.py")
    (project / "configs").mkdir()
    shutil.copy(HERE / "configs" / "tiny.yaml", project / "configs" / "tiny.yaml")
    git(project.parent, "init", "-q", str(project))
    git(project, "add", "-A")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    home = project / "home"
    home.mkdir()
    with Journal.open_for_engine(project / "log" / "r1") as journal:
        journal.append(1, Step.STARTED, {"block": 1})
        journal.set_state("active_run", {"pid": 4242})
    return project


def snapshot(project: Path) -> dict[str, str]:
    """A digest of every file outside the evaluation's own area and the data cache."""
    area, cache = project / "log" / "r1" / "sandbox", project / "log" / "cache"
    digests = {}
    for path in sorted(project.rglob("*")):
        if path.is_file() and not path.is_relative_to(area) and not path.is_relative_to(cache) \
                and not path.name.startswith("training-"):
            digests[str(path.relative_to(project))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


# What the hostile code must never achieve. The rest is judged by its effects: reading its
# own processes' environments is allowed, and a write to a path under /tmp (where the tests'
# projects live) may land in the run's private /tmp.
MUST_FAIL = ("journal", "truth", "cgroup", "key_file", "tcp", "unix_path", "unix_abstract",
             "signal_victim", "signal_test", "git_hook", "git_config", "checkout", "venv",
             "home", "atexit_fd3")


def attack_outcomes(log: str) -> dict[str, str]:
    """`[hostile] NAME: OUTCOME` lines of a training log, by name."""
    found = {}
    for line in log.splitlines():
        if line.startswith("[hostile] "):
            name, _, outcome = line.removeprefix("[hostile] ").partition(": ")
            found[name] = outcome
    return found


def daemons(name: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == name.encode():
                found.append(int(pid))
    return found


def site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


USERS = ["caller", "unprivileged"]



@pytest.mark.slow
@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("mode", ["zygote", "subprocess"])
def test_hostile_training_code_changes_nothing(mode, user, reachable_tmp):
    workdir = reachable_tmp
    if user == "unprivileged" and unprivileged.available() is not None:
        pytest.skip(f"cannot run as an unprivileged user here: {unprivileged.available()}")
    project = make_project(workdir)
    secret = "sk-ant-" + secrets.token_hex(16)
    key_file = project / "home" / "anthropic.key"
    key_file.write_text(secret + "\n")
    daemon_name = f"proctor-hostile-{secrets.token_hex(4)}"
    hook_marker = workdir / "hook-ran"
    env = {**os.environ, SECRET_NAME: secret, "HOME": str(project / "home")}
    as_nobody = user == "unprivileged" and os.geteuid() == 0
    with listeners(workdir / "sockets") as reach:
        victim_argv = ["sleep", "300"]
        if as_nobody:
            unprivileged.give_to_nobody(workdir)
            env = unprivileged.environment_for_nobody(env, workdir / "hold")
            victim_argv = unprivileged.argv_as_nobody(victim_argv)
        key_file.chmod(0o600)
        victim = subprocess.Popen(victim_argv, env=env, start_new_session=True)
        try:
            plan = {
                "attacks": ATTACKS, "secret": secret, "key_file": str(key_file),
                "journal": str(project / "log" / "r1" / "journal.sqlite"),
                "run_dir": str(project / "log" / "r1"), "daemon_name": daemon_name,
                "tcp_port": reach.tcp.getsockname()[1], "unix_socket": str(reach.unix_path),
                "abstract_socket": reach.abstract_name, "victim_pid": victim.pid,
                "test_pid": os.getpid(), "git_dir": str(project / ".git"),
                "hook_marker": str(hook_marker),
                "checkout_file": str(project / "models" / "siren.py"),
                "home": str(project / "home"),
            }
            before = snapshot(project)
            honest = dict(plan, attacks=[])
            replay = dict(plan, attacks=["replay"])
            argv = [sys.executable, str(HERE / "hostile_driver.py"), str(project), mode,
                    *(json.dumps(p) for p in (honest, plan, replay))]
            if as_nobody:
                argv = unprivileged.argv_as_nobody(argv)
            # from the project folder, as users start proctor (so it is on sys.path)
            done = subprocess.run(argv, env={**env, "PYTHONPATH": f"{project}:{ROOT}"},
                                  cwd=project,
                                  capture_output=True, text=True,
                                  timeout=600, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stderr[-3000:]
            results = [json.loads(line) for line in done.stdout.splitlines()]
            honest_result, hostile_result, replay_result = results
            logs = {n: (project / "log" / "r1" / f"training-{n}.log").read_text() for n in range(3)}

            # the score: the hostile run trained honestly, so it scores exactly as the honest one
            assert honest_result["status"] == "ok", honest_result
            assert hostile_result["status"] == "ok", (hostile_result, logs[1][-3000:])
            assert hostile_result["metrics"]["total_params"] == \
                honest_result["metrics"]["total_params"]
            for key in ("final_r2", "heldout_r2", "pearson_r2", "slope"):  # threads reorder sums
                assert hostile_result["metrics"][key] == pytest.approx(
                    honest_result["metrics"][key], rel=1e-4), key
            assert "[hostile] metric_code: DONE" in logs[1]  # it did patch its own copy
            # replaying the targets after zero steps earns nothing
            assert replay_result["status"] != "ok" or replay_result["metrics"]["final_r2"] < 0.9

            # nothing outside the workspace changed; nothing planted runs
            assert snapshot(project) == before
            git(project, "-c", "safe.directory=*", "-c", "user.name=t", "-c", "user.email=t@t",
                "commit", "-q",
                "--allow-empty", "-m", "after")
            assert not hook_marker.exists()
            assert not (site_packages() / "planted.pth").exists()

            # no secret seen, no connection, no signal outside, no survivor
            assert secret not in "".join(logs.values())
            outcomes = attack_outcomes(logs[1])
            assert not [line for line in outcomes if "FOUND" in line]
            assert [name for name in MUST_FAIL if not outcomes[name].startswith("refused")] == []
            assert reach.poll() == []
            assert victim.poll() is None, "the hostile code killed an outside process"
            assert daemons(daemon_name) == [], "a process of the run outlived it"
        finally:
            victim.kill()
            victim.wait()
            for pid in daemons(daemon_name):
                os.kill(pid, 9)
