"""engine.progress on the lines the embedded experiment really prints: the simulation's
frames (prepare step, cold data cache) and the training's steps (trainer and harness)."""

from __future__ import annotations

import dataclasses

from engine.events import TrainingProgress
from engine.progress import SIMULATION, TRAINING, latest_progress, parse_progress
from models.harness import DivergenceWatchdog


def test_both_phases_of_a_real_run_on_a_cold_data_cache(harness_steps, tmp_path):
    steps = dataclasses.replace(harness_steps, data_cache=tmp_path / "cold-cache")
    ran = steps.all_steps(("prepare", "train"))
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    training = next(i for i, line in enumerate(lines) if "training on" in line)
    simulation, fitting = lines[:training], lines[training:]
    assert any("simulated frame" in line for line in simulation)
    assert latest_progress(7, simulation) == TrainingProgress(7, 12, 12, SIMULATION)
    assert latest_progress(7, fitting) == TrainingProgress(7, 40, 40, TRAINING)
    assert latest_progress(7, lines) == TrainingProgress(7, 40, 40, TRAINING)
    reported = [parse_progress(7, line) for line in fitting]
    assert [p.step for p in reported if p is not None] == [10, 20, 30, 40]
    assert latest_progress(7, lines[:1]) is None  # "simulating 12 frames of 3 discs -> …"


def test_the_harness_line_after_a_quiet_spell(capsys):
    now = [0.0]
    watchdog = DivergenceWatchdog(total_steps=2000, clock=lambda: now[0])
    now[0] = 60.0
    watchdog(300, 0.25)
    line = capsys.readouterr().out.strip()
    assert line.startswith("[harness] step 300/2000")
    assert parse_progress(1, line) == TrainingProgress(1, 300, 2000, TRAINING)


def test_lines_that_are_not_progress():
    for line in ("steps 3/4", "step 3/0", "[harness] training on cpu: 10 parameters, 40 steps",
                 "frame 3/4", "step 1" + "0" * 5000 + "/3", ""):
        assert parse_progress(1, line) is None, line
    assert latest_progress(1, []) is None
