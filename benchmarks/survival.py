"""Replenishment speed: fit on 200k episodes, predict 1M open episodes.

Run with ``python benchmarks/survival.py [--fit N] [--predict M]``. The
episodes are simulated directly (12 covariates, some nulls, right-censoring)
so the figures measure the models, not the feature builders. Prints one line
per model: fit seconds, and seconds for the median plus P(reorder within
7/14/30 days) of every open episode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl

from lapse.modeling.survival import CANDIDATES, SurvivalModel
from lapse.modeling.survival_metrics import HORIZONS


def episodes(n: int, seed: int) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = 12
    x = rng.normal(size=(n, k))
    supply = np.exp(3.4 + 0.5 * rng.normal(size=n))
    log_t = np.log(supply) + x[:, :4] @ np.array([0.2, -0.1, 0.1, 0.05]) + 0.4 * rng.normal(size=n)
    t = np.exp(log_t)
    c = rng.uniform(5.0, 200.0, size=n)
    cols = {f"x{j}": x[:, j] for j in range(k)}
    frame = pl.DataFrame({**cols, "supply_days": supply}).with_columns(
        pl.when(pl.col("x0") > 1.0).then(None).otherwise("supply_days").alias("supply_days")
    )
    return frame, np.minimum(t, c), t <= c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fit", type=int, default=200_000)
    parser.add_argument("--predict", type=int, default=1_000_000)
    args = parser.parse_args()
    frame, t, e = episodes(args.fit, 0)
    big, _, _ = episodes(args.predict, 1)
    elapsed = np.random.default_rng(2).uniform(0, 60, size=args.predict)
    print(f"fit on {args.fit:,} episodes ({frame.width} covariates), predict {args.predict:,}")
    for kind in CANDIDATES:
        start = time.perf_counter()
        model = SurvivalModel(kind, penalizer=0.01).fit(frame, t, e)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        median = model.predict_median(big, elapsed)
        surv = model.predict_survival(big, elapsed, HORIZONS)
        pred_s = time.perf_counter() - start
        assert median.shape == (args.predict,) and surv.shape == (args.predict, len(HORIZONS))
        print(f"{kind:16s} fit {fit_s:7.1f} s   predict {pred_s:6.2f} s")


if __name__ == "__main__":
    main()
