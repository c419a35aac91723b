"""The offline agent's model of the search space: which move to make, its gain and its cost.

Fitted afresh at every decision to every node of the run that ran:

- `GainModel`, a Gaussian process (scikit-learn) over the search-space keys, fitted to the
  R² gap to 1 on a log scale, `-log(1 - R²)`: a step from 0.95 to 0.97 weighs what it
  weighs to a researcher. A log-scaled range counts in decades, any other key spans one
  unit (choices on a log scale when they are positive numbers), so a tenfold learning rate
  is as far as the whole range of widths: before the length scales are learnt, that is how
  far apart a researcher would call them. It gives each candidate its predicted R² and
  its expected gain over the best R² so far (the expected improvement, in R² points).
- `CostModel`, log-linear in the numeric keys, `log t = a + Σ β_k log x_k`, its exponents
  pulled toward `COST_EXPONENT_PRIOR` (ridge), so the first finished node (the machine's own
  speed) already predicts and the run's own nodes correct the exponents. Its residual
  spread gives the upper estimate that is held against the timeouts.

Moves are ranked by expected gain, divided by (cost / parent's cost)^α when they cost more
than the parent, α the share of the iteration budget left (after "EI-cool", Lee et al. 2020):
a dearer move must promise more while the budget is young, pure gain counts at its end. A
cheaper move gets no bonus: on this kind of search space cheap means smaller, and smaller
rarely fits better.
scikit-learn is imported on the first fit only (it takes about a second).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from engine.config import ParamRange

# How training time grows with each key, before the run's own nodes say otherwise: a dense
# layer's work is width² per point (less on a CPU's small matrices), one more layer adds one,
# and the work is linear in the frames of a batch and the steps.
COST_EXPONENT_PRIOR = {
    "model.hidden_dim": 1.5,
    "model.n_layers": 1.0,
    "training.frames_per_batch": 1.0,
    "training.steps": 1.0,
}
# Beyond the largest value that ran, the upper estimate grows at least this fast: a fixed
# cost hides the growth among small models, so the fit alone extrapolates too low.
COST_EXPONENT_CEILING = {
    "model.hidden_dim": 2.0,
    "model.n_layers": 1.6,
    "training.frames_per_batch": 1.2,
    "training.steps": 1.2,
}
COST_RIDGE = 2.0  # the prior's weight, in nodes' worth of evidence
COST_SPREAD_PRIOR = 0.35  # log-time spread until three nodes have run
COST_SPREAD_FLOOR = 0.12  # a busy machine varies at least this much (log)
# The gain model's prior: a run that trains twice as long (wider, deeper, more frames per
# batch, more steps) shrinks the gap to R² 1 by this many e-folds, until the run's own nodes
# say otherwise (the default experiment: 0.13 for twice the width, 0.44 for twice the frames).
COMPUTE_GAIN_PER_DOUBLING = 0.2
UPPER_SPREADS = 2.0  # the upper estimate: this many spreads above the median
TIMEOUT_MARGIN = 0.8  # a move whose upper estimate passes this share of wall_s is not made

MIN_POINTS_TO_LEARN = 3  # the kernel's scales are fitted from this many scored nodes on
R2_FLOOR_GAP = 1e-4  # -log(1 - R²) saturates here (R² 0.9999)
GAIN_QUANTILES = 64  # points of the predictive normal the expected gain averages over
LOG_FACTORS = (1.5, 2.0, 3.0)  # moves of a log-scaled key, both ways (the protocol's 2-3)
PUSH_FACTORS = (5.0, 10.0)  # and, the way the parent's own step on it helped, these
LINEAR_FRACTIONS = (0.15, 0.3, 0.5)  # moves of a linear key, both ways, as parts of it
SIGNIFICANT_DIGITS = 3  # proposed floats read like a person typed them

_NORMAL_POINTS = tuple(NormalDist().inv_cdf((i + 0.5) / GAIN_QUANTILES)
                       for i in range(GAIN_QUANTILES))


@dataclass(frozen=True)
class Observed:
    """One node as the models see it: its values of the space, its R², its training time."""

    values: Mapping[str, Any]
    r2: float | None  # None: not scored (it failed)
    seconds: float | None  # the train step's wall time; None when unknown


@dataclass(frozen=True)
class Move:
    """A candidate change from a parent, with what the models expect of it."""

    changes: Mapping[str, Any]
    predicted_r2: float
    expected_gain: float  # E[max(R² - best so far, 0)]
    seconds: float | None  # predicted training time (median); None: nothing ran yet
    seconds_high: float | None  # the upper estimate held against the timeouts
    acquisition: float


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def same_value(a: Any, b: Any) -> bool:
    """Equality that treats 3e-05 and 3.0000000000000004e-05 as the same config value."""
    if is_number(a) and is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def dotted_value(sections: Mapping[str, Any], dotted: str) -> Any:
    """The value at `dotted` in nested mappings; KeyError when absent."""
    node: Any = sections
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def choice_index(choices: Sequence[Any], current: Any) -> int:
    for index, choice in enumerate(choices):
        if same_value(choice, current):
            return index
    numeric = [c for c in choices if isinstance(c, int | float) and not isinstance(c, bool)]
    if numeric and isinstance(current, int | float) and not isinstance(current, bool):
        nearest = min(numeric, key=lambda c: abs(float(c) - float(current)))
        return list(choices).index(nearest)
    return 0


def direction_of(spec: ParamRange, old: Any, new: Any) -> int:
    """+1 when the change went up (a later choice, a larger number), -1 when down, 0 level."""
    if spec.choices is not None:
        delta = choice_index(spec.choices, new) - choice_index(spec.choices, old)
    else:
        try:
            delta = float(new) - float(old)
        except (TypeError, ValueError):
            return 0
    return (delta > 0) - (delta < 0)


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    return float(f"{value:.{digits}g}") if value else 0.0


class Encoder:
    """Each key of the space to a number: a log-scaled range in decades from its low end;
    positive numeric choices on a log scale, other ranges linearly and other choices by
    their position, each spanning one unit."""

    def __init__(self, space: Mapping[str, ParamRange]) -> None:
        self.keys = sorted(space)
        self.space = space

    def __call__(self, values: Mapping[str, Any]) -> list[float] | None:
        encoded = []
        for key in self.keys:
            if key not in values:
                return None
            position = self._position(self.space[key], values[key])
            if position is None:
                return None
            encoded.append(position)
        return encoded

    @staticmethod
    def _position(spec: ParamRange, value: Any) -> float | None:
        if spec.choices is not None:
            choices = list(spec.choices)
            if all(is_number(c) and c > 0 for c in choices) and is_number(value) \
                    and 0 < value < math.inf:
                low, high = math.log(min(choices)), math.log(max(choices))
                return 0.5 if high == low else (math.log(value) - low) / (high - low)
            index = next((i for i, c in enumerate(choices) if same_value(c, value)), None)
            if index is None:
                return None
            return 0.5 if len(choices) == 1 else index / (len(choices) - 1)
        if not is_number(value) or not math.isfinite(value):
            return None
        low, high = float(spec.low), float(spec.high)  # type: ignore[arg-type]
        if spec.log:
            if value <= 0:
                return None
            return math.log10(value) - math.log10(low)
        return (float(value) - low) / (high - low)


def r2_to_target(r2: float) -> float:
    return -math.log(min(max(1.0 - r2, R2_FLOOR_GAP), 10.0))


def target_to_r2(target: float) -> float:
    return 1.0 - math.exp(-target)


class GainModel:
    """A Gaussian process of `-log(1 - R²)` over the encoded space, around a prior mean
    (`prior`: a function of a point, e.g. how much more compute it spends; none: flat)."""

    def __init__(self, encoder: Encoder, observed: Sequence[Observed], seed: int = 0,
                 prior: Callable[[Mapping[str, Any]], float] | None = None) -> None:
        self.encoder = encoder
        self._prior = prior or (lambda values: 0.0)
        rows = [(self.encoder(o.values), o.r2, o.values) for o in observed if o.r2 is not None]
        rows = [(x, r2, values) for x, r2, values in rows if x is not None]
        self.size = len(rows)
        self.best = max((r2 for _, r2, _ in rows), default=None)
        self._process = None
        targets = [r2_to_target(r2) - self._prior(values) for _, r2, values in rows]
        # the process models the departure from the mean target (its own mean is zero)
        self._mean = sum(targets) / len(targets) if targets else 0.0
        if rows:
            self._process = self._fit([x for x, _, _ in rows],
                                      [target - self._mean for target in targets], seed)

    def _fit(self, x: list[list[float]], y: list[float], seed: int) -> Any:
        import warnings

        import numpy
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        dims = len(self.encoder.keys)
        # The signal's spread is not learnt down to the spread of a few similar results (what
        # normalising would do): one move can change the gap to 1 several-fold, so the
        # amplitude stays at least 0.3 e-folds, however alike the first nodes came out.
        kernel = (ConstantKernel(1.0, (0.1, 25.0))
                  * Matern(length_scale=[1.0] * dims, length_scale_bounds=(0.05, 20.0), nu=2.5)
                  + WhiteKernel(1e-2, (1e-6, 1.0)))
        # Too few points to learn length scales from: keep the prior's (one unit each).
        learn = len(y) >= MIN_POINTS_TO_LEARN
        process = GaussianProcessRegressor(kernel=kernel, normalize_y=False,
                                           optimizer="fmin_l_bfgs_b" if learn else None,
                                           n_restarts_optimizer=1 if learn else 0,
                                           random_state=seed)
        with warnings.catch_warnings():  # few points: bounds are often reached, harmlessly
            warnings.simplefilter("ignore", ConvergenceWarning)
            process.fit(numpy.array(x), numpy.array(y))
        return process

    def predict(self, values: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
        """(mean, standard deviation) of the target at each point; a point that cannot be
        encoded gets the prior (the best so far, with a wide spread)."""
        encoded = [self.encoder(v) for v in values]
        shifts = [self._mean + self._prior(v) for v in values]
        if self._process is None or not any(x is not None for x in encoded):
            return [(shift, 1.0) for shift in shifts]
        import numpy

        known = [x for x in encoded if x is not None]
        means, sds = self._process.predict(numpy.array(known), return_std=True)
        found = iter(zip(means.tolist(), sds.tolist(), strict=True))
        predictions = []
        for x, shift in zip(encoded, shifts, strict=True):
            mean, sd = next(found) if x is not None else (0.0, 1.0)
            predictions.append((mean + shift, sd))
        return predictions

    def expected_gain(self, mean: float, sd: float) -> float:
        """E[max(R² - best, 0)] under the normal prediction of the target."""
        if self.best is None:
            return 0.0
        sd = max(sd, 1e-9)
        return sum(max(target_to_r2(mean + sd * z) - self.best, 0.0)
                   for z in _NORMAL_POINTS) / GAIN_QUANTILES


class CostModel:
    """Training seconds from the numeric keys, log-linear, ridge-pulled toward the prior."""

    def __init__(self, space: Mapping[str, ParamRange], observed: Sequence[Observed],
                 extra_keys: Iterable[str] = ()) -> None:
        numeric = [k for k in sorted(space) if self._numeric(space[k])]
        self.keys = numeric + [k for k in extra_keys if k not in numeric]
        rows = [(self._features(o.values), math.log(o.seconds)) for o in observed
                if o.seconds is not None and o.seconds > 0]
        rows = [(f, t) for f, t in rows if f is not None]
        self.size = len(rows)
        self.spread = COST_SPREAD_PRIOR
        self._weights: list[float] | None = None
        self._intercept = 0.0
        self._largest = [max(f[i] for f, _ in rows) for i in range(len(self.keys))] \
            if rows else []
        if rows:
            self._fit(rows)

    @staticmethod
    def _numeric(spec: ParamRange) -> bool:
        if spec.choices is not None:
            return all(is_number(c) and c > 0 for c in spec.choices)
        return bool(spec.low is not None and spec.low > 0)

    def _features(self, values: Mapping[str, Any]) -> list[float] | None:
        features = []
        for key in self.keys:
            value = values.get(key)
            if not is_number(value) or value <= 0:
                return None
            features.append(math.log(value))
        return features

    def _fit(self, rows: list[tuple[list[float], float]]) -> None:
        import numpy

        prior = numpy.array([COST_EXPONENT_PRIOR.get(k, 0.0) for k in self.keys])
        x = numpy.array([f for f, _ in rows])
        y = numpy.array([t for _, t in rows])
        centre_x, centre_y = x.mean(axis=0), y.mean()
        dx, dy = x - centre_x, y - centre_y
        # minimise |dy - dx β|² + λ|β - prior|²: the normal equations, solved directly
        ridge = COST_RIDGE * numpy.eye(len(self.keys))
        weights = numpy.linalg.solve(dx.T @ dx + ridge, dx.T @ dy + ridge @ prior)
        self._weights = weights.tolist()
        self._intercept = float(centre_y - centre_x @ weights)
        if len(rows) >= 3:
            residuals = dy - dx @ weights
            spread = math.sqrt(float(residuals @ residuals) / (len(rows) - 1))
            self.spread = max(spread, COST_SPREAD_FLOOR)

    def predict(self, values: Mapping[str, Any]) -> tuple[float, float] | None:
        """(median seconds, upper estimate); None before any node ran or for a point that
        cannot be placed."""
        if self._weights is None:
            return None
        features = self._features(values)
        if features is None:
            return None
        log_time = self._intercept + sum(w * f for w, f in zip(self._weights, features,
                                                               strict=True))
        beyond = sum(max(f - largest, 0.0) * max(COST_EXPONENT_CEILING.get(key, 0.0) - w, 0.0)
                     for key, w, f, largest in zip(self.keys, self._weights, features,
                                                   self._largest, strict=True))
        return math.exp(log_time), math.exp(log_time + beyond + UPPER_SPREADS * self.spread)


def compute_prior(cost: CostModel) -> Callable[[Mapping[str, Any]], float] | None:
    """The gain model's prior mean from the cost model: `COMPUTE_GAIN_PER_DOUBLING` per
    doubling of the predicted training time; None before any node ran."""
    def prior(values: Mapping[str, Any]) -> float:
        predicted = cost.predict(values)
        return COMPUTE_GAIN_PER_DOUBLING * math.log2(predicted[0]) if predicted else 0.0

    return prior if cost.size else None


def one_key_values(spec: ParamRange, current: Any, push: int = 0) -> list[Any]:
    """The values a one-key move may give the key: every other choice; a log-scaled range
    multiplied and divided by `LOG_FACTORS`, and by `PUSH_FACTORS` the way `push` says (+1
    up, -1 down: the protocol's boundary probe, for a step that helped); a linear one moved
    by `LINEAR_FRACTIONS` of its value (or of the range, at 0) — all inside the range,
    rounded as a person would type."""
    if spec.choices is not None:
        return [c for c in spec.choices if not same_value(c, current)]
    if not is_number(current):
        return []
    low, high = float(spec.low), float(spec.high)  # type: ignore[arg-type]
    value = float(current)
    if spec.log:
        base = value if value > 0 else low
        raw = [base * f for f in LOG_FACTORS] + [base / f for f in LOG_FACTORS]
        raw += [base * f ** push for f in PUSH_FACTORS] if push else []
    else:
        size = abs(value) or (high - low)
        raw = [value + sign * size * fraction for fraction in LINEAR_FRACTIONS
               for sign in (1, -1)]
    values: list[Any] = []
    for new in raw:
        new = min(max(new, low), high)
        new = int(round(new)) if spec.integer else min(max(round_significant(new), low), high)
        if not same_value(new, value) and not any(same_value(new, v) for v in values):
            values.append(new)
    return values


def rank_moves(gain: GainModel, cost: CostModel, parent_values: Mapping[str, Any],
               changes: Sequence[Mapping[str, Any]], budget_left: float,
               wall_s: float | None) -> list[Move]:
    """`changes` (each a set of key -> value from the parent) ranked best first by expected
    gain over the extra cost^α (α = `budget_left`, 0..1). Moves expected to pass `TIMEOUT_MARGIN` of
    `wall_s` are left out."""
    points = [dict(parent_values) | dict(change) for change in changes]
    predictions = gain.predict(points)
    reference = cost.predict(parent_values)
    alpha = min(max(budget_left, 0.0), 1.0)
    moves = []
    for change, point, (mean, sd) in zip(changes, points, predictions, strict=True):
        seconds = cost.predict(point)
        if seconds is not None and wall_s is not None and seconds[1] > TIMEOUT_MARGIN * wall_s:
            continue
        expected = gain.expected_gain(mean, sd)
        dearer = max(seconds[0] / reference[0], 1.0) if seconds and reference else 1.0
        moves.append(Move(dict(change), target_to_r2(mean), expected,
                          seconds[0] if seconds else None, seconds[1] if seconds else None,
                          expected / dearer ** alpha))
    # ties go by the change itself, so the choice never depends on the candidates' order
    moves.sort(key=lambda m: (-m.acquisition, -m.predicted_r2,
                              repr(sorted(m.changes.items(), key=repr))))
    return moves
