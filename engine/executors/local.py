"""The local executor: k sandboxed runs on this machine, one runner (and zygote) per slot.

Each slot evaluates in its own area `sandbox/slot-<k>/` (a one-slot run keeps `sandbox/`
itself, as it always did). On a machine with several GPUs each slot sees only
its own (`CUDA_VISIBLE_DEVICES`); on a CPU the cores are shared out so k runs do not each
start one thread per core."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from engine.evaluation import EvaluationPlan, evaluate
from engine.executors.base import Executor, NodeJob, PlacedCallback, Placement
from engine.runner import OutputCallback, ProcessIdentity, Runner, RunResult, kill_orphan

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def visible_gpus(environ: dict[str, str] | None = None, driver: Path = NVIDIA_GPUS) -> list[str]:
    """The GPU indices runs may use: CUDA_VISIBLE_DEVICES when the user set it, else one per
    GPU the NVIDIA driver lists (no torch import, no CUDA context)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [part.strip() for part in listed.split(",") if part.strip() and part != "-1"]
    try:
        return [str(index) for index in range(len(list(driver.iterdir())))]
    except OSError:
        return []


def slot_devices(slots: int, configured: Sequence[str],
                 gpus: Sequence[str]) -> list[tuple[str | None, dict[str, str]]]:
    """For each slot: the `--device` it trains with (None: the config's) and the variables
    that pin it. `configured` (exploration.executor.devices) wins; else GPUs are dealt out
    round-robin; else the CPU's cores are split between the slots."""
    placements: list[tuple[str | None, dict[str, str]]] = []
    for index in range(slots):
        if configured:
            device = configured[index % len(configured)]
            kind, _, number = device.partition(":")
            if kind == "cuda" and number.isdigit():
                placements.append(("cuda:0", {"CUDA_VISIBLE_DEVICES": number}))
            else:
                placements.append((device, {}))
        elif gpus and slots > 1:
            placements.append((None, {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}))
        elif slots > 1:
            threads = str(max(1, (os.cpu_count() or 1) // slots))
            placements.append((None, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}))
        else:
            placements.append((None, {}))
    return placements


class LocalExecutor(Executor):
    """k slots on this machine. `make_runner` builds one runner per slot, lazily."""

    kind = "local"

    def __init__(self, slots: int, plan: EvaluationPlan, sandbox_root: Path,
                 make_runner: Callable[[], Runner], devices: Sequence[str] = (),
                 gpus: Sequence[str] | None = None):
        super().__init__(slots)
        self.plan = plan
        self.sandbox_root = sandbox_root
        self._make_runner = make_runner
        self._runners: dict[int, Runner] = {}
        self._devices = slot_devices(slots, devices, visible_gpus() if gpus is None else gpus)

    def area(self, slot: int) -> Path:
        """Where slot `slot` evaluates its nodes."""
        return self.sandbox_root if self.slots == 1 else self.sandbox_root / f"slot-{slot}"

    def runner(self, slot: int) -> Runner:
        if slot not in self._runners:
            self._runners[slot] = self._make_runner()
        return self._runners[slot]

    def describe(self, slot: int) -> str:
        device, env = self._devices[slot - 1]
        pinned = env.get("CUDA_VISIBLE_DEVICES")
        where = f"GPU {pinned}" if pinned is not None else device
        return f"local slot {slot}" + (f" on {where}" if where else "")

    async def run(self, slot: int, job: NodeJob, *, on_output: OutputCallback | None = None,
                  on_placed: PlacedCallback | None = None) -> RunResult:
        device, env = self._devices[slot - 1]
        plan = replace(self.plan, device=device or self.plan.device,
                       env={**self.plan.env, **env})
        where = self.describe(slot)

        def started(identity: ProcessIdentity) -> None:  # once per step of the run
            if on_placed is not None:
                on_placed(Placement(slot, where, {"kind": self.kind, **asdict(identity)},
                                    identity.pid))

        return await evaluate(self.runner(slot), plan, self.area(slot), job.populate,
                              job.config_text, job.log_path, seed=job.seed, on_output=on_output,
                              on_started=started)

    async def stop(self, slot: int) -> None:
        runner = self._runners.get(slot)
        if runner is not None:
            await runner.stop_current()

    async def reclaim(self, record: dict[str, Any]) -> str | None:
        fields = {key: record[key] for key in ("pid", "pgid", "start_time", "cgroup")
                  if key in record}
        try:
            identity = ProcessIdentity(**fields)
        except TypeError:
            return None
        if kill_orphan(identity):
            return f"killed the orphaned run of pid {identity.pid}"
        return None

    async def aclose(self) -> None:
        for runner in self._runners.values():
            await runner.aclose()
