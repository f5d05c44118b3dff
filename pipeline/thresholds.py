"""The threshold policy: a score's calibration, the `--threshold` spec, and the number it resolves to.

Calibration: a score's distribution on held-out normal data, stored with the exported
model (`calibrate`); thresholds are taken from it.

Thresholds are given as specs (`parse_threshold`):
- `quantile:Q`: the Q-quantile of the model's calibration;
- `contamination:X`: flag the top X share of the scored corpus (needs every score first);
- `value:X`: a fixed score.
`resolve_threshold` turns a spec into the number a score is compared with (flag: score > value).

NumPy only (scikit-learn for the mixture fit, SciPy for the tolerance factor): the report imports it in its scan tasks, which
never load torch. The scores themselves are computed in `pipeline.scoring`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.scores import SCORES

CALIBRATION_GRID = 100  # held-out percentiles kept with each score's calibration, for reports
THRESHOLD_POLICIES = ("quantile", "contamination", "value")
# A job that flags rows as they stream by (embed) cannot take a share of the whole corpus.
STREAMING_POLICIES = ("quantile", "value")


# ---------------------------------------------------------------- calibration
#
# Thresholds are taken on a score's calibration: its distribution on the held-out split of
# the training corpus. A real corpus holds anomalies (a few percent, unlabelled), so the
# held-out split does too, and its plain 99th percentile sits among them. The calibration
# therefore estimates the normal bulk alone, on the log of the score (errors are positive
# and spread multiplicatively):
# - with MIXTURE_MIN or more values, one Gaussian, or two when the Bayesian information
#   criterion prefers them (the lower, heavier one is the normal bulk; the upper one the
#   anomalies). On a clean split BIC keeps one Gaussian; a mixture alone would split a clean
#   bulk in two.
# - with fewer, a mixture's split is mostly noise (bench/small_splits.py: too many normal
#   images flagged on many small splits), so the bulk is what survives upper-tail clipping: start from the median and 1.4826 MAD, drop values more than CLIP_SIGMAS
#   above the bulk's mean, refit mean and standard deviation, repeat until nothing changes.
#   Anomalies are high scores, so only the upper tail is clipped.
# The share of the split outside the bulk is the estimated contamination.
#
# `quantile:Q` is not the bulk's fitted Q-quantile itself but an upper confidence bound on it
# (CONFIDENCE, from the bulk's size): a threshold fitted on 20 images is uncertain, and an
# uncertain threshold that lands low flags many normal images while one that lands high only
# misses a few anomalies. The bound is the one-sided normal tolerance factor (the noncentral t
# quantile): it shrinks towards the plain quantile as the split grows (2.48 sigmas for the
# 0.99-quantile of 250 values, against 2.33; 3.05 for 20 values).
#
# Scores are fused on a common scale: each one's robust z, (log score - median) / (1.4826 MAD)
# of its held-out values, which anomalies in the split barely move. A collapsed spread (every
# held-out value equal) falls back to the bulk's fitted scale, and neither is ever below
# MIN_SPREAD, so that a z stays finite and a tiny change is not read as a huge one.

MAX_CONTAMINATION = 0.5  # a mixture whose upper component weighs more is not "normal bulk + anomalies"
MIXTURE_MIN = 200
LEAVE_ONE_OUT_MAX = 1000  # held-out values up to which the fused calibration leaves each one out
CLIP_SIGMAS = 3.5
CONFIDENCE = 0.9  # of the upper bound that `quantile:Q` thresholds take
MIN_SPREAD = 1e-3  # of a log score: a 0.1% change; of a z-scale score, a thousandth of a sigma
_BULK = statistics.NormalDist()
_MAD_TO_SD = 1.4826


def _clipped_bulk(values: np.ndarray) -> tuple[float, float, float]:
    """(location, scale, contamination) of what survives iterative upper-tail clipping."""
    location = float(np.median(values))
    scale = _MAD_TO_SD * float(np.median(np.abs(values - location))) or float(values.std())
    kept = np.ones(values.size, dtype=bool)
    for _ in range(50):
        inside = values <= location + CLIP_SIGMAS * max(scale, 1e-12)
        if inside.sum() < 3:
            break
        location, scale = float(values[inside].mean()), float(values[inside].std(ddof=1))
        if np.array_equal(inside, kept):
            break
        kept = inside
    return location, max(scale, MIN_SPREAD), 1.0 - float(kept.mean())


def fit_normal_bulk(values: np.ndarray) -> tuple[float, float, float]:
    """(location, scale, contamination) of the Gaussian bulk of `values`: with MIXTURE_MIN or more
    values, one Gaussian, or the lower of two when BIC prefers two and the upper one weighs at
    most MAX_CONTAMINATION; with fewer, the upper-tail-clipped bulk."""
    from sklearn.mixture import GaussianMixture

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 3:
        raise InputError(f"a calibration needs at least 3 held-out values, got {values.size}")
    location, scale = float(values.mean()), float(values.std())
    if scale <= MIN_SPREAD:  # every value (nearly) the same
        return location, MIN_SPREAD, 0.0
    if values.size < MIXTURE_MIN:
        return _clipped_bulk(values)
    column = values[:, None]
    one = GaussianMixture(1, random_state=0).fit(column)
    two = GaussianMixture(2, n_init=3, random_state=0).fit(column)
    if two.bic(column) >= one.bic(column):
        return location, scale, 0.0
    means, sds, weights = two.means_[:, 0], np.sqrt(two.covariances_.reshape(-1)), two.weights_
    bulk, tail = (0, 1) if means[0] < means[1] else (1, 0)
    if weights[tail] > MAX_CONTAMINATION:
        return location, scale, 0.0
    return float(means[bulk]), max(float(sds[bulk]), MIN_SPREAD), float(weights[tail])


def tolerance_factor(n: int, q: float, confidence: float = CONFIDENCE) -> float:
    """k such that mean + k * sd of n Gaussian values lies above the q-quantile with probability
    `confidence` (the one-sided normal tolerance factor)."""
    from scipy.stats import nct

    n = max(int(n), 3)
    z = _BULK.inv_cdf(q)
    return float(nct.ppf(confidence, df=n - 1, nc=z * math.sqrt(n)) / math.sqrt(n))


def robust_spread(values: np.ndarray, centre: float, fallback: float | None = None) -> float:
    """1.4826 MAD about `centre`; when that collapses (over half the values equal), `fallback`
    (the bulk's fitted scale) or the standard deviation; never below MIN_SPREAD."""
    spread = _MAD_TO_SD * float(np.median(np.abs(values - centre)))
    if spread <= MIN_SPREAD:
        spread = float(values.std()) if fallback is None else fallback
    return max(spread, MIN_SPREAD)


@dataclass(frozen=True)
class ScoreCalibration:
    """One score's held-out distribution: the normal bulk's fit, the contamination estimate,
    the robust centre and spread that put the score on the fused scale, and the raw quantiles
    (q = i / CALIBRATION_GRID) for reports."""

    count: int
    log: bool  # fitted on log(score); False for scores already on a z scale (fused)
    location: float
    scale: float
    contamination: float
    median: float
    spread: float  # 1.4826 MAD: the standard deviation, were the values Gaussian
    grid: tuple[float, ...]

    @classmethod
    def fit(cls, values: np.ndarray, log: bool = True) -> ScoreCalibration:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        fitted = np.log(np.maximum(values, 1e-12)) if log else values
        location, scale, contamination = fit_normal_bulk(fitted)
        median = float(np.median(fitted))
        grid = np.quantile(values, np.linspace(0.0, 1.0, CALIBRATION_GRID + 1))
        return cls(int(values.size), log, location, scale, contamination, median,
                   robust_spread(fitted, median, scale), tuple(float(v) for v in grid))

    @property
    def bulk_count(self) -> int:
        """Held-out values the normal bulk was fitted on."""
        return max(3, round(self.count * (1.0 - self.contamination)))

    def _check(self, q: float) -> None:
        if not 0.0 < q < 1.0:
            raise InputError(f"quantile must be in (0, 1), got {q}")

    def _units(self, value: float) -> float:
        return math.exp(value) if self.log else value

    def estimate(self, q: float) -> float:
        """The normal bulk's fitted q-quantile (the point estimate), in the score's own units."""
        self._check(q)
        return self._units(self.location + _BULK.inv_cdf(q) * self.scale)

    def quantile(self, q: float, confidence: float = CONFIDENCE) -> float:
        """The upper `confidence` bound on the normal bulk's q-quantile, in the score's own units:
        what `quantile:Q` thresholds take."""
        self._check(q)
        return self._units(self.location + tolerance_factor(self.bulk_count, q, confidence) * self.scale)

    def standardise(self, values: np.ndarray) -> np.ndarray:
        """Each value's robust z: how many spreads above the held-out median it is."""
        values = np.asarray(values, dtype=np.float64)
        fitted = np.log(np.maximum(values, 1e-12)) if self.log else values
        return (fitted - self.median) / self.spread

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "log": self.log, "location": self.location, "scale": self.scale,
                "contamination": self.contamination, "median": self.median, "spread": self.spread,
                "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScoreCalibration:
        if "location" not in values:  # a model made before the robust fit: refit its stored quantiles
            return cls.fit(np.asarray(values["grid"], dtype=np.float64))
        return cls(int(values["count"]), bool(values["log"]), float(values["location"]), float(values["scale"]),
                   float(values["contamination"]), float(values["median"]), float(values["spread"]),
                   tuple(float(v) for v in values["grid"]))


@dataclass(frozen=True)
class Calibration:
    """Every score's calibration, the fused score's recipe, and the default score."""

    scores: dict[str, ScoreCalibration]
    default_score: str
    fused_from: tuple[str, ...] = ()

    def get(self, score: str) -> ScoreCalibration:
        if score not in self.scores:
            raise InputError(f"the model's calibration has no score {score!r}; it has: {', '.join(self.scores)} "
                             "(retrain with this version of the train job for the newer scores)")
        return self.scores[score]

    def threshold(self, score: str, q: float) -> float:
        return self.get(score).quantile(q)

    def fuse(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The fused score: the largest robust z of its parts (an image is as odd as its oddest
        score says)."""
        return np.max(self.fused_parts(values), axis=0)

    def fused_parts(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """(parts, N): each of the fused score's parts as its robust z."""
        return np.stack([self.get(name).standardise(values[name]) for name in self.fused_from])

    def fuse_held_out(self, held_out: dict[str, np.ndarray]) -> np.ndarray:
        """The fused score of each held-out image as an unseen image would get it: its parts
        standardised by the median and spread of the other held-out values (leave one out). The
        plain in-sample fuse reads a small split as tighter than it is, and its threshold too low.
        Above LEAVE_ONE_OUT_MAX values the difference is negligible and the plain fuse is used."""
        return np.max(self.held_out_parts(held_out), axis=0)

    def held_out_parts(self, held_out: dict[str, np.ndarray]) -> np.ndarray:
        """(parts, N): each held-out image's parts as fuse_held_out standardises them."""
        first = np.asarray(held_out[self.fused_from[0]])
        if first.size > LEAVE_ONE_OUT_MAX:
            return self.fused_parts(held_out)
        parts = []
        for name in self.fused_from:
            calibration = self.get(name)
            values = np.asarray(held_out[name], dtype=np.float64)
            fitted = np.log(np.maximum(values, 1e-12)) if calibration.log else values
            others = ~np.eye(fitted.size, dtype=bool)
            z = np.empty(fitted.size)
            for i in range(fitted.size):
                rest = fitted[others[i]]
                centre = float(np.median(rest))
                z[i] = (fitted[i] - centre) / robust_spread(rest, centre)
            parts.append(z)
        return np.stack(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"format": 2, "default_score": self.default_score, "fused_from": list(self.fused_from),
                "scores": {name: c.to_dict() for name, c in self.scores.items()},
                "contamination": self.scores[self.default_score].contamination}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Calibration:
        if not values:
            raise InputError("the model has no calibration: train it with this project's train job, or pass value:X")
        if "scores" not in values:  # one mse calibration, as models made before the scores were
            return cls({"mse": ScoreCalibration.from_dict(values)}, "mse")
        return cls({name: ScoreCalibration.from_dict(c) for name, c in values["scores"].items()},
                   values["default_score"], tuple(values.get("fused_from", ())))


def calibrate(held_out: dict[str, np.ndarray], default_score: str, fused_from: Sequence[str] = ()) -> Calibration:
    """Fit every held-out score (on its log when the registry says so); with `fused_from`, the fused
    score too."""
    scores = {name: ScoreCalibration.fit(values, log=SCORES[name].log if name in SCORES else True)
              for name, values in held_out.items()}
    partial = Calibration(scores, default_score if default_score in scores else "mse", tuple(fused_from))
    if fused_from:
        scores["fused"] = ScoreCalibration.fit(partial.fuse_held_out(held_out), log=False)
    return Calibration(scores, default_score, tuple(fused_from))


def default_score(calibration: dict[str, Any] | None) -> str:
    """The score a model flags anomalies by unless told otherwise: its calibration's default
    ("mse" for a model made before there were others)."""
    return Calibration.from_dict(calibration).default_score if calibration else "mse"


def calibration_from_errors(errors: np.ndarray) -> dict[str, Any]:
    """A calibration of per-image mse alone (models and tests that have only that score)."""
    return calibrate({"mse": np.asarray(errors, dtype=np.float64)}, "mse").to_dict()


def threshold_from_calibration(calibration: dict[str, Any] | None, q: float, score: str | None = None) -> float:
    """The q-quantile of the normal bulk of a score's held-out values (the default score's when None)."""
    parsed = Calibration.from_dict(calibration)
    return parsed.threshold(score or parsed.default_score, q)


# ---------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdSpec:
    """A parsed `--threshold`: policy ("quantile", "contamination" or "value") and its number."""

    text: str
    policy: str
    parameter: float


def _spec_forms(policies: Sequence[str]) -> str:
    forms = {"quantile": "quantile:Q", "contamination": "contamination:X", "value": "value:X"}
    named = [forms[p] for p in policies]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]


def parse_threshold(spec: str, policies: Sequence[str] = THRESHOLD_POLICIES) -> ThresholdSpec:
    """'quantile:0.99' | 'contamination:0.05' | 'value:0.02' -> ThresholdSpec; InputError otherwise.

    `policies` limits the forms a caller accepts (the embed job flags rows one batch at a
    time, so it cannot take a contamination share of the whole corpus).
    """
    policy, _, number = str(spec).partition(":")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if policy not in policies or not math.isfinite(value):
        raise InputError(f"--threshold must be {_spec_forms(policies)}, got {spec!r}")
    if policy == "quantile" and not 0.0 <= value <= 1.0:
        raise InputError(f"quantile threshold must be in [0, 1], got {value}")
    if policy == "contamination" and not 0.0 <= value <= 1.0:
        raise InputError(f"contamination must be a share in [0, 1], got {value}")
    return ThresholdSpec(str(spec), policy, value)


def contamination_threshold(scores: np.ndarray, share: float) -> float:
    """The value that flags the top `share` of `scores` (flag: score > value).

    Midway between the last kept and the first flagged score, so exactly round(share * n)
    rows are flagged unless scores tie at the cut; +inf when there are no scores.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    if n == 0:
        return math.inf
    k = int(round(share * n))
    if k <= 0:
        return float(ordered[-1])
    if k >= n:
        return float(np.nextafter(ordered[0], -np.inf))
    return float((ordered[n - k - 1] + ordered[n - k]) / 2)


def resolve_threshold(spec: str | ThresholdSpec, calibration: dict[str, Any] | None = None,
                      scores: np.ndarray | None = None, score: str | None = None) -> float:
    """The number a spec names for `score` (the calibration's default when None): a quantile of
    its calibration, a share of `scores`, or the value."""
    parsed = spec if isinstance(spec, ThresholdSpec) else parse_threshold(spec)
    if parsed.policy == "value":
        return parsed.parameter
    if parsed.policy == "quantile":
        return threshold_from_calibration(calibration, parsed.parameter, score)
    if scores is None:
        raise InputError(f"--threshold {parsed.text} needs the scores of the whole corpus")
    return contamination_threshold(scores, parsed.parameter)
