"""A small, real fraud model: logistic regression over 8 transaction features, in numpy.

The weights are fixed in code so every run (tests, demo, CI) scores the same transactions the same
way. Features are standardised with fixed means/scales before the linear part; the model is tiny
on purpose but the arithmetic is genuine, so drift and schema inspectors see a real score move.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# Column order of the "features" input tensor.
FEATURES: tuple[str, ...] = (
    "amount",  # transaction amount, in currency units
    "age",  # account holder age, years
    "tenure_months",  # how long the account has existed
    "n_tx_24h",  # transactions on the account in the last 24 hours
    "merchant_risk",  # merchant risk score, 0..1
    "distance_km",  # distance from the holder's usual location
    "is_foreign",  # 1.0 if the merchant is abroad
    "hour",  # local hour of day, 0..23
)
N_FEATURES = len(FEATURES)

_MEAN = np.array([80.0, 42.0, 48.0, 3.0, 0.2, 15.0, 0.1, 13.0], dtype=np.float64)
_SCALE = np.array([120.0, 14.0, 36.0, 3.0, 0.2, 60.0, 0.3, 6.0], dtype=np.float64)
# Large amounts, many recent transactions, risky merchants, far away, abroad, at night: riskier.
# Older holders and long tenure: safer. "hour" enters through its distance from mid-afternoon.
_WEIGHTS = np.array([1.1, -0.35, -0.6, 0.8, 1.3, 0.7, 0.9, 0.0], dtype=np.float64)
_NIGHT_WEIGHT = 0.5
_BIAS = -3.2
THRESHOLD = 0.5


def predict_proba(features: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Fraud probability per row of an (N, 8) feature matrix, as an (N, 1) FP32 array."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != N_FEATURES:
        raise ValueError(f"features must have shape [N, {N_FEATURES}]")
    z = ((x - _MEAN) / _SCALE) @ _WEIGHTS + _BIAS
    night = np.abs(x[:, FEATURES.index("hour")] - 15.0) / 6.0
    z = z + _NIGHT_WEIGHT * night
    p = 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))
    return p.astype(np.float32).reshape(-1, 1)


def predict(features: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """(probability, is_fraud), both (N, 1)."""
    p = predict_proba(features)
    flagged: npt.NDArray[np.bool_] = p >= THRESHOLD
    return p, flagged


def example_transactions(
    n: int, rng: np.random.Generator, fraud_rate: float = 0.1
) -> npt.NDArray[np.float32]:
    """Plausible (N, 8) FP32 transactions, a share of them fraud-like, for demos and tests."""
    x = np.empty((n, N_FEATURES), dtype=np.float64)
    x[:, 0] = rng.lognormal(3.8, 0.9, n)
    x[:, 1] = rng.integers(18, 90, n)
    x[:, 2] = rng.integers(0, 240, n)
    x[:, 3] = rng.poisson(2.5, n)
    x[:, 4] = rng.beta(2.0, 8.0, n)
    x[:, 5] = rng.exponential(10.0, n)
    x[:, 6] = rng.random(n) < 0.08
    x[:, 7] = rng.integers(0, 24, n)
    bad = rng.random(n) < fraud_rate
    k = int(bad.sum())
    x[bad, 0] *= rng.uniform(5.0, 20.0, k)
    x[bad, 3] += rng.integers(5, 20, k)
    x[bad, 4] = rng.uniform(0.6, 1.0, k)
    x[bad, 5] += rng.uniform(200.0, 2000.0, k)
    x[bad, 6] = 1.0
    x[bad, 7] = rng.integers(0, 5, k)
    return x.astype(np.float32)
