"""The run harness: the trusted entry point of every step of a run.

    python -m models.harness prepare --config CFG --data-cache DIR --split DIR [--seed N]
    python -m models.harness train   --config CFG --data DIR --out DIR [--device DEV]
    python -m models.harness predict --config CFG --data DIR --state DIR --out DIR [--device DEV]
    python -m models.harness score   --config CFG --data DIR --state DIR --predictions DIR
                                     [--train-seconds S]
    python -m models.harness --check CFG

A run is split so that no edited code can reach the score (see `models/split.py`):
*prepare* (trusted) builds or loads the cached simulation and writes the split; *train* runs
the editable `models.trainer` on the training data only and saves the returned model's state
as tensors only (safetensors: every parameter and buffer); *predict*, in a fresh process,
builds `models.siren.Siren` from the config, loads that state and predicts the shuffled
evaluation inputs, never seeing a target; *score* (trusted: no editable code is ever imported
in it) computes every metric against the true values. prepare and score write
{"status", "metrics", "hyperparameters", "error"} as JSON to file descriptor 3, a channel
the train and predict processes are never given. Exit codes: 0 ok, 1 failed, 2 bad config,
3 diverged. `--check` validates the config only (no torch import) and prints
{"errors": [{"loc": [...], "msg": "..."}]}.

A zygote child calls `main(argv)` directly, so the editable modules are imported afresh in
every call, and nothing carries over from an earlier one.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from models.settings import FIELD_CHANNELS, ExperimentSettings, SettingsError, load_settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_DIVERGED = 0, 1, 2, 3
EXPLOSION_FACTOR = 1e4  # a loss this many times the first one counts as diverged
PROGRESS_EVERY_S = 15.0  # at most this long without a line from training or the simulation
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
    trainer that swallows the exception is still caught). With `total_steps`, it also prints
    a progress line when PROGRESS_EVERY_S passed without one, whatever the trainer prints: a
    slow run is never taken for a silent one."""

    def __init__(self, factor: float = EXPLOSION_FACTOR, total_steps: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.factor = factor
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.steps = 0
        self.reason: str | None = None
        self.total_steps = total_steps
        self._clock = clock
        self._last_progress = clock()

    def __call__(self, step: int, loss: float) -> None:
        loss = float(loss)
        self.steps = max(self.steps, int(step))
        self.last_loss = loss
        if self.total_steps is not None and self._clock() - self._last_progress >= \
                PROGRESS_EVERY_S:
            self._last_progress = self._clock()
            _say(f"step {step}/{self.total_steps} loss {loss:.3e}")
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


def only_file(folder: Path, name: str, step: str) -> None:
    """Refuse anything beside the one output a step may leave (a side file would carry data
    past the parameter count)."""
    from models.state import StateError

    others = sorted(p.name for p in folder.iterdir() if p.name != name)
    if others:
        raise StateError(f"the {step} step left {', '.join(others[:5])} beside {name}; "
                         "only that file may pass on")


class StepFailed(Exception):
    """A step cannot go on; the message says why."""


@dataclass
class StepResult:
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


def import_editable(name: str) -> ModuleType:
    """An editable module (models.siren or models.trainer) as it is on disk now, never a
    cached copy."""
    for module in EDITABLE_MODULES:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    return importlib.import_module(name)


def predict(model: Any, coords: Any, channels: int) -> Any:
    """The model's output on `coords` ((..., 3) tensor), in chunks, no grad, as a float32
    numpy array of shape (..., channels)."""
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
            outputs.append(chunk.detach().to("cpu", torch.float32))
    prediction = torch.cat(outputs).numpy()
    expected = (flat.shape[0], channels)
    if prediction.size != expected[0] * expected[1]:
        raise ValueError(f"the model output has shape {prediction.shape}, expected {expected}")
    return np.asarray(prediction).reshape(*coords.shape[:-1], channels)


def channels_of(settings: ExperimentSettings) -> int:
    return FIELD_CHANNELS[settings.dataset.field]


# ---------------------------------------------------------------------------- steps

STATE_FILE = "state.safetensors"
PREPARED_RECORD = "prepared.json"  # proctor keeps the split while these sections stay the same
SPLIT_SECTIONS = ("dataset", "simulation")
PREDICTIONS_FILE = "predictions.npy"


def prepare(settings: ExperimentSettings, args: argparse.Namespace, result: StepResult) -> None:
    """Load (or simulate and cache) the frames and write the evaluation split."""
    import yaml

    from models.atomic import write_atomic
    from models.data import DEFAULT_CACHE_DIR, load_frames
    from models.split import make_split

    frames = load_frames(settings.simulation, args.data_cache or DEFAULT_CACHE_DIR, log=_say)
    split = make_split(frames, settings.dataset.field, settings.dataset.n_frames, args.seed)
    split.write(args.split)
    # Last, so that proctor reuses only a complete split, and only while these stay the same.
    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    record = {"config": {name: config.get(name) for name in SPLIT_SECTIONS}, "seed": args.seed}
    write_atomic(args.split / PREPARED_RECORD, json.dumps(record).encode())
    count, particles, channels = split.train_targets.shape
    _say(
        f"dataset ready: field {settings.dataset.field}, {count} training frames x {particles} "
        f"particles ({channels} channel(s)); {int(split.heldout.sum())} held-out points"
    )
    result.status = "ok"


def train(settings: ExperimentSettings, args: argparse.Namespace, result: StepResult) -> None:
    """Train through the editable trainer on the training data; save the model's state."""
    import torch

    from models.data import TrainingData
    from models.split import load_train

    device = resolve_device(args.device or settings.training.device)
    coords, targets = load_train(args.data)
    data = TrainingData(torch.from_numpy(coords).to(device), torch.from_numpy(targets).to(device))
    siren = import_editable("models.siren")
    trainer = import_editable("models.trainer")
    model = build_model(siren, settings, channels_of(settings), device)
    _say(
        f"training on {device} (torch threads {torch.get_num_threads()}): "
        f"{sum(p.numel() for p in model.parameters())} parameters, "
        f"{settings.training.steps} steps, {coords.shape[0]} frames"
    )
    watchdog = DivergenceWatchdog(total_steps=settings.training.steps)
    try:
        trained = trainer.train(model, data, settings.training, watchdog)
    except Exception:
        if watchdog.reason is not None:  # the trainer wrapped the watchdog's exception
            raise Diverged(watchdog.reason) from None
        raise
    if watchdog.reason is not None:
        raise Diverged(watchdog.reason)  # the trainer swallowed the watchdog's exception
    if not isinstance(trained, torch.nn.Module):
        raise TypeError(
            f"train() must return the model (an nn.Module), got {type(trained).__name__}"
        )
    save_state(trained, args.out / STATE_FILE)
    _say(f"saved the trained state to {STATE_FILE}")
    result.status = "ok"


def save_state(model: Any, path: Path) -> None:
    """Every parameter and buffer of `model`, as plain tensors (no pickle)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to("cpu").contiguous().clone()
             for name, tensor in model.state_dict().items()}
    save_file(state, str(path))
    path.chmod(0o644)  # the scorer may run as another user than the sandboxed train step


def predict_step(
    settings: ExperimentSettings, args: argparse.Namespace, result: StepResult
) -> None:
    """Build the node's model afresh, load the trained state, predict the evaluation inputs."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from models.split import load_eval_inputs

    device = resolve_device(args.device or settings.training.device)
    siren = import_editable("models.siren")
    model = build_model(siren, settings, channels_of(settings), device)
    model.load_state_dict(load_file(str(args.state / STATE_FILE), device=str(device)))
    inputs = torch.from_numpy(load_eval_inputs(args.data)).to(device)
    _say(f"predicting {inputs.shape[0]} evaluation points")
    prediction = predict(model, inputs, channels_of(settings))
    np.save(args.out / PREDICTIONS_FILE, prediction, allow_pickle=False)
    (args.out / PREDICTIONS_FILE).chmod(0o644)
    result.status = "ok"


def score(settings: ExperimentSettings, args: argparse.Namespace, result: StepResult) -> None:
    """Every metric, from the predictions against the true values. Imports no editable code
    and never unpickles: the state and the predictions are untrusted files."""
    from models.metrics import NonFinitePrediction, fit_metrics
    from models.split import load_score
    from models.state import StateError, count_elements, load_predictions

    truth = load_score(args.data)
    try:
        only_file(args.state, STATE_FILE, "train")
        only_file(args.predictions, PREDICTIONS_FILE, "predict")
        result.metrics["total_params"] = count_elements(args.state / STATE_FILE)
        prediction = load_predictions(args.predictions / PREDICTIONS_FILE, truth.truth.shape)
    except StateError as exc:
        raise StepFailed(str(exc)) from None
    values = prediction.astype("float64") * truth.std + truth.mean
    seen = ~truth.heldout
    try:
        metrics = fit_metrics(values[seen], truth.truth[seen])
        heldout = fit_metrics(values[truth.heldout], truth.truth[truth.heldout]) \
            if truth.heldout.any() else None
    except NonFinitePrediction as exc:
        raise Diverged(str(exc)) from None
    result.metrics.update(metrics.as_dict())
    if heldout is not None:
        result.metrics["heldout_r2"] = heldout.final_r2
    if args.train_seconds is not None:
        result.metrics["training_time_s"] = args.train_seconds
        result.metrics["steps_per_s"] = settings.training.steps / max(args.train_seconds, 1e-9)
    result.status = "ok"


Step = Callable[[ExperimentSettings, argparse.Namespace, StepResult], None]
STEPS: dict[str, Step] = {"prepare": prepare, "train": train, "predict": predict_step,
                          "score": score}
REPORTING_STEPS = ("prepare", "score")  # the trusted steps, which hold the results channel
RESULTS_FD = 3


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.harness",
        description="One step of a run of the SIREN on the MPM field of CONFIG.",
    )
    parser.add_argument("--check", type=Path, metavar="CONFIG", help="validate CONFIG only")
    steps = parser.add_subparsers(dest="step", metavar="STEP")
    for name, step in STEPS.items():
        sub = steps.add_parser(name, help=(step.__doc__ or "").split("\n")[0])
        sub.add_argument("--config", type=Path, required=True, help="experiment config (YAML)")
        if name == "prepare":
            sub.add_argument("--data-cache", type=Path, default=None, help="simulation cache")
            sub.add_argument("--split", type=Path, required=True, help="where the split goes")
            sub.add_argument("--seed", type=int, default=0, help="shuffles the eval points")
            continue
        sub.add_argument("--data", type=Path, required=True, help="this step's part of the split")
        if name in ("train", "predict"):
            sub.add_argument("--out", type=Path, required=True, help="where outputs go")
            sub.add_argument("--device", help="override training.device (auto, cpu, cuda:N)")
        if name in ("predict", "score"):
            sub.add_argument("--state", type=Path, required=True, help="train's output folder")
        if name == "score":
            sub.add_argument("--predictions", type=Path, required=True,
                             help="predict's output folder")
            sub.add_argument("--train-seconds", type=float, default=None,
                             help="the train step's wall time, as the supervisor measured it")
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


def run_step(args: argparse.Namespace) -> int:
    """One step; the trusted ones report on the results channel. Returns the exit code."""
    result = StepResult()
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        result.error = f"bad config: {exc}"
        code = EXIT_BAD_CONFIG
    else:
        result.hyperparameters = hyperparameters(settings)
        code = _guarded(STEPS[args.step], settings, args, result)
    if result.error:
        print(f"[harness] {args.step}: {result.error}", file=sys.stderr, flush=True)
    if args.step in REPORTING_STEPS:
        _say(
            f"{args.step}: status {result.status} "
            + " ".join(f"{key} {_short(value)}" for key, value in result.metrics.items())
        )
        if not _report(result):
            return EXIT_FAILED
    return code


def _report(result: StepResult) -> bool:
    try:
        with os.fdopen(RESULTS_FD, "wb", closefd=True) as channel:
            channel.write(result.to_json().encode())
    except OSError as exc:
        print(f"[harness] cannot write the results to fd {RESULTS_FD}: {exc}", file=sys.stderr)
        return False
    return True


def _guarded(step: Step, settings: ExperimentSettings, args: argparse.Namespace,
             result: StepResult) -> int:
    try:
        step(settings, args, result)
        return EXIT_OK
    except Diverged as exc:
        result.status, result.error = "diverged", f"diverged: {exc}"
        return EXIT_DIVERGED
    except BadRuntimeConfig as exc:
        result.status, result.error = "failed", f"bad config: training.device: {exc}"
        return EXIT_BAD_CONFIG
    except StepFailed as exc:
        result.status, result.error = "failed", str(exc)
        return EXIT_FAILED
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
    if args.step is None:
        parser.print_usage(sys.stderr)
        print("[harness] name a step (prepare, train, predict, score) or --check CONFIG",
              file=sys.stderr)
        return EXIT_BAD_CONFIG
    for name in ("out",):
        folder = getattr(args, name, None)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    return run_step(args)


if __name__ == "__main__":
    sys.exit(main())
