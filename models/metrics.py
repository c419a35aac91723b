"""How well a prediction matches the field: the trusted evaluator's numbers. Numpy only.

R² is 1 - SS_res / SS_tot (not a squared correlation; that one is reported as pearson_r2).
Multi-channel fields (F, S, C) are centred per channel, so a channel's offset earns nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Below this fraction of the target's energy, the target counts as constant.
_DEGENERATE = 1e-20


class NonFinitePrediction(ValueError):
    """The model predicted NaN or infinity somewhere: the run counts as diverged."""


@dataclass(frozen=True)
class FitMetrics:
    final_r2: float
    pearson_r2: float
    slope: float  # least-squares slope of prediction against truth
    final_mse: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_metrics(prediction: np.ndarray, truth: np.ndarray) -> FitMetrics:
    """Compare `prediction` with `truth` (same shape; last axis = channels for 2-D and up).

    A constant truth cannot be divided by: a prediction equal to it scores 1 on every
    measure, any other scores 0 (R², correlation and slope alike)."""
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} != truth shape {truth.shape}")
    if not np.isfinite(prediction).all():
        bad = int(np.size(prediction) - np.isfinite(prediction).sum())
        raise NonFinitePrediction(f"{bad} of {prediction.size} predicted values are not finite")
    if truth.ndim < 2:
        prediction, truth = prediction.reshape(-1, 1), truth.reshape(-1, 1)
    channels = truth.shape[-1]
    prediction, truth = prediction.reshape(-1, channels), truth.reshape(-1, channels)
    residual = prediction - truth
    ss_res = float((residual**2).sum())
    mse = ss_res / max(residual.size, 1)
    centred_truth = truth - truth.mean(axis=0)
    centred_prediction = prediction - prediction.mean(axis=0)
    ss_tot = float((centred_truth**2).sum())
    ss_pred = float((centred_prediction**2).sum())
    energy = float((truth**2).sum()) + float((prediction**2).sum()) + 1e-300
    if ss_tot <= _DEGENERATE * energy:
        perfect = 1.0 if ss_res == 0.0 else 0.0
        return FitMetrics(final_r2=perfect, pearson_r2=perfect, slope=perfect, final_mse=mse)
    covariance = float((centred_truth * centred_prediction).sum())
    pearson_r2 = 0.0 if ss_pred <= _DEGENERATE * energy else covariance**2 / (ss_tot * ss_pred)
    return FitMetrics(
        final_r2=1.0 - ss_res / ss_tot,
        pearson_r2=pearson_r2,
        slope=covariance / ss_tot,
        final_mse=mse,
    )
