"""The engines a job runs on, and the Spark one: validation, features and scoring
on a cluster (:mod:`lapse.spark.engine`) and its chunked score run
(:mod:`lapse.spark.score`). Importing this package does not import pyspark."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lapse.config import ENGINES, Engine
from lapse.spark.engine import build_features_spark, score_spark

if TYPE_CHECKING:
    # for annotations outside this package, which may not import pyspark (ruff TID251)
    from pyspark.sql import SparkSession as SparkSession

__all__ = ["ENGINES", "Engine", "build_features_spark", "score_spark"]
