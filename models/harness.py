"""The run entry point: trains through the editable code, evaluates the result itself.

    python -m models.harness --config CFG --results FILE [--data-cache DIR] [--device DEV]
    python -m models.harness --check CFG

A run validates the experiment sections, loads or builds the dataset, builds
`models.siren.Siren`, calls `models.trainer.train`, then evaluates the returned model here
(trusted code) and writes {"status", "metrics", "hyperparameters", "error"} atomically to
FILE, a path the editable code is not told about. Exit codes: 0 ok, 1 failed, 2 bad config,
3 diverged. `--check` validates the config only (no torch import) and prints
{"errors": [{"loc": [...], "msg": "..."}]}.

A zygote child calls `main(argv)` directly, so the editable modules are imported afresh in
`main`, and nothing carries over from an earlier call.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from models.settings import ExperimentSettings, SettingsError, load_settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_DIVERGED = 0, 1, 2, 3
EXPLOSION_FACTOR = 1e4  # a loss this many times the first one counts as diverged
EVAL_CHUNK_POINTS = 65_536
EDITABLE_MODULES = ("models.siren", "models.trainer")
METRIC_KEYS = (
    "final_r2",
    "pearson_r2",
    "slope",
    "final_mse",
    "training_time_s",
    "total_params",
    "steps_per_s",
)


class Diverged(Exception):
    """Raised by the watchdog (through `report`) or on non-finite predictions."""


class BadRuntimeConfig(Exception):
    """The config is valid but cannot run here (e.g. CUDA asked for, none present)."""


class DivergenceWatchdog:
    """The `report(step, loss)` callback the trainer gets: raises Diverged on a NaN/inf loss
    or one that explodes past EXPLOSION_FACTOR x the first, and remembers that it did (so a
    trainer that swallows the exception is still caught)."""

    def __init__(self, factor: float = EXPLOSION_FACTOR) -> None:
        self.factor = factor
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.steps = 0
        self.reason: str | None = None

    def __call__(self, step: int, loss: float) -> None:
        loss = float(loss)
        self.steps = max(self.steps, int(step))
        self.last_loss = loss
        if not math.isfinite(loss):
            self.reason = f"loss is {loss} at step {step}"
        elif self.first_loss is None:
            self.first_loss = loss
        elif loss > self.factor * max(self.first_loss, 1e-6):
            self.reason = (
                f"loss {loss:.3e} at step {step} exploded past {self.factor:.0e} x the first "
                f"loss {self.first_loss:.3e}"
            )
        if self.reason is not None:
            raise Diverged(self.reason)


@dataclass
class RunResult:
    status: str = "failed"  # ok | diverged | failed
    metrics: dict[str, float | int] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> str:
        # JSON has no NaN/inf: a value we could not measure is left out (an ok run has all)
        metrics = {key: value for key, value in self.metrics.items() if math.isfinite(value)}
        body = {
            "status": self.status,
            "metrics": metrics,
            "hyperparameters": self.hyperparameters,
            "error": self.error,
        }
        return json.dumps(body, indent=2) + "\n"


def hyperparameters(settings: ExperimentSettings) -> dict[str, Any]:
    """The key model/training values of a run, as recorded with its metrics."""
    return {
        "hidden_dim": settings.model.hidden_dim,
        "n_layers": settings.model.n_layers,
        "omega_0": settings.model.omega_0,
        "learnable_omega": settings.model.learnable_omega,
        "learning_rate": settings.training.learning_rate,
        "steps": settings.training.steps,
        "frames_per_batch": settings.training.frames_per_batch,
        "field": settings.dataset.field,
        "n_frames": settings.dataset.n_frames,
    }


def _say(message: str) -> None:
    print(f"[harness] {message}", flush=True)


def _exception_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.harness",
        description="Train the SIREN on the MPM field of CONFIG and write trusted metrics.",
    )
    parser.add_argument("--config", type=Path, help="experiment config (YAML)")
    parser.add_argument("--results", type=Path, help="where to write the results JSON")
    parser.add_argument("--data-cache", type=Path, default=None, help="dataset cache folder")
    parser.add_argument("--device", help="override training.device (auto, cpu, cuda, cuda:N)")
    parser.add_argument("--check", type=Path, metavar="CONFIG", help="validate CONFIG only")
    return parser


def check(path: Path) -> int:
    """Print the config's problems as JSON; 0 when there are none, 2 otherwise."""
    try:
        load_settings(path)
        errors: list[dict[str, Any]] = []
    except SettingsError as exc:
        errors = [{"loc": list(loc), "msg": msg} for loc, msg in exc.errors]
    print(json.dumps({"errors": errors}))
    return EXIT_OK if not errors else EXIT_BAD_CONFIG


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadRuntimeConfig(f"device {requested!r} asked for, but CUDA is not available")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BadRuntimeConfig(
                f"device {requested!r} asked for, but only {torch.cuda.device_count()} GPU(s)"
            )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise BadRuntimeConfig("device 'mps' asked for, but MPS is not available")
    return requested


def build_model(siren, settings, channels: int, device):
    """The SIREN of the config's model section, seeded by the training seed, on `device`."""
    import torch

    torch.manual_seed(settings.training.seed)
    return siren.Siren(
        in_features=3,
        out_features=channels,
        hidden_dim=settings.model.hidden_dim,
        n_layers=settings.model.n_layers,
        omega_0=settings.model.omega_0,
        learnable_omega=settings.model.learnable_omega,
    ).to(device)


def import_editable() -> tuple[ModuleType, ModuleType]:
    """models.siren and models.trainer as they are on disk now (never a cached copy)."""
    for name in EDITABLE_MODULES:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    return importlib.import_module("models.siren"), importlib.import_module("models.trainer")


def predict(model: Any, coords: Any, channels: int) -> Any:
    """The model's output on every training point (coords: (..., 3)), in chunks, no grad,
    as a float64 numpy array of shape (..., channels)."""
    import numpy as np
    import torch

    flat = coords.reshape(-1, coords.shape[-1])
    outputs = []
    model.eval()
    with torch.no_grad():
        for start in range(0, flat.shape[0], EVAL_CHUNK_POINTS):
            chunk = model(flat[start : start + EVAL_CHUNK_POINTS])
            if not isinstance(chunk, torch.Tensor):
                raise TypeError(f"the model returned {type(chunk).__name__}, not a tensor")
            outputs.append(chunk.detach().to("cpu", torch.float64))
    prediction = torch.cat(outputs).numpy()
    expected = (flat.shape[0], channels)
    if prediction.size != expected[0] * expected[1]:
        raise ValueError(f"the model output has shape {prediction.shape}, expected {expected}")
    return np.asarray(prediction).reshape(*coords.shape[:-1], channels)


def _train_and_evaluate(
    settings: ExperimentSettings, args: argparse.Namespace, result: RunResult
) -> None:
    """Everything that can fail after the config is known good; fills `result` in place."""
    import torch

    from models.data import DEFAULT_CACHE_DIR, field_samples, load_frames
    from models.metrics import NonFinitePrediction, fit_metrics

    device = resolve_device(args.device or settings.training.device)
    started = time.perf_counter()
    frames = load_frames(settings.simulation, args.data_cache or DEFAULT_CACHE_DIR, log=_say)
    samples = field_samples(frames, settings.dataset.field, settings.dataset.n_frames)
    data = samples.to_device(device)
    count, particles, channels = samples.values.shape
    _say(
        f"dataset ready: field {samples.field}, {count} frames x {particles} particles "
        f"({count * particles} points, {channels} channel(s)) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    siren, trainer = import_editable()
    model = build_model(siren, settings, channels, device)
    result.metrics["total_params"] = sum(p.numel() for p in model.parameters())
    _say(
        f"training on {device} (torch threads {torch.get_num_threads()}): "
        f"{result.metrics['total_params']} parameters, {settings.training.steps} steps"
    )
    watchdog = DivergenceWatchdog()
    started = time.perf_counter()
    try:
        trained = trainer.train(model, data, settings.training, watchdog)
    except Exception:
        if watchdog.reason is not None:  # the trainer wrapped the watchdog's exception
            raise Diverged(watchdog.reason) from None
        raise
    finally:
        elapsed = time.perf_counter() - started
        result.metrics["training_time_s"] = elapsed
        result.metrics["steps_per_s"] = watchdog.steps / elapsed if elapsed > 0 else 0.0
    if watchdog.reason is not None:
        raise Diverged(watchdog.reason)  # the trainer swallowed the watchdog's exception
    if not isinstance(trained, torch.nn.Module):
        raise TypeError(
            f"train() must return the model (an nn.Module), got {type(trained).__name__}"
        )
    _say(f"evaluating on all {count} training frames")
    prediction = predict(trained, data.coords, channels)
    try:
        metrics = fit_metrics(samples.denormalise(prediction), samples.truth)
    except NonFinitePrediction as exc:
        raise Diverged(str(exc)) from None
    result.metrics.update(metrics.as_dict())
    result.status = "ok"


def run(args: argparse.Namespace) -> int:
    """One training run; writes the results file and returns the exit code."""
    result = RunResult()
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        result.error = f"bad config: {exc}"
        code = EXIT_BAD_CONFIG
    else:
        result.hyperparameters = hyperparameters(settings)
        code = _guarded_run(settings, args, result)
    _say(
        f"result: status {result.status} "
        + " ".join(f"{key} {_short(value)}" for key, value in result.metrics.items())
        + (f" error {result.error}" if result.error else "")
    )
    try:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        from models.atomic import write_atomic

        write_atomic(args.results, result.to_json().encode())
    except OSError as exc:
        print(f"[harness] cannot write the results to {args.results}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code


def _guarded_run(settings: ExperimentSettings, args: argparse.Namespace, result: RunResult) -> int:
    try:
        _train_and_evaluate(settings, args, result)
        return EXIT_OK
    except Diverged as exc:
        result.status, result.error = "diverged", f"diverged: {exc}"
        return EXIT_DIVERGED
    except BadRuntimeConfig as exc:
        result.status, result.error = "failed", f"bad config: training.device: {exc}"
        return EXIT_BAD_CONFIG
    except (Exception, SystemExit) as exc:  # editable code may also call sys.exit
        traceback.print_exc(file=sys.stderr)
        result.status, result.error = "failed", _exception_line(exc)
        return EXIT_FAILED


def _short(value: float | int) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """The harness's command line; returns the exit code instead of exiting."""
    faulthandler.enable()
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage message
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_CONFIG
    if args.check is not None:
        return check(args.check)
    if args.config is None or args.results is None:
        print("[harness] --config and --results are both required (or --check)", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
