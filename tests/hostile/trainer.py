"""A trainer that attacks proctor, for tests only: each row of the trust-boundary table is an
attack behind a switch. `hostile.json` beside this file names the switches and the targets.

Every attack reports what it achieved on stdout ("[hostile] NAME: OUTCOME"), so whatever
leaks would land in the training log, where the tests look for it. Then it trains honestly
(through `honest_trainer.py`, the real trainer), so the metrics can be compared with an
honest run's."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sqlite3
import sysconfig
import time
from pathlib import Path

import torch

from models import honest_trainer

PLAN = json.loads(Path(__file__).with_name("hostile.json").read_text())
FAKE_RESULTS = json.dumps({"status": "ok", "metrics": {"final_r2": 1.0, "total_params": 1},
                           "hyperparameters": {}, "error": None})


def note(name: str, outcome: object) -> None:
    print(f"[hostile] {name}: {outcome}", flush=True)


def attempt(name: str, action) -> None:
    try:
        note(name, f"DONE {action()}")
    except Exception as exc:  # noqa: BLE001 (every failure is the expected outcome)
        note(name, f"refused ({type(exc).__name__}: {exc})")


def patch_metric_code() -> None:
    from models import metrics

    def perfect(prediction, truth):
        return FitMetrics(1.0, 1.0, 1.0, 0.0)  # noqa: F821 (resolved in metrics' globals)

    metrics.fit_metrics.__code__ = perfect.__code__
    note("metric_code", "DONE patched fit_metrics")


def rewrite_results_at_exit() -> None:
    def forge() -> None:
        attempt("atexit_fd3", lambda: os.write(3, FAKE_RESULTS.encode()))
        for folder in (Path.cwd(), *Path.cwd().parents, Path(PLAN["run_dir"])):
            attempt(f"atexit_file {folder}",
                    lambda f=folder: (f / "results.json").write_text(FAKE_RESULTS))

    atexit.register(forge)


class Replay(torch.nn.Module):
    """Answers every query with the training targets in order."""

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("targets", targets.reshape(-1, targets.shape[-1]).clone())

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.targets[: coords.shape[0]]


def write_journal() -> None:
    def tamper() -> str:
        with sqlite3.connect(PLAN["journal"], timeout=1) as db:
            db.execute("INSERT INTO commands (kind, payload, created_at) "
                       "VALUES ('approve', '{}', 0)")
            db.execute("UPDATE events SET payload = replace(payload, '0.5', '1.0')")
            db.execute("UPDATE state SET value = '{\"pid\": 1}' WHERE key = 'active_run'")
        return "approved and rewrote R2"

    attempt("journal", tamper)
    truth = Path(PLAN["run_dir"]) / "sandbox" / "split" / "score" / "truth.npz"
    attempt("truth", lambda: f"{len(truth.read_bytes())} bytes of the scorer's truth")


def escape() -> None:
    attempt("cgroup", lambda: Path("/sys/fs/cgroup/cgroup.procs").write_text(str(os.getpid())))
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", [PLAN["daemon_name"], "300"])
        os._exit(0)
    note("daemon", "forked")


def steal_secrets() -> None:
    secret = PLAN["secret"]
    for pid in [p for p in os.listdir("/proc") if p.isdigit()] + [str(PLAN["test_pid"])]:
        attempt(f"environ {pid}",
                lambda p=pid: "FOUND " + secret if secret in
                Path(f"/proc/{p}/environ").read_text(errors="replace") else "no secret")
    attempt("key_file", lambda: Path(PLAN["key_file"]).read_text())
    attempt("own_env", lambda: [k for k, v in os.environ.items() if secret in v] or "clean")


def reach_out() -> None:
    def tcp() -> str:
        with socket.create_connection(("127.0.0.1", PLAN["tcp_port"]), timeout=2) as conn:
            conn.sendall(b"hello from the sandbox")
        return "connected"

    def unix(address) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(2)
            conn.connect(address)
            conn.sendall(b"hello from the sandbox")
        return "connected"

    attempt("tcp", tcp)
    attempt("unix_path", lambda: unix(PLAN["unix_socket"]))
    attempt("unix_abstract", lambda: unix("\0" + PLAN["abstract_socket"]))


def send_signals() -> None:
    attempt("signal_victim", lambda: os.kill(PLAN["victim_pid"], signal.SIGKILL))
    attempt("signal_test", lambda: os.kill(PLAN["test_pid"], signal.SIGCONT))
    # the process that supervises this one: in a sandbox, its namespace's init
    attempt("signal_parent", lambda: os.kill(os.getppid(), signal.SIGKILL))


def plant_files() -> None:
    git_dir = Path(PLAN["git_dir"])
    hook = "#!/bin/sh\ntouch " + PLAN["hook_marker"] + "\n"
    def plant_hook() -> None:
        path = git_dir / "hooks" / "pre-commit"
        path.write_text(hook)
        path.chmod(0o755)

    def plant_gpg_program() -> None:
        with open(git_dir / "config", "a") as config:
            config.write("[commit]\n\tgpgsign = true\n[gpg]\n\tprogram = "
                         + PLAN["hook_marker"] + "\n")

    attempt("git_hook", plant_hook)
    attempt("git_config", plant_gpg_program)
    attempt("checkout", lambda: Path(PLAN["checkout_file"]).write_text("# planted\n"))
    attempt("run_dir", lambda: (Path(PLAN["run_dir"]) / "analysis.md").write_text("planted"))
    attempt("venv", lambda: (Path(sysconfig.get_paths()["purelib"]) / "planted.pth")
            .write_text("import os\n"))
    attempt("home", lambda: (Path(PLAN["home"]) / ".bashrc").write_text("planted\n"))


ATTACKS = {
    "metric_code": patch_metric_code,
    "atexit": rewrite_results_at_exit,
    "journal": write_journal,
    "escape": escape,
    "secrets": steal_secrets,
    "network": reach_out,
    "signals": send_signals,
    "files": plant_files,
}


def train(model, data, settings, report):
    for name in PLAN["attacks"]:
        if name in ATTACKS:
            ATTACKS[name]()
    if "replay" in PLAN["attacks"]:
        time.sleep(0)  # zero training steps: the targets are the answer
        return Replay(data.targets)
    return honest_trainer.train(model, data, settings, report)
