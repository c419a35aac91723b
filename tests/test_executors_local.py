"""The local executor: k slots on this machine, each with its own runner, area and device."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from engine.config import Limits, Timeouts
from engine.evaluation import EvaluationPlan
from engine.executors import (
    ExecutorError,
    LocalExecutor,
    NodeJob,
    Placement,
    check_devices,
    check_reachable,
)
from engine.executors.local import slot_devices, visible_gpus
from engine.runner import RunStatus, make_runner

PROJECT = Path(__file__).resolve().parent / "evaluation_project"


def test_visible_gpus_follow_the_users_choice_then_the_driver(tmp_path):
    driver = tmp_path / "gpus"
    for index in range(3):
        (driver / f"0000:0{index}:00.0").mkdir(parents=True)
    assert visible_gpus({}, driver) == ["0", "1", "2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, driver) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, driver) == []
    assert visible_gpus({}, tmp_path / "no-driver") == []


def test_slots_are_pinned_to_configured_devices_then_gpus_then_a_share_of_the_cores():
    assert slot_devices(2, ["cuda:3", "cpu"], ["0"]) == [
        ("cuda:0", {"CUDA_VISIBLE_DEVICES": "3"}), ("cpu", {})]
    assert slot_devices(3, [], ["4", "5"]) == [
        (None, {"CUDA_VISIBLE_DEVICES": "4"}), (None, {"CUDA_VISIBLE_DEVICES": "5"}),
        (None, {"CUDA_VISIBLE_DEVICES": "4"})]
    one = slot_devices(1, [], [])
    assert one == [(None, {})]  # one slot: the config's device and every core, as before
    cpu = slot_devices(2, [], [])
    assert all(env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] for _, env in cpu)
    assert all(int(env["OMP_NUM_THREADS"]) >= 1 for _, env in cpu)


def _job(tmp_path: Path, iteration: int) -> NodeJob:
    def populate(folder: Path) -> None:
        shutil.copytree(PROJECT / "models", folder / "models")

    return NodeJob(iteration, 0, populate, yaml.safe_dump({"behaviour": {}, "data": None}),
                   0, tmp_path / f"training-{iteration}.log")


async def test_two_slots_run_at_once_each_in_its_area_on_its_gpu(tmp_path):
    plan = EvaluationPlan(harness="models.harness", data_cache=tmp_path / "cache",
                          timeouts=Timeouts(wall_s=60, no_output_s=60, kill_grace_s=1),
                          limits=Limits(memory_mb=None, processes=64))
    executor = LocalExecutor(2, plan, tmp_path / "sandbox",
                             lambda: make_runner("subprocess"), gpus=["0", "1"])
    placed: list[Placement] = []
    try:
        results = await asyncio.gather(
            *(executor.run(slot, _job(tmp_path, slot), on_placed=placed.append)
              for slot in (1, 2)))
    finally:
        await executor.aclose()
    assert [result.status for result in results] == [RunStatus.OK, RunStatus.OK]
    for slot in (1, 2):
        log = (tmp_path / f"training-{slot}.log").read_text()
        line = next(x for x in log.splitlines() if x.startswith("train: device"))
        assert json.loads(line.split(" ", 3)[3])["CUDA_VISIBLE_DEVICES"] == str(slot - 1)
        assert (tmp_path / "sandbox" / f"slot-{slot}" / "split").is_dir()
    assert {p.slot for p in placed} == {1, 2}
    assert {p.where for p in placed} == {"local slot 1 on GPU 0", "local slot 2 on GPU 1"}
    assert all(p.record["kind"] == "local" and p.record["pid"] == p.pid for p in placed)


async def test_stopping_one_slot_leaves_the_other_running(tmp_path):
    plan = EvaluationPlan(harness="models.harness", data_cache=tmp_path / "cache",
                          timeouts=Timeouts(wall_s=60, no_output_s=60, kill_grace_s=1),
                          limits=Limits(memory_mb=None, processes=64))
    executor = LocalExecutor(2, plan, tmp_path / "sandbox", lambda: make_runner("subprocess"),
                             gpus=[])
    slow = NodeJob(1, 0, _job(tmp_path, 1).populate,
                   yaml.safe_dump({"behaviour": {"train": {"sleep": 30}}, "data": None}), 0,
                   tmp_path / "slow.log")
    training = asyncio.Event()

    def output(lines: list[str]) -> None:
        if any(line.startswith("train:") for line in lines):
            training.set()

    try:
        slow_run = asyncio.create_task(executor.run(1, slow, on_output=output))
        await asyncio.wait_for(training.wait(), 60)
        await executor.stop(1)
        other = await executor.run(2, _job(tmp_path, 2))
        stopped = await slow_run
    finally:
        await executor.aclose()
    assert stopped.status is RunStatus.STOPPED
    assert other.status is RunStatus.OK


def test_a_slot_pinned_to_a_gpu_this_machine_lacks_is_refused_before_anything_runs():
    with pytest.raises(ExecutorError, match="names cuda:7, but this machine shows no GPU"):
        check_devices(["cpu", "cuda:7"], [])
    with pytest.raises(ExecutorError, match="shows GPUs 0, 1"):
        check_devices(["cuda:2"], ["0", "1"])
    check_devices(["cuda:1", "cpu"], ["0", "1"])  # a GPU it has: fine


def test_a_scheduler_address_that_is_none_or_unreachable_is_one_line_at_once(tmp_path):
    with pytest.raises(ExecutorError, match="is not a scheduler address"):
        check_reachable("not a url")
    with socket.socket() as idle:  # a port nothing listens on
        idle.bind(("127.0.0.1", 0))
        port = idle.getsockname()[1]
    with pytest.raises(ExecutorError, match=f"cannot reach the Dask scheduler .*:{port}"):
        check_reachable(f"tcp://127.0.0.1:{port}")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"tls://127.0.0.1:{listening.getsockname()[1]}")
