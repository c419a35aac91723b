"""How the TUI holds up under a flood of training output, measured side by side in one run.

A generated tiny project's harness prints RATE lines/s (default 20,000) for SECONDS; the app
runs with the engine inside it (as `proctor run` does, headless here). While the child
streams, a key is posted to the app every 100 ms and the time until its action runs is
recorded; the same is done with the app idle, for the ratio. RSS is sampled to show memory
stays flat. First paint is measured on the real CLI (`proctor run`) in a pseudo-terminal,
from process start to the first frame, and a headless start checks that neither torch nor
anthropic is imported.

    .venv/bin/python bench/tui_stream.py [--rate 20000] [--seconds 8] [--paints 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pty
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from textual import events  # noqa: E402
from textual.binding import Binding  # noqa: E402

from engine.agents.base import AgentContext, AgentReply  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.loop import Engine  # noqa: E402
from engine.proposal import Proposal, Strategy  # noqa: E402
from engine.runs import RunSettings  # noqa: E402
from tui.app import ProctorApp  # noqa: E402
from tui.settings import TuiSettings  # noqa: E402
from tui.source import EngineSource  # noqa: E402

KEY_EVERY_S = 0.1
TARGET_KEY_MS = 100.0
TARGET_PAINT_S = 1.5

HARNESS = '''\
"""Streams lines at a fixed rate, then reports a result (the bench's stand-in harness)."""
import argparse, json, sys, time
from pathlib import Path

import yaml


def main():
    parser = argparse.ArgumentParser()
    for name in ("--config", "--results", "--check", "--data-cache", "--device"):
        parser.add_argument(name)
    args = parser.parse_args()
    if args.check:
        print(json.dumps({"errors": []}))
        return 0
    training = yaml.safe_load(Path(args.config).read_text())["training"]
    rate, seconds = training["rate"], training["seconds"]
    batch = max(1, rate // 100)
    total = int(rate * seconds)
    out = sys.stdout
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            n = min(batch, due - sent)
            out.write("".join(f"step {sent + i}/{total} loss {1.0 / (sent + i + 1):.6e}"
                              " some padding to look like a real training line\\n"
                              for i in range(n)))
            sent += n
        out.flush()
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    metrics = {"final_r2": 0.5, "pearson_r2": 0.5, "slope": 1.0, "final_mse": 0.5,
               "training_time_s": elapsed, "total_params": 1, "steps_per_s": sent / elapsed}
    Path(args.results).write_text(json.dumps(
        {"status": "ok", "metrics": metrics, "hyperparameters": {}, "error": None}))
    print(f"streamed {sent} lines in {elapsed:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

CONFIG = """\
description: the TUI streaming benchmark
training:
  rate: {rate}
  seconds: {seconds}
exploration:
  agent: heuristic
  approval: auto
  iterations: 1
  block_size: 4
  runner: subprocess
  repair_attempts: 0
  instructions: instructions/protocol.md
  editable_files: [models/siren.py]
  search_space:
    training.seconds: {{low: 0.1, high: 600}}
  timeouts: {{wall_s: 600, no_output_s: 60, kill_grace_s: 1}}
  limits: {{memory_mb: 2048, file_size_mb: 1024, open_files: 256, processes: 64, log_mb: 512}}
"""


def make_project(folder: Path, rate: int, seconds: float) -> Path:
    """A throwaway experiment whose harness only streams output."""
    (folder / "models").mkdir(parents=True)
    (folder / "configs").mkdir()
    (folder / "instructions").mkdir()
    (folder / "models" / "__init__.py").write_text("")
    (folder / "models" / "harness.py").write_text(HARNESS)
    (folder / "models" / "siren.py").write_text("BONUS = 0.0\n")
    (folder / "instructions" / "protocol.md").write_text("# bench protocol\n")
    config = folder / "configs" / "stream.yaml"
    config.write_text(CONFIG.format(rate=rate, seconds=seconds))
    return config


class BaselineAgent:
    """Proposes the base config every time (the bench measures the UI, not the agent)."""

    name = "bench"

    async def propose(self, context: AgentContext) -> AgentReply:
        return AgentReply(Proposal(parent_id=None, strategy=Strategy.BASELINE,
                                   analysis="bench"), "bench")


class PingApp(ProctorApp):
    """The real app plus one key whose handling time the bench records."""

    BINDINGS = [*ProctorApp.BINDINGS, Binding("f12", "ping", show=False)]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent_at: list[float] = []
        self.latencies_ms: list[float] = []

    def action_ping(self) -> None:
        self.latencies_ms.append((time.perf_counter() - self.sent_at.pop(0)) * 1000)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def probe_keys(app: PingApp, seconds: float) -> list[float]:
    """Post a key every KEY_EVERY_S for `seconds`; the latencies of those keys."""
    first = len(app.latencies_ms)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.sent_at.append(time.perf_counter())
        app.post_message(events.Key("f12", None))
        await asyncio.sleep(KEY_EVERY_S)
    deadline = time.perf_counter() + 5
    while app.sent_at and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    return app.latencies_ms[first:]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"p50 {statistics.median(values):6.1f} ms  p95 {p95(values):6.1f} ms  "
            f"max {max(values):6.1f} ms  (n={len(values)})")


async def stream(folder: Path, rate: int, seconds: float) -> None:
    config_path = make_project(folder, rate, seconds)
    config = load_config(config_path)

    def open_engine(publish):
        settings = RunSettings(name="bench", config_path=str(config_path), iterations=1,
                               approval="auto", agent="bench", runner="subprocess",
                               watch_edits=False)
        return Engine.create(folder, config, settings, BaselineAgent(), publish)

    settings = TuiSettings(watch_files=False, bell=False, toasts=False)
    app = PingApp(EngineSource(open_engine), settings)
    async with app.run_test(size=(160, 50)) as pilot:
        startup = await probe_keys(app, 1.0)  # while the engine is being built
        while app.state.phase != "training":
            await pilot.pause(0.02)
        rss = [rss_mb()]
        started = time.perf_counter()
        busy: list[float] = []
        while app.state.phase == "training":
            busy += await probe_keys(app, 1.0)
            rss.append(rss_mb())
        streamed_s = time.perf_counter() - started
        received = app.live_log.total_written
        held = app.live_log.line_count
        skipped = app.pump.skipped_lines
        idle = await probe_keys(app, 2.0)  # the run is over: the app alone
    log = folder / "log" / "bench" / "nodes" / "001" / "training.log"
    lines = sum(1 for _ in log.open("rb")) if log.exists() else 0
    print(f"streaming: the child printed {lines:,} lines in ~{seconds:.0f} s "
          f"({lines / max(streamed_s, 1e-9):,.0f} lines/s seen by the app over {streamed_s:.1f} s)")
    print(f"  live log: {received:,} lines reached the widget (the runner forwards at most "
          f"1,000 lines per 100 ms batch), {held:,} held (cap {settings.live_log_lines:,}); "
          f"{skipped:,} more skipped by the pump; training.log has them all")
    print(f"  key latency while the engine starts: {summary(startup)}")
    print(f"  key latency idle:                    {summary(idle)}")
    print(f"  key latency streaming:               {summary(busy)}")
    if idle and busy:
        ratio = statistics.median(busy) / max(statistics.median(idle), 1e-3)
        print(f"  streaming / idle median latency: {ratio:.1f}x; streaming p95 {p95(busy):.1f} ms "
              f"vs target {TARGET_KEY_MS:.0f} ms")
    during = rss[1:] or rss
    print(f"  RSS: {rss[0]:.0f} MB as training starts; {min(during):.0f}-{max(during):.0f} MB "
          f"over the rest of the stream ({len(during)} one-second samples: "
          f"{', '.join(f'{value:.0f}' for value in during)})")


def first_paint(folder: Path, runs: int) -> None:
    """Seconds from `proctor run` starting to its first frame, in a pseudo-terminal."""
    config_path = make_project(folder, 1000, 1)
    times = []
    for number in range(runs):
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", "run", str(config_path), "--name",
             f"paint{number}", "--agent", "heuristic", "--iterations", "1"],
            cwd=folder, stdin=slave, stdout=slave, stderr=slave, env=env,
            start_new_session=True)
        os.close(slave)
        seen = b""
        painted = None
        deadline = started + 20
        while time.perf_counter() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
                if b"Review" in seen and b"Logs" in seen:  # the tab bar of the first frame
                    painted = time.perf_counter() - started
                    break
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        os.close(master)
        if painted is None:
            print(f"  first paint: no frame within 20 s (output: {seen[-300:]!r})")
            return
        times.append(painted)
    print(f"first paint of `proctor run` in a pty: median {statistics.median(times):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)}; target {TARGET_PAINT_S} s)")


def heavy_imports() -> None:
    """Import the app and start it headless; list the heavy modules that came with it."""
    code = (
        "import sys\n"
        "from tui.app import attached_app\n"
        "from tui.commands import run\n"
        "heavy = [m for m in ('torch', 'anthropic') if m in sys.modules]\n"
        "print('heavy modules imported by the app:', heavy or 'none')\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                               text=True, check=False)
    print(completed.stdout.strip() or completed.stderr.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20_000, help="lines per second")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the child prints")
    parser.add_argument("--paints", type=int, default=3, help="first-paint measurements")
    args = parser.parse_args()
    heavy_imports()
    with tempfile.TemporaryDirectory(prefix="proctor-bench-") as scratch:
        first_paint(Path(scratch) / "paint", args.paints)
        asyncio.run(stream(Path(scratch) / "stream", args.rate, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
