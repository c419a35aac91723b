"""The evaluation split: what each step of a run may see. Trusted code, numpy only.

A run is three steps, so that no edited code can reach the score:
- *train* sees `train/`: the training frames' coordinates and normalised targets;
- *predict* sees `eval/`: the coordinates of every evaluation point (the training frames and
  the held-out frames between them), in a shuffled order, and never a target;
- *score* alone sees `score/`: the true field values in that same order, which points are
  held out, and the normalisation to undo.

Coordinates are (t, x, y) in [-1, 1]: t follows the stored frame's time, so a held-out frame
between two training frames sits between them in t as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.atomic import write_atomic
from models.data import training_frame_indices
from models.settings import FIELD_CHANNELS

TRAIN, EVAL, SCORE = "train", "eval", "score"
TRAIN_FILE, EVAL_FILE, SCORE_FILE = "train.npz", "inputs.npy", "truth.npz"


def heldout_frame_indices(training: np.ndarray) -> np.ndarray:
    """The stored frame halfway between each two consecutive training frames (where one
    lies strictly between them)."""
    middles = (training[:-1] + training[1:]) // 2
    return middles[middles > training[:-1]]


@dataclass(frozen=True)
class EvaluationSplit:
    """One field's data, cut into what the three steps see (see the module docstring)."""

    train_coords: np.ndarray  # (T, N, 3) float32
    train_targets: np.ndarray  # (T, N, C) float32, normalised
    eval_coords: np.ndarray  # (M, 3) float32, shuffled
    truth: np.ndarray  # (M, C) float64, the field in physical units, same order
    heldout: np.ndarray  # (M,) bool: the point lies on a held-out frame
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)

    def write(self, folder: Path) -> None:
        """Write `train/`, `eval/` and `score/` under `folder`."""
        parts = {
            TRAIN: (TRAIN_FILE, {"coords": self.train_coords, "targets": self.train_targets}),
            SCORE: (SCORE_FILE, {"truth": self.truth, "heldout": self.heldout,
                                 "mean": self.mean, "std": self.std}),
        }
        for part, (name, arrays) in parts.items():
            (folder / part).mkdir(parents=True, exist_ok=True)
            write_atomic(folder / part / name, lambda handle, a=arrays: np.savez(handle, **a))
        (folder / EVAL).mkdir(parents=True, exist_ok=True)
        write_atomic(folder / EVAL / EVAL_FILE, lambda handle: np.save(handle, self.eval_coords))


def _coords(frames, indices: np.ndarray) -> np.ndarray:
    stored = frames.position.shape[0]
    particles = frames.position.shape[1]
    coords = np.empty((len(indices), particles, 3), dtype=np.float32)
    coords[..., 0] = (2.0 * indices / (stored - 1) - 1.0)[:, None]
    # the box is [0, 1]^2, so 2p - 1 maps it onto [-1, 1] for every frame alike
    coords[..., 1:] = 2.0 * frames.position[indices] - 1.0
    return coords


def _field(frames, field: str, indices: np.ndarray) -> np.ndarray:
    raw = getattr(frames, field)[indices].astype(np.float64)
    return raw.reshape(raw.shape[0], raw.shape[1], FIELD_CHANNELS[field])


def make_split(frames, field: str, n_frames: int, seed: int) -> EvaluationSplit:
    """The split of `field` on `n_frames` training frames; `seed` shuffles the evaluation
    points (so a model cannot replay targets in the order it was trained on)."""
    if field not in FIELD_CHANNELS:
        raise ValueError(f"unknown field {field!r}; choose one of {sorted(FIELD_CHANNELS)}")
    training = training_frame_indices(frames.position.shape[0], n_frames)
    heldout = heldout_frame_indices(training)
    train_raw = _field(frames, field, training)
    mean = train_raw.mean(axis=(0, 1))
    std = train_raw.std(axis=(0, 1))
    std = np.where(std > 1e-12, std, 1.0)  # a constant channel stays as it is, shifted to 0
    train_coords = _coords(frames, training)
    both = np.concatenate([training, heldout])
    eval_coords = _coords(frames, both).reshape(-1, 3)
    truth = _field(frames, field, both).reshape(-1, train_raw.shape[-1])
    points = train_raw.shape[1]
    is_heldout = np.repeat(np.arange(len(both)) >= len(training), points)
    order = np.random.default_rng([seed, 2]).permutation(len(eval_coords))
    return EvaluationSplit(
        train_coords=train_coords,
        train_targets=((train_raw - mean) / std).astype(np.float32),
        eval_coords=eval_coords[order],
        truth=truth[order],
        heldout=is_heldout[order],
        mean=mean,
        std=std,
    )


def load_train(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(coords, targets) of `folder`/train.npz."""
    with np.load(folder / TRAIN_FILE, allow_pickle=False) as npz:
        return npz["coords"], npz["targets"]


def load_eval_inputs(folder: Path) -> np.ndarray:
    return np.load(folder / EVAL_FILE, allow_pickle=False)


@dataclass(frozen=True)
class ScoreData:
    truth: np.ndarray
    heldout: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def load_score(folder: Path) -> ScoreData:
    with np.load(folder / SCORE_FILE, allow_pickle=False) as npz:
        return ScoreData(npz["truth"], npz["heldout"], npz["mean"], npz["std"])
