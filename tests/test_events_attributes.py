"""read_attributes: renames, id casting, null ids, duplicate users (last wins)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from lapse.config import LapseConfig
from lapse.events import read_attributes
from lapse.exceptions import ConfigError, MissingColumnsError, ReadError


def _config(**attributes: Any) -> LapseConfig:
    return LapseConfig.model_validate({"attributes": attributes})


def test_renames_ids_nulls_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_text(
        "CustomerID,Plan,channel\n"
        "17850.0,free,ads\n"
        "13047.0,pro,organic\n"
        ",pro,ads\n"
        "17850.0,pro,ads\n"
    )
    frame, report = read_attributes(
        path, _config(user_id="CustomerID", columns={"plan": "Plan"}, static_features=["plan"])
    )
    assert frame.columns == ["user_id", "plan", "channel"]
    assert frame.schema["user_id"] == pl.String
    # The last row of 17850 wins; users appear in the order of their last row.
    assert frame.rows() == [("13047", "pro", "organic"), ("17850", "pro", "ads")]
    assert (report.rows_read, report.users, report.null_user_ids, report.duplicates) == (4, 2, 1, 1)
    assert report.columns == ("user_id", "plan", "channel")


def test_parquet_with_default_user_id(tmp_path: Path) -> None:
    path = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": [1, 2], "plan": ["a", "b"]}).write_parquet(path)
    frame, report = read_attributes(path, _config())
    assert frame.rows() == [("1", "a"), ("2", "b")]
    assert report.users == 2


def test_missing_user_id_column(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_text("customer,plan\n1,free\n")
    with pytest.raises(MissingColumnsError) as info:
        read_attributes(path, _config())
    message = str(info.value)
    for fragment in (str(path), "user_id", "customer", "plan", "attributes.user_id"):
        assert fragment in message


def test_missing_static_feature(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_text("user_id,plan\n1,free\n")
    with pytest.raises(MissingColumnsError, match="signup_channel"):
        read_attributes(path, _config(static_features=["plan", "signup_channel"]))


def test_rename_clash(tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_text("user_id,customer,plan\n1,2,free\n")
    with pytest.raises(ConfigError, match="user_id"):
        read_attributes(path, _config(user_id="customer"))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ReadError, match="file not found"):
        read_attributes(tmp_path / "users.parquet", _config())
