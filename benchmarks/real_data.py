"""Out-of-time quality on a real transaction log, with the baselines in the same run.

    python benchmarks/real_data.py --events FILE --config CONFIG \\
        --cal-end 2011-09-09 --holdout-days 91

Trains through the public API (``lapse.train.churn.train``, the path of ``lapse
train``) on the events before ``--cal-end``, scores as of ``--cal-end``
(``lapse.score.records.score_users``, the path of ``lapse score``) and judges, for
every customer with a purchase before the cut:

- churn: ROC-AUC and PR-AUC of ``churn_risk`` for "no purchase in
  ``[cal-end, cal-end + holdout-days)``", beside recency (days since the last
  purchase) and BG/NBD's P(no purchase in the holdout) fitted on the same
  calibration data (distinct purchase days). A customer the model does not
  score (not eligible) is ranked as the riskiest and counted in the table;
- next order: for customers who did buy again, the MAE in days of
  ``next_order_date`` against the naive "last purchase + last gap" (the
  population's median gap for one-order customers).

A purchase is an event of the config's ``purchase`` role after validation
(returns, fees and rejected rows are not purchases). Nothing is downloaded;
the reference run is on ``../shared/data/online_retail.parquet`` with
``configs/online_retail.yaml``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import average_precision_score, roc_auc_score

from lapse import LapseConfig, load_config
from lapse.events import validate_events
from lapse.labels.churn import role_events
from lapse.modeling.bgnbd import BGNBD
from lapse.modeling.bundle import ChurnBundle
from lapse.score.records import score_users
from lapse.train.churn import train

DAY = 86_400.0


def purchases(events: pl.DataFrame, config: LapseConfig) -> pl.DataFrame:
    """``user_id, ts`` of every purchase-role event."""
    return role_events(events.lazy(), config, ["purchase"]).collect()


def customers(buys: pl.DataFrame, cut: datetime, holdout: timedelta) -> pl.DataFrame:
    """Per customer with a purchase before ``cut``: the calibration summary and the truth."""
    before = buys.filter(pl.col("ts") < cut)
    after = buys.filter((pl.col("ts") >= cut) & (pl.col("ts") < cut + holdout))
    days = before.with_columns(pl.col("ts").dt.truncate("1d").alias("day")).unique(
        ["user_id", "day"]
    )
    summary = (
        days.sort("day")
        .group_by("user_id")
        .agg(
            pl.col("day").first().alias("first"),
            pl.col("day").last().alias("last"),
            pl.len().alias("n_days"),
            (pl.col("day").diff().last().dt.total_seconds() / DAY).alias("last_gap"),
            pl.col("ts").max().alias("last_ts"),
        )
    )
    nxt = after.group_by("user_id").agg(pl.col("ts").min().alias("next_ts"))
    return summary.join(nxt, on="user_id", how="left").with_columns(
        pl.col("next_ts").is_null().alias("churned")
    )


def bgnbd_risk(frame: pl.DataFrame, cut: datetime, horizon_days: float) -> np.ndarray:
    x = (frame["n_days"] - 1).cast(pl.Float64).to_numpy()
    t_x = ((frame["last"] - frame["first"]).dt.total_seconds() / DAY).to_numpy()
    age = frame.select((pl.lit(cut) - pl.col("first")).dt.total_seconds() / DAY).to_numpy()[:, 0]
    model = BGNBD().fit(x, t_x, age)
    return 1.0 - model.p_any_purchase(horizon_days, x, t_x, age)


def churn_row(name: str, y: np.ndarray, risk: np.ndarray) -> dict[str, object]:
    return {
        "model": name,
        "roc_auc": roc_auc_score(y, risk),
        "pr_auc": average_precision_score(y, risk),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--cal-end", required=True, help="YYYY-MM-DD, 00:00 UTC")
    parser.add_argument("--holdout-days", required=True, type=int)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: temp)")
    args = parser.parse_args()
    cut = datetime.fromisoformat(args.cal_end).replace(tzinfo=UTC)
    holdout = timedelta(days=args.holdout_days)
    config = load_config(args.config)
    work = args.out or Path(tempfile.mkdtemp(prefix="lapse-real-"))

    started = time.perf_counter()
    result = train(
        args.events, config, out_dir=work / "report", models_dir=work, until=cut, parallel=True
    )
    train_s = time.perf_counter() - started
    bundle = ChurnBundle.load(result.bundle_path)
    events, _ = validate_events(args.events, config, rejects_path=work / "rejects.parquet")
    calibration = events.lazy().filter(pl.col("ts") < cut)
    scored = score_users(
        bundle, calibration, cut, config, score_run_id="benchmark", model_version="benchmark"
    ).records.select("user_id", "churn_risk", "next_order_date")

    frame = (
        customers(purchases(events, config), cut, holdout)
        .join(scored, on="user_id", how="left")
        .sort("user_id")
    )
    y = frame["churned"].cast(pl.Float64).to_numpy()
    unscored = frame["churn_risk"].null_count()
    lapse_risk = frame["churn_risk"].fill_null(2.0).to_numpy()  # not eligible: riskiest
    recency = frame.select((pl.lit(cut) - pl.col("last_ts")).dt.total_seconds()).to_numpy()[:, 0]
    rows = [
        churn_row(f"lapse ({result.selected})", y, lapse_risk),
        churn_row("recency", y, recency),
        churn_row("bgnbd", y, bgnbd_risk(frame, cut, float(args.holdout_days))),
    ]

    # next order: customers who bought again
    median_gap = frame["last_gap"].median() or 30.0
    again = frame.filter(~pl.col("churned")).with_columns(
        (pl.col("last") + pl.duration(days=pl.col("last_gap").fill_null(median_gap))).alias(
            "naive_date"
        ),
        pl.col("next_ts").dt.date().alias("actual"),
    )
    err = again.select(
        (pl.col("next_order_date") - pl.col("actual")).dt.total_days().abs().alias("lapse"),
        (pl.col("naive_date").dt.date() - pl.col("actual")).dt.total_days().abs().alias("naive"),
        # the same guess moved to the cut when it falls before it (nobody bought in between)
        (pl.max_horizontal("naive_date", pl.lit(cut)).dt.date() - pl.col("actual"))
        .dt.total_days()
        .abs()
        .alias("naive_from_cut"),
    )
    both = err.drop_nulls()

    print(
        f"events {args.events}; config {args.config}; calibration < {cut:%Y-%m-%d}; "
        f"holdout {args.holdout_days} days"
    )
    print(f"trained in {train_s:.1f} s; selected {result.selected} ({result.why})")
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"\n{frame.height:,} customers with a purchase before the cut; "
        f"churn rate {y.mean():.3f}; {unscored:,} not scored by lapse (ranked riskiest)\n"
    )
    print("| model | ROC-AUC | PR-AUC |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['roc_auc']:.3f} | {r['pr_auc']:.3f} |")
    print(
        f"\nnext order, {again.height:,} customers who bought again "
        f"({both.height:,} with a lapse next_order_date):"
    )
    print("| predictor | MAE days |\n| --- | --- |")
    if both.height:
        lapse_mae, naive_mae = both["lapse"].mean(), both["naive"].mean()
        print(f"| lapse next_order_date | {lapse_mae:.1f} |")
        print(f"| last purchase + last gap | {naive_mae:.1f} |")
        print(f"| the same, never before the cut | {both['naive_from_cut'].mean():.1f} |")
        print(f"\nlapse MAE is {1 - lapse_mae / naive_mae:+.1%} below the naive gap")
    print(f"(naive on all {again.height:,}: {err['naive'].mean():.1f} days)")


if __name__ == "__main__":
    main()
