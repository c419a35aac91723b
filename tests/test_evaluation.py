"""The four steps of a node (engine/evaluation.py) through the real runner, on a torch-free
harness whose steps do what each test's config says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import Limits, Timeouts
from engine.evaluation import EvaluationPlan, evaluate
from engine.runner import RunStatus, make_runner

PROJECT = Path(__file__).resolve().parent / "evaluation_project"
REPO = PROJECT.parents[1]
PLAN_LIMITS = Limits(memory_mb=None, processes=64)


@pytest.fixture(params=["zygote", "subprocess"])
async def runner(request):
    instance = make_runner(request.param, preload=("yaml",))
    yield instance
    await instance.aclose()


async def run(runner, tmp_path: Path, data: object = None, seed: int = 0,
              limits: Limits = PLAN_LIMITS, **behaviour) -> tuple:
    plan = EvaluationPlan(harness="models.harness", data_cache=tmp_path / "cache",
                          timeouts=Timeouts(wall_s=60, no_output_s=60, kill_grace_s=1),
                          limits=limits)

    def populate(folder: Path) -> None:
        shutil.copytree(PROJECT / "models", folder / "models")

    log = tmp_path / "training.log"
    result = await evaluate(runner, plan, tmp_path / "area", populate,
                            yaml.safe_dump({"behaviour": behaviour, "data": data}), log,
                            seed=seed)
    return result, log.read_text()


async def test_the_metrics_are_the_score_steps_and_only_trusted_steps_hold_the_channel(
    runner, tmp_path
):
    result, log = await run(runner, tmp_path, train={"value": 0.25})
    assert result.status is RunStatus.OK, (result.error, log)
    assert result.metrics["final_r2"] == 0.25  # not the 1.0 the train step printed
    assert result.metrics["training_time_s"] > 0
    for step, channel in (("prepare", "open"), ("train", "closed"), ("predict", "closed"),
                          ("score", "open")):
        assert f"{step}: fd 3 is {channel}" in log
    # the train step's writes to its workspace never reach the predict step's
    assert "predict: the train step's workspace file is gone" in log


@pytest.mark.parametrize(("step", "prefix"), [("prepare", "prepare step: "), ("train", ""),
                                              ("predict", "predict step: "),
                                              ("score", "score step: ")])
async def test_a_failing_step_ends_the_run_with_its_error(runner, tmp_path, step, prefix):
    result, log = await run(runner, tmp_path, **{step: {"fail": True}})
    assert result.status is RunStatus.FAILED and result.metrics == {}
    assert result.error.startswith(f"{prefix}exit code 1"), result.error
    assert f"{step} failing on purpose" in result.error
    later = ["prepare", "train", "predict", "score"]
    for after in later[later.index(step) + 1:]:
        assert f"{after}: fd 3" not in log


async def test_a_link_left_by_the_train_step_never_reaches_a_trusted_reader(runner, tmp_path):
    result, log = await run(runner, tmp_path, train={"symlink": True})
    assert result.status is RunStatus.FAILED
    assert result.error == "the train step left link, which is not a plain file or folder"
    assert "predict: fd 3" not in log


async def test_the_split_is_prepared_again_only_when_its_sections_or_seed_change(
    runner, tmp_path
):
    prepared = []
    for data, seed, behaviour in ((1, 0, {}), (1, 0, {"train": {"value": 0.75}}), (2, 0, {}),
                                  (2, 0, {}), (2, 1, {})):
        result, log = await run(runner, tmp_path, data=data, seed=seed, **behaviour)
        assert result.status is RunStatus.OK, result.error
        prepared.append("prepare: fd 3" in log)
    assert prepared == [True, False, True, False, True]
    assert result.metrics["final_r2"] == 0.5


async def test_an_unfinished_prepare_is_never_reused(runner, tmp_path):
    await run(runner, tmp_path, data=1)
    (tmp_path / "area" / "split" / "prepared.json").unlink()  # as if killed before the end
    _, log = await run(runner, tmp_path, data=1)
    assert "prepare: fd 3" in log


async def test_terminal_codes_in_a_failing_steps_output_never_reach_its_error(runner, tmp_path):
    codes = "\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2J\x1b[8m"
    result, _ = await run(runner, tmp_path, train={"fail": True, "say": codes})
    assert "failing on purpose" in result.error
    assert "\x1b" not in result.error + result.traceback_tail


async def test_the_private_tmp_holds_no_more_than_the_memory_limit(tmp_path):
    runner = make_runner("subprocess")  # a fresh interpreter fits in a small address space
    try:
        result, log = await run(runner, tmp_path, limits=Limits(memory_mb=256),
                                train={"fill_tmp_mb": 400})
    finally:
        await runner.aclose()
    assert result.status is RunStatus.FAILED
    assert "train: /tmp full after 25" in log and "No space left on device" in log


def test_the_sandbox_shows_the_python_installation_not_the_working_folder(tmp_path):
    script = "from engine.runner.sandbox import python_paths; print(*python_paths(), sep='\\n')"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}"},
                          timeout=60, check=True)
    paths = done.stdout.split()
    assert sys.base_prefix in paths or os.path.realpath(sys.base_prefix) in paths
    assert not [p for p in paths if Path(p) in (tmp_path, REPO) or tmp_path in Path(p).parents]
