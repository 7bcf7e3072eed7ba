"""Estimators with scikit-learn habits for a notebook: :class:`ChurnModel` and
:class:`ReplenishmentModel`.

They are thin wrappers: :meth:`ChurnModel.fit` is :func:`lapse.train.churn.train`
and keeps its :class:`~lapse.modeling.bundle.ChurnBundle`; its predictions go
through :func:`lapse.score.records.score_users`, the scoring of ``lapse score``,
so :meth:`ChurnModel.predict_proba` is the score's ``churn_risk`` for the same
bundle and cutoff. :meth:`ReplenishmentModel.fit` is the replenishment race
(:func:`lapse.train.replenishment.run_replenishment`). Both take events as a
path or a source-shaped Polars or pandas frame (:data:`lapse.events.EventSource`),
read through the config's ``source`` mapping. ``__init__`` stores its parameters
(``get_params``/``set_params``, :func:`sklearn.base.clone`), learned state ends
in ``_`` and ``fit`` returns ``self``.

Examples
--------
>>> import lapse
>>> model = lapse.ChurnModel()
>>> sorted(model.get_params())
['config', 'models_dir', 'out_dir']
"""

from __future__ import annotations

import pickle
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from lapse.config import LapseConfig, load_config
from lapse.events import load_attributes, read_links
from lapse.events.identity import resolve
from lapse.events.readers import EventSource, as_polars
from lapse.events.validate import canonical_events
from lapse.exceptions import LapseError
from lapse.labels import data_span
from lapse.modeling.bundle import ChurnBundle
from lapse.modeling.params import ParamsMixin
from lapse.registry import load_bundle
from lapse.score.records import ScoreResult, score_users
from lapse.train.churn import TrainResult, train
from lapse.train.replenishment import ReplenishmentModel as ShippedReplenishment
from lapse.train.replenishment import ReplenishmentResult, run_replenishment

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ChurnModel", "ReplenishmentModel"]


def _instant(as_of: datetime | date) -> datetime:
    """A cutoff as a UTC instant: a date means its 00:00 UTC, as on the command line."""
    if isinstance(as_of, datetime):
        if as_of.tzinfo is None:
            raise LapseError(
                f"as_of {as_of.isoformat()} has no timezone; pass an aware datetime "
                "(e.g. datetime(2024, 3, 1, tzinfo=timezone.utc)) or a date"
            )
        return as_of.astimezone(UTC)
    return datetime(as_of.year, as_of.month, as_of.day, tzinfo=UTC)


def _folder(path: str | Path | None, prefix: str) -> Path:
    return Path(path) if path is not None else Path(tempfile.mkdtemp(prefix=prefix))


class _Estimator(ParamsMixin):
    config: LapseConfig | None

    def _config(self) -> LapseConfig:
        return self.config if self.config is not None else load_config()

    def _fitted(self, attribute: str) -> Any:
        value = getattr(self, attribute, None)
        if value is None:
            raise LapseError(
                f"this {type(self).__name__} is not fitted yet; call fit(events) or "
                f"{type(self).__name__}.load(...) first"
            )
        return value

    def __repr__(self) -> str:
        config = self.config
        shown = "None" if config is None else f"<LapseConfig models.name={config.models.name!r}>"
        rest = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if k != "config")
        return f"{type(self).__name__}(config={shown}, {rest})"


class ChurnModel(_Estimator):
    """The churn race and its shipped model, as an estimator.

    Parameters
    ----------
    config
        The lapse config (source mapping, labels, models, segments, ...); ``None``
        uses the embedded default (:func:`lapse.load_config`).
    out_dir
        Where :meth:`fit` writes the report folder (``metrics.json``, ``report.md``,
        ``report.html``, PNG plots); ``None``: a new temporary folder.
    models_dir
        Where :meth:`fit` saves the bundle; ``None``: ``models/`` in the report folder.

    Attributes
    ----------
    bundle_ : ChurnBundle
        The trained (or loaded) bundle: what ``lapse score`` scores with.
    result_ : TrainResult
        What the race produced: metrics, the model table, notes, paths (after :meth:`fit`).
    figures_ : dict[str, matplotlib.figure.Figure]
        The report's figures (``roc``, ``calibration``, ``gains``, ``segments``, ...).
    version_ : int or None
        The registry version when loaded from ``models:/...``.
    """

    bundle_: ChurnBundle | None
    result_: TrainResult | None

    def __init__(
        self,
        config: LapseConfig | None = None,
        *,
        out_dir: str | Path | None = None,
        models_dir: str | Path | None = None,
    ) -> None:
        self.config = config
        self.out_dir = out_dir
        self.models_dir = models_dir

    def fit(self, events: EventSource, as_of: datetime | date | None = None) -> ChurnModel:
        """Run the churn race on ``events`` and keep the shipped bundle (``lapse train``).

        ``as_of``: train as of this instant (a date is its 00:00 UTC); events at or
        after it are left out, as if the data ended there. ``None``: every event.
        """
        out = _folder(self.out_dir, "lapse-churn-")
        models = Path(self.models_dir) if self.models_dir is not None else out / "models"
        until = _instant(as_of) if as_of is not None else None
        result = train(events, self._config(), out_dir=out, models_dir=models, until=until)
        self.result_ = result
        self.figures_: dict[str, Figure] = result.figures
        self.bundle_ = ChurnBundle.load(result.bundle_path)
        self.version_: int | None = None
        return self

    def _scored(self, events: EventSource, as_of: datetime | date) -> ScoreResult:
        """``lapse score``'s records (before delivery) of ``events`` as of ``as_of``."""
        bundle: ChurnBundle = self._fitted("bundle_")
        config = self._config()
        t = _instant(as_of)
        source = as_polars(events)  # pandas: converted once for the events and the links
        kept = resolve(canonical_events(source, config), read_links(source, config), t)
        return score_users(
            bundle,
            kept,
            t,
            config,
            score_run_id="notebook",
            model_version=str(getattr(self, "version_", None) or "local"),
            attributes=load_attributes(config),
        )

    def predict_proba(self, events: EventSource, as_of: datetime | date) -> pl.DataFrame:
        """``user_id, churn_risk``: the calibrated churn probability of every eligible user
        as of ``as_of`` (events before it only), as ``lapse score`` computes it."""
        return self._scored(events, as_of).records.select("user_id", "churn_risk")

    def segments(self, events: EventSource, as_of: datetime | date) -> pl.DataFrame:
        """``user_id, churn_risk, churn_risk_percentile, risk_segment`` as of ``as_of``."""
        records = self._scored(events, as_of).records
        return records.select("user_id", "churn_risk", "churn_risk_percentile", "risk_segment")

    def reasons(
        self,
        events: EventSource,
        as_of: datetime | date,
        *,
        users: list[str] | None = None,
        top: int = 3,
    ) -> pl.DataFrame:
        """``user_id, churn_risk, reasons``: the top risk drivers in words of ``users``
        (default: every eligible user; costly for LightGBM, pass the users you need)."""
        scored = self._scored(events, as_of)
        bundle: ChurnBundle = self._fitted("bundle_")
        rows = scored.features
        if users is not None:
            rows = rows.filter(pl.col("user_id").is_in(pl.Series(users, dtype=pl.String).implode()))
        explained = bundle.reasons(rows, top=top).select("user_id", "reasons")
        risk = scored.records.select("user_id", "churn_risk")
        return risk.join(explained, on="user_id", how="inner", maintain_order="left")

    def save(self, path: str | Path) -> Path:
        """Save the bundle (a pickle ``lapse score --model PATH`` reads); return its path."""
        bundle: ChurnBundle = self._fitted("bundle_")
        return bundle.save(path)

    @classmethod
    def load(cls, source: str | Path, config: LapseConfig | None = None) -> ChurnModel:
        """A fitted model from a bundle file or ``models:/NAME@alias`` / ``models:/NAME/N``
        (the registry of ``config``; default: the bundle's own config for a file, the
        embedded default for the registry)."""
        loaded = load_bundle(source, config if config is not None else load_config())
        model = cls(config if config is not None else loaded.bundle.config)
        model.bundle_ = loaded.bundle
        model.version_ = loaded.version
        return model


class ReplenishmentModel(_Estimator):
    """The time-to-next-order race and its shipped survival model, as an estimator.

    Parameters
    ----------
    config
        The lapse config (its ``replenishment`` section drives the race); ``None``
        uses the embedded default.
    out_dir
        Where :meth:`fit` writes the PNG plots; ``None``: none are written (the
        figures are on ``figures_`` either way).

    Attributes
    ----------
    model_ : lapse.train.replenishment.ReplenishmentModel
        The shipped model (the one a churn bundle carries as its replenishment model).
    result_ : ReplenishmentResult
        The race's metrics, table and notes (after :meth:`fit`).
    figures_ : dict[str, matplotlib.figure.Figure]
        ``replenishment_km`` and ``replenishment_calibration``.
    """

    model_: ShippedReplenishment | None
    result_: ReplenishmentResult | None

    def __init__(
        self, config: LapseConfig | None = None, *, out_dir: str | Path | None = None
    ) -> None:
        self.config = config
        self.out_dir = out_dir

    def fit(self, events: EventSource, as_of: datetime | date | None = None) -> ReplenishmentModel:
        """Race the survival models on ``events`` and keep the winner, refit on every episode.

        ``as_of``: the data ends there (events at or after it are left out); ``None``:
        the midnight after the last event, as ``lapse train`` uses. With identity links
        each cutoff sees the ids of the links observed before it.
        """
        config = self._config()
        source = as_polars(events)  # pandas: converted once for the events and the links
        events_ = canonical_events(source, config).collect().lazy()
        links = read_links(source, config)
        if as_of is not None:
            end = _instant(as_of)
            events_ = events_.filter(pl.col("ts") < end)
            links = links.filter(pl.col("ts") < end)
        else:
            end = data_span(events_)[1]
        out = Path(self.out_dir) if self.out_dir is not None else None
        result = run_replenishment(events_, config, data_end=end, out_dir=out, links=links)
        self.result_ = result
        self.figures_: dict[str, Figure] = result.figures
        self.model_ = result.model
        return self

    def predict_next_order(self, events: EventSource, as_of: datetime | date) -> pl.DataFrame:
        """One row per open episode as of ``as_of`` (events before it only): ``user_id,
        sku``, the median days to the next order, ``depletion_date`` (the next order
        ``lapse score`` sends as ``next_order_date``), ``p_reorder_7d/14d/30d`` and
        ``prompt_date`` (:func:`lapse.train.replenishment.predict_open`)."""
        model: ShippedReplenishment = self._fitted("model_")
        config, t = self._config(), _instant(as_of)
        source = as_polars(events)  # pandas: converted once for the events and the links
        return model.predict_open(
            resolve(canonical_events(source, config), read_links(source, config), t), t
        )

    def save(self, path: str | Path) -> Path:
        """Pickle the shipped model to ``path`` (parents created); return the path."""
        model: ShippedReplenishment = self._fitted("model_")
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
        return p

    @classmethod
    def load(cls, source: str | Path, config: LapseConfig | None = None) -> ReplenishmentModel:
        """A fitted model from a file :meth:`save` wrote, or the replenishment model of a
        churn bundle: a bundle file or ``models:/NAME@alias`` (only load files you trust:
        they are pickles)."""
        text = str(source)
        obj: object
        if text.startswith("models:/"):
            obj = load_bundle(text, config if config is not None else load_config()).bundle
        else:
            try:
                obj = pickle.loads(Path(text).expanduser().read_bytes())
            except FileNotFoundError:
                raise LapseError(f"{text}: no model there; fit and save one first") from None
            except (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as exc:
                raise LapseError(f"{text}: not a lapse model ({exc})") from None
        if isinstance(obj, ChurnBundle):
            obj = obj.extras.get("replenishment")
            if obj is None:
                raise LapseError(
                    f"{text}: the bundle has no replenishment model (replenishment was "
                    "disabled or had too few episodes when it was trained)"
                )
        if not isinstance(obj, ShippedReplenishment):
            raise LapseError(f"{text}: not a lapse replenishment model ({type(obj).__name__})")
        model = cls(config if config is not None else obj.config)
        model.model_ = obj
        return model
