"""The trusted evaluator's numbers against hand-computed references, and the watchdog."""

import math

import numpy as np
import pytest

from models.harness import Diverged, DivergenceWatchdog
from models.metrics import NonFinitePrediction, fit_metrics


def test_perfect_prediction_scores_one_everywhere():
    truth = np.linspace(0.5, 1.5, 50)
    metrics = fit_metrics(truth.copy(), truth)
    assert metrics.final_r2 == 1.0
    assert metrics.pearson_r2 == pytest.approx(1.0)
    assert metrics.slope == pytest.approx(1.0)
    assert metrics.final_mse == 0.0


def test_hand_computed_reference():
    # residual (0,0,0,1): SS_res 1; truth centred (-1.5,-.5,.5,1.5): SS_tot 5;
    # prediction centred (-1.75,-.75,.25,2.25): SS_pred 8.75, covariance 6.5
    metrics = fit_metrics(np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert metrics.final_r2 == pytest.approx(1 - 1 / 5)
    assert metrics.final_mse == pytest.approx(1 / 4)
    assert metrics.slope == pytest.approx(6.5 / 5)
    assert metrics.pearson_r2 == pytest.approx(6.5**2 / (5 * 8.75))


def test_slope_of_a_known_linear_relation():
    truth = np.random.default_rng(0).normal(size=1000)
    metrics = fit_metrics(2.0 * truth + 3.0, truth)
    assert metrics.slope == pytest.approx(2.0)
    assert metrics.pearson_r2 == pytest.approx(1.0)
    assert metrics.final_r2 < 0  # R² is not a correlation: an offset and a scale cost


def test_constant_target_is_handled_without_division_by_zero():
    truth = np.full((10, 1), 1.0)
    with np.errstate(all="raise"):
        exact = fit_metrics(truth.copy(), truth)
        off = fit_metrics(truth + 0.5, truth)
    assert (exact.final_r2, exact.pearson_r2, exact.slope) == (1.0, 1.0, 1.0)
    assert (off.final_r2, off.pearson_r2, off.slope) == (0.0, 0.0, 0.0)
    assert off.final_mse == pytest.approx(0.25)


def test_constant_prediction_of_a_varying_target():
    truth = np.array([1.0, 2.0, 3.0])
    with np.errstate(all="raise"):
        metrics = fit_metrics(np.full(3, 2.0), truth)
    assert metrics.final_r2 == pytest.approx(0.0)
    assert metrics.pearson_r2 == 0.0
    assert metrics.slope == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_prediction_is_reported(bad):
    prediction = np.ones(5)
    prediction[2] = bad
    with pytest.raises(NonFinitePrediction, match="1 of 5"):
        fit_metrics(prediction, np.arange(5.0))


def test_channels_are_centred_separately():
    # channel 1 sits 100 above channel 0: predicting each channel's mean explains nothing
    x = np.linspace(0, 1, 20)
    truth = np.stack([x, 100 + x], axis=-1)
    prediction = np.broadcast_to(truth.mean(axis=0), truth.shape)
    assert fit_metrics(prediction, truth).final_r2 == pytest.approx(0.0)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        fit_metrics(np.ones(3), np.ones(4))


def test_watchdog_passes_a_decreasing_loss_and_stops_nan_and_explosions():
    watchdog = DivergenceWatchdog(factor=100.0)
    for step, loss in enumerate([1.0, 0.5, 0.1, 50.0], start=1):
        watchdog(step, loss)
    assert watchdog.steps == 4 and watchdog.reason is None
    with pytest.raises(Diverged, match="exploded"):
        watchdog(5, 101.0)
    with pytest.raises(Diverged, match="nan"):
        DivergenceWatchdog()(1, math.nan)
    assert DivergenceWatchdog().reason is None


def test_the_watchdog_prints_progress_when_training_stays_quiet_too_long(capsys):
    now = [0.0]
    watchdog = DivergenceWatchdog(total_steps=500, clock=lambda: now[0])
    for step in range(1, 500):
        now[0] += 0.125  # 8 steps/s: a line every 120 steps, none between
        watchdog(step, 1.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[harness] step {s}/500 loss 1.000e+00" for s in (120, 240, 360, 480)]
    assert DivergenceWatchdog(clock=lambda: now[0] + 100)(1, 1.0) is None  # no total: quiet
    assert capsys.readouterr().out == ""
