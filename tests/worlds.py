"""A trained world for scoring tests: generated events, a bundle trained on their start."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from lapse.config import dump_config, load_config
from lapse.datasets import generate, write
from lapse.train.churn import train


@dataclass(frozen=True)
class World:
    events: Path
    users: Path
    bundle: Path
    as_of: datetime


def trained_world(
    root: Path, *, n_users: int, n_days: int, seed: int, train_days: int, score_day: int
) -> World:
    """Events of ``n_users`` over ``n_days``; a bundle trained on the first ``train_days``
    (default config, saved under ``root/models``); ``as_of`` is day ``score_day``."""
    files = write(generate(n_users=n_users, n_days=n_days, seed=seed), root / "data")
    events = pl.read_parquet(files["events"])
    first = events["ts"].min()
    assert isinstance(first, datetime)
    start = first.replace(hour=0, minute=0, second=0, microsecond=0)
    train_events = root / "train.parquet"
    events.filter(pl.col("ts") < start + timedelta(days=train_days)).write_parquet(train_events)
    train(train_events, load_config(), out_dir=root / "report", models_dir=root / "models")
    return World(
        events=files["events"],
        users=files["users"],
        bundle=root / "models" / "lapse.pkl",
        as_of=start + timedelta(days=score_day),
    )


def world_config(home: Path, world: World, **delivery: Any) -> Path:
    """``home/lapse.yaml``: the default config with the world's attributes (no static
    features) and these ``delivery`` settings."""
    data = yaml.safe_load(dump_config(load_config()))
    data["attributes"]["path"] = str(world.users)
    data["attributes"]["static_features"] = []
    data["delivery"].update(delivery)
    path = home / "lapse.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
