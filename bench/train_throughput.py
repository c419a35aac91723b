"""Training throughput of the embedded experiment: steps/s and the training time to reach
R² >= 0.9, for the default config and a good nearby config, side by side in one process.

Each config trains (through the editable trainer) until R² >= 0.9 or `--max-steps`. R² is the
harness's own evaluator (all training frames, denormalised), run every `--eval-every` steps
with the training clock paused, so the times are training time only. Both configs share the
cached dataset (built first if absent, not timed).

    .venv/bin/python bench/train_throughput.py [--config CFG] [--good KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.settings import ExperimentSettings, validate_settings  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "multimaterial_1_discs_3types.yaml"
# Two changes away from the default along the search space: 10x learning rate, 2x frames.
GOOD_CHANGES = ["training.learning_rate=3.0e-4", "training.frames_per_batch=8"]
TARGET_R2 = 0.9


class _TargetReached(Exception):
    """Stops the trainer (through its report callback) once R² reaches the target."""


@dataclass
class Measurement:
    name: str
    steps: int
    training_s: float
    time_to_target_s: float | None
    last_r2: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.training_s


class _Clock:
    """Training time with the evaluation pauses left out."""

    def __init__(self) -> None:
        self.total = 0.0
        self.since = time.perf_counter()

    def pause(self) -> float:
        self.total += time.perf_counter() - self.since
        return self.total

    def resume(self) -> None:
        self.since = time.perf_counter()


def with_changes(config: dict, changes: list[str]) -> ExperimentSettings:
    """The config with dotted `section.key=value` changes (values parsed as YAML)."""
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    for change in changes:
        dotted, _, raw = change.partition("=")
        section, _, key = dotted.partition(".")
        data[section][key] = yaml.safe_load(raw)
    return validate_settings(data)


def measure(
    name: str, settings: ExperimentSettings, frames, device: str, eval_every: int, max_steps: int
) -> Measurement:
    """Train one config until R² >= TARGET_R2 or max_steps; time only the training."""

    from models import harness
    from models.data import field_samples
    from models.metrics import fit_metrics

    samples = field_samples(frames, settings.dataset.field, settings.dataset.n_frames)
    data = samples.to_device(device)
    channels = samples.values.shape[-1]
    siren, trainer = harness.import_editable()
    model = harness.build_model(siren, settings, channels, device)
    clock = _Clock()
    last = {"step": 0, "r2": float("nan")}

    def report(step: int, loss: float) -> None:
        last["step"] = step
        if step % eval_every and step != max_steps:
            return
        clock.pause()
        prediction = harness.predict(model, data.coords, channels)
        model.train()
        last["r2"] = fit_metrics(samples.denormalise(prediction), samples.truth).final_r2
        if last["r2"] >= TARGET_R2:
            raise _TargetReached
        clock.resume()

    long_run = settings.training.model_copy(update={"steps": max_steps})
    reached = False
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's progress lines
        try:
            trainer.train(model, data, long_run, report)
        except _TargetReached:
            reached = True
    training_s = clock.total if reached else clock.pause()
    return Measurement(name, last["step"], training_s, training_s if reached else None, last["r2"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--good", nargs="*", default=GOOD_CHANGES, metavar="KEY=VALUE")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=4000, help="per config (default 4000)")
    parser.add_argument("--device", default=None, help="default: the config's training.device")
    parser.add_argument("--data-cache", type=Path, default=ROOT / "log" / "cache" / "data")
    args = parser.parse_args(argv)

    import torch

    from models.data import load_frames
    from models.harness import resolve_device

    raw = yaml.safe_load(args.config.read_text())
    default = validate_settings(raw)
    good = with_changes(raw, args.good)
    device = resolve_device(args.device or default.training.device)
    frames = load_frames(default.simulation, args.data_cache)
    print(f"device {device}, torch threads {torch.get_num_threads()}, config {args.config.name}")
    print(f"good config: {' '.join(args.good)}; target R2 >= {TARGET_R2}")
    runs = [
        measure(name, settings, frames, device, args.eval_every, args.max_steps)
        for name, settings in (("default", default), ("good", good))
    ]
    print(f"{'config':<8} {'steps':>6} {'train s':>8} {'steps/s':>8} {'R2':>6} {'s to target':>12}")
    for run in runs:
        target = (
            f"{run.time_to_target_s:.1f}" if run.time_to_target_s is not None else "not reached"
        )
        print(
            f"{run.name:<8} {run.steps:>6} {run.training_s:>8.1f} {run.steps_per_s:>8.1f} "
            f"{run.last_r2:>6.3f} {target:>12}"
        )
    slow, fast = runs
    print(f"steps/s ratio default/good: {slow.steps_per_s / fast.steps_per_s:.2f}")
    if fast.time_to_target_s is None:
        print("time-to-target ratio: n/a (the good config did not reach it)")
    elif slow.time_to_target_s is None:
        bound = slow.training_s / fast.time_to_target_s
        print(
            f"time-to-target ratio default/good: > {bound:.2f} (default: not in {slow.steps} steps)"
        )
    else:
        ratio = slow.time_to_target_s / fast.time_to_target_s
        print(f"time-to-target ratio default/good: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
