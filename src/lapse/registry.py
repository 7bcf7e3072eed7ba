"""MLflow tracking and the model registry: the only module that imports mlflow.

Importing mlflow takes more than a second, so it happens inside the functions
here and ``import lapse.registry`` stays cheap.

Tracking store
    ``registry.tracking_uri`` from the config, else ``MLFLOW_TRACKING_URI``,
    else ``sqlite:///mlflow.db`` in the config's folder (or ``LAPSE_HOME``)
    with artifacts in ``mlartifacts/`` beside it. A relative ``sqlite:///``
    path in the config resolves the same way. Browse it with
    ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` from that folder.

Registry
    Each training run registers one pyfunc model (input: the feature rows of
    :meth:`ChurnBundle.prepare`; output: ``churn_risk``,
    ``churn_risk_percentile``, ``risk_segment``) under ``models.name`` with
    the alias ``challenger``, a description and provenance tags (data
    fingerprint, config hash, lapse version) set at registration and never
    changed afterwards; the first version, or any version while no
    ``champion`` exists, also becomes ``champion``. The input example is a
    synthetic row (every feature zero), so no customer's row is stored.

Promotion
    :func:`promote` moves ``champion`` on the verdict of the latest review
    (:mod:`lapse.train.review`, which loads and logs through
    :func:`review_pair` and :func:`log_review`), or on ``--force``; every move
    is an entry of the model's promotion log (registered model tags
    ``lapse.promotion.NNNNNN``, :func:`history`), and a rollback walks it back
    to the last champion before the current one. ``previous-champion`` points
    at what the next rollback would restore.

A killed train
    A training run carries the tag ``lapse.process`` (host, pid and process start).
    SIGTERM or SIGINT during :func:`log_training` ends its MLflow run ``FAILED``; a
    version is registered with the tag ``lapse.unfinished`` and loses it once its
    aliases are set. The next :func:`log_training` marks the ``RUNNING`` runs of
    processes that died on this host ``FAILED`` (SIGKILL, a power cut), and rewrites
    the ``lapse.unfinished`` tag of each version whose run ended to say it was never
    finished (no alias: nothing serves it; do not promote it).

Replenishment
    The bundle's replenishment model (``extras["replenishment"]``, a
    :class:`lapse.train.replenishment.ReplenishmentModel`) rides along in the same
    registered version but is not part of the pyfunc output: it predicts the
    episodes open at a date from raw events, not from feature rows, so its
    predictions stay in the lapse API (``ReplenishmentModel.predict_open``
    on the bundle from :func:`load_bundle`).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import polars as pl

from lapse import __version__
from lapse.config import DATABASE_FORMATS, LapseConfig, dump_config
from lapse.events import read_events
from lapse.events.database import source_label
from lapse.events.readers import EventSource, frame_digest, frame_name, resolve_format
from lapse.exceptions import LapseError, PromotionRefused, WriteFailed
from lapse.faults import fault_point
from lapse.modeling.bundle import ChurnBundle
from lapse.modeling.compare import (
    Decision,
    Interval,
    decide,
    interval_metrics,
    intervals_from_metrics,
)
from lapse.redact import redact_url
from lapse.schema import EVENT_COLUMNS, run_day

if TYPE_CHECKING:
    from mlflow import MlflowClient  # noqa: TID251
    from mlflow.entities.model_registry import ModelVersion  # noqa: TID251

    from lapse.train.churn import TrainResult

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS_CHAMPION",
    "LoadedBundle",
    "PromoteResult",
    "PromotionEvent",
    "RegisteredVersion",
    "ReviewPair",
    "example_files",
    "flatten_metrics",
    "history",
    "load_bundle",
    "log_review",
    "log_training",
    "open_store",
    "promote",
    "review_pair",
    "score_rows",
    "tracking_uri",
]

CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"
PREVIOUS_CHAMPION: Final = "previous-champion"
DEFAULT_TRACKING_URI: Final = "sqlite:///mlflow.db"
BUNDLE_FILE: Final = "bundle.pkl"

_PARAM_MAX: Final = 6000  # MLflow's limit on a parameter value
_SECRET: Final = re.compile(r"secret|token|passw|api_?key|credential|auth", re.IGNORECASE)
_TAG = "lapse."
_PROCESS = f"{_TAG}process"  # host:pid:start of the process that runs an MLflow run
_UNFINISHED = f"{_TAG}unfinished"  # on a version until its aliases are set


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version registered by :func:`log_training`."""

    name: str
    version: int
    run_id: str
    model_uri: str
    aliases: tuple[str, ...]
    tracking_uri: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle and where it came from (``version`` is None for a local file)."""

    bundle: ChurnBundle
    source: str
    name: str
    version: int | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class PromoteResult:
    """What :func:`promote` changed. ``checks`` are ``task.metric -> delta`` it compared;
    ``previous_champion`` is what the next rollback would restore (None: nothing)."""

    name: str
    action: Literal["promoted", "forced", "rolled_back"]
    champion: int
    previous_champion: int | None
    reason: str
    user: str
    review_run_id: str | None = None
    checks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- tracking store ----------------------------------------------------------------------


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri.removeprefix("sqlite:///")
    return None if rest in ("", ":memory:") else Path(rest.split("?", 1)[0])


def tracking_uri(config: LapseConfig) -> str:
    """The tracking (and registry) URI: config, else ``MLFLOW_TRACKING_URI``, else local SQLite.

    A relative ``sqlite:///`` path from the config or the default resolves against
    the config's folder (or ``LAPSE_HOME``); the environment variable is used as given.

    Examples
    --------
    >>> from lapse.config import load_config
    >>> config = load_config()
    >>> config.registry.tracking_uri = "sqlite:////srv/mlflow/lapse.db"
    >>> tracking_uri(config)
    'sqlite:////srv/mlflow/lapse.db'
    """
    configured = config.registry.tracking_uri
    if not configured:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
    uri = configured or DEFAULT_TRACKING_URI
    path = _sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return "sqlite:///" + config.resolve(path).as_posix()
    return uri


def _artifact_location(config: LapseConfig, uri: str) -> str | None:
    configured = config.registry.artifact_location
    if configured:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", configured):
            return configured
        return config.resolve(configured).as_uri()
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


# SQLite's and the OS's words for a store that cannot be written (exit code 5, not 2)
_FULL_STORE = re.compile(
    r"database or disk is full|no space left on device|disk I/O error|"
    r"attempt to write a readonly database|read-only file system",
    re.IGNORECASE,
)


@contextlib.contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """Turn MLflow's failures (unreachable server, bad store) into one LapseError line; a
    store that cannot be written (a full disk, read-only) is :class:`WriteFailed` (exit 5)."""
    from mlflow.exceptions import MlflowException  # noqa: TID251
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError) as exc:
        if isinstance(exc, MlflowException):
            message = exc.message
        else:  # the driver's own words, without SQLAlchemy's statement and background link
            message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        full = _FULL_STORE.search(message)
        if full is not None:
            raise WriteFailed.from_os_error(redact_url(uri), OSError(full.group(0))) from None
        raise LapseError(f"MLflow at {redact_url(uri)}: {message}") from None


def _connect(config: LapseConfig) -> tuple[MlflowClient, str]:
    """A client on the configured store; also points mlflow's globals there (for models:/ URIs)."""
    import mlflow  # noqa: TID251

    # mlflow sets its logger to INFO on import; its store-migration lines are noise for lapse users
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # it logs a store error's traceback before raising it; _mlflow_errors says it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    uri = tracking_uri(config)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which tracking_uri() would then
    # prefer over the next config's own store: keep the user's environment as it was
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    with _mlflow_errors(uri):  # a new SQLite store is created and migrated here
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def open_store(config: LapseConfig) -> None:
    """Import MLflow and open the config's tracking store (a new SQLite store is created
    and migrated), as :func:`log_training` does first; a later call finds both done.
    ``lapse train`` calls it while the replenishment race finishes in its child process.

    Raises
    ------
    LapseError
        The tracking store cannot be reached or written.
    """
    _connect(config)


def _experiment_id(client: MlflowClient, config: LapseConfig, uri: str) -> str:
    from mlflow.exceptions import MlflowException  # noqa: TID251

    name = config.registry.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(config, uri))
        except MlflowException:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise LapseError(
            f"MLflow experiment {name!r} at {redact_url(uri)} is deleted; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set "
            "registry.experiment in the config"
        )
    return str(exp.experiment_id)


# -- params, metrics, tags ---------------------------------------------------------------


def _redact(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: "***" if _SECRET.search(str(k)) else _redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return redact_url(obj) if isinstance(obj, str) else obj


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > _PARAM_MAX:
        cut = f"...(+{len(text) - _PARAM_MAX + 40} chars)"
        text = text[: _PARAM_MAX - len(cut)] + cut
    return text


def _key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``."""
    return re.sub(r"[^\w\-./ ]", "_", key)[:250]


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``churn.lightgbm.roc_auc`` keys.

    Strings, booleans and nulls are left out (they become params).

    Examples
    --------
    >>> flatten_metrics({"churn": {"models": {"lightgbm": {"roc_auc": 0.8}}, "n_test": 5,
    ...                            "selected": "lightgbm"}})
    {'churn.lightgbm.roc_auc': 0.8, 'churn.n_test': 5.0}
    """
    out: dict[str, float] = {}
    for k, v in metrics.items():
        # metrics.json nests candidates under "models"; MLflow keys leave that level out
        key = prefix if k == "models" and prefix else f"{prefix}{k}."
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[_key(key[:-1])] = float(v)
    return out


def _text_leaves(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in metrics.items():
        key = prefix if k == "models" and prefix else f"{prefix}{k}."
        if isinstance(v, Mapping):
            out.update(_text_leaves(v, key))
        elif isinstance(v, str):
            out[_key(key[:-1])] = v
    return out


def _config_params(config: LapseConfig) -> dict[str, str]:
    data = _redact(config.model_dump(mode="json", by_alias=True))
    out: dict[str, str] = {}
    for section, value in data.items():
        if isinstance(value, dict):
            for k, v in value.items():
                out[_key(f"config.{section}.{k}")] = _param(v)
        else:
            out[_key(f"config.{section}")] = _param(value)
    return out


def _git_commit(start: Path) -> str | None:
    """The commit checked out in ``start``'s repository, read from ``.git`` (no subprocess)."""
    for folder in (start, *start.parents):
        git = folder / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (folder / text.removeprefix("gitdir:").strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text(encoding="utf-8").strip()
            if not head.startswith("ref:"):
                return head or None
            ref = head.removeprefix("ref:").strip()
            common = git
            if (git / "commondir").is_file():
                common = (git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve()
            for base in (git, common):
                if (base / ref).is_file():
                    return (base / ref).read_text(encoding="utf-8").strip() or None
            packed = common / "packed-refs"
            if packed.is_file():
                for line in packed.read_text(encoding="utf-8").splitlines():
                    sha, _, name = line.partition(" ")
                    if name == ref:
                        return sha
        except OSError:
            return None
        return None
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (some containers)
        return "unknown"


def _event_files(events_path: str | Path) -> list[Path]:
    return resolve_format(events_path)[1]


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _log_events(mlflow: Any, events_path: EventSource, config: LapseConfig, context: str) -> None:
    """``mlflow.log_input`` of the event files; a database source is named in a tag instead
    (its rows have no file digest; the label never holds the connection URI)."""
    if config.source.kind in DATABASE_FORMATS or not isinstance(events_path, str | Path):
        mlflow.set_tag(f"{_TAG}events_source", source_label(events_path, config.source))
        return
    mlflow.log_input(_events_dataset(events_path), context=context)


def _events_dataset(events_path: str | Path) -> Any:
    """The events described for ``mlflow.log_input``: source path, content digest, schema."""
    from mlflow.data.dataset_source_registry import (  # noqa: TID251
        get_registered_sources,
        resolve_dataset_source,
    )
    from mlflow.data.meta_dataset import MetaDataset  # noqa: TID251
    from mlflow.types import ColSpec, Schema  # noqa: TID251

    files = _event_files(events_path)
    source = str(Path(events_path).expanduser().resolve())
    schema = Schema([ColSpec(_mlflow_type(d), n) for n, d in EVENT_COLUMNS.items()])
    # MLflow registers its local source twice (schemes "" and "file"); naming one avoids its
    # "can be interpreted in multiple ways" warning
    local = [
        s
        for s in get_registered_sources()
        if getattr(s, "__name__", "") == "LocalArtifactDatasetSource"
    ]
    return MetaDataset(  # type: ignore[abstract]  # MetaDataset defines profile; mypy misses it
        source=resolve_dataset_source(source, candidate_sources=local[:1] or None),
        name=Path(events_path).name or "events",
        digest=_digest(files),
        schema=schema,
    )


# -- the pyfunc model ----------------------------------------------------------------------


def _mlflow_type(dtype: pl.DataType) -> Any:
    from mlflow.types import DataType  # noqa: TID251
    from mlflow.types.schema import AnyType  # noqa: TID251

    if dtype == pl.Boolean:
        return DataType.boolean
    if dtype.is_integer():
        # pandas holds an integer column as int64, or as float64 once it has a null, and MLflow
        # accepts neither as the other; the model casts back to the bundle's dtype itself
        return AnyType()  # type: ignore[no-untyped-call]  # mlflow leaves __init__ unannotated
    if dtype.is_numeric():
        return DataType.double
    if isinstance(dtype, pl.Datetime):
        return DataType.datetime
    return DataType.string


_SIMPLE_DTYPES: Final[dict[str, pl.DataType]] = {
    str(d): d
    for d in (
        pl.Int8(),
        pl.Int16(),
        pl.Int32(),
        pl.Int64(),
        pl.UInt8(),
        pl.UInt16(),
        pl.UInt32(),
        pl.UInt64(),
        pl.Float32(),
        pl.Float64(),
        pl.Boolean(),
        pl.String(),
        pl.Categorical(),
    )
}


def _feature_rows(model_input: Any, feature_schema: Mapping[str, str]) -> pl.DataFrame:
    """Pyfunc input (pandas, polars or records) as polars with the bundle's dtypes back."""
    if isinstance(model_input, pl.DataFrame):
        frame = model_input
    elif type(model_input).__module__.startswith("pandas"):
        frame = pl.from_pandas(model_input)  # NaN becomes null, as it was before pandas
    else:
        frame = pl.DataFrame(model_input)
    casts = [
        pl.col(name).cast(_SIMPLE_DTYPES[dtype])
        for name, dtype in feature_schema.items()
        if name in frame.columns and dtype in _SIMPLE_DTYPES and str(frame.schema[name]) != dtype
    ]
    return frame.with_columns(casts) if casts else frame


def score_rows(bundle: ChurnBundle, frame: pl.DataFrame) -> pl.DataFrame:
    """What the registered model returns for feature rows (``user_id`` kept when given)."""
    bundle.check_schema(frame)
    risk = bundle.predict_proba(frame)
    out = pl.DataFrame(
        {
            "churn_risk": risk,
            "churn_risk_percentile": bundle.percentile(risk),
            "risk_segment": bundle.segments(risk).cast(pl.String),
        }
    )
    if "user_id" in frame.columns:
        out = out.insert_column(0, frame["user_id"])
    return out


class _PyfuncModel:
    """What MLflow's pyfunc wrapper calls: feature rows in, scores out (pandas)."""

    def __init__(self, bundle: ChurnBundle) -> None:
        self.bundle = bundle

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """A pandas DataFrame: ``churn_risk``, ``churn_risk_percentile``, ``risk_segment``."""
        rows = _feature_rows(model_input, self.bundle.feature_schema)
        return score_rows(self.bundle, rows).to_pandas()


def _load_pyfunc(data_path: str) -> _PyfuncModel:
    """MLflow's ``loader_module`` hook: ``data_path`` is the logged bundle pickle."""
    return _PyfuncModel(ChurnBundle.load(data_path))


def _input_type(dtype: str) -> Any:
    """The MLflow column type of a feature by its polars dtype name (anything else: any)."""
    from mlflow.types.schema import AnyType  # noqa: TID251

    known = _SIMPLE_DTYPES.get(dtype)
    return _mlflow_type(known) if known is not None else AnyType()  # type: ignore[no-untyped-call]


def _example(bundle: ChurnBundle) -> pl.DataFrame:
    """A synthetic input row: user ``example``, every feature zero (false, empty text).

    MLflow shows it as the model's input example; it holds no customer's data.
    """
    values: dict[str, pl.Series] = {"user_id": pl.Series("user_id", ["example"])}
    for name, text in bundle.feature_schema.items():
        dtype = _SIMPLE_DTYPES.get(text, pl.Float64())
        zero = False if dtype == pl.Boolean else "" if dtype in (pl.String, pl.Categorical) else 0
        values[name] = pl.Series(name, [zero]).cast(dtype)
    return pl.DataFrame(list(values.values()))


def _signature(bundle: ChurnBundle) -> Any:
    """Input and output schema from the bundle alone."""
    from mlflow.models import ModelSignature  # noqa: TID251
    from mlflow.types import ColSpec, DataType, Schema  # noqa: TID251

    cols: list[Any] = [ColSpec(DataType.string, "user_id", required=False)]
    cols += [ColSpec(_input_type(dtype), name) for name, dtype in bundle.feature_schema.items()]
    outputs = Schema(
        [
            ColSpec(DataType.string, "user_id", required=False),
            ColSpec(DataType.double, "churn_risk"),
            ColSpec(DataType.double, "churn_risk_percentile"),
            ColSpec(DataType.string, "risk_segment"),
        ]
    )
    return ModelSignature(inputs=Schema(cols), outputs=outputs)


# -- logging a training run ------------------------------------------------------------------


def log_training(
    result: TrainResult, config: LapseConfig, *, events_path: EventSource
) -> RegisteredVersion:
    """Log a ``lapse train`` result as an MLflow run and register its bundle.

    The run, named ``train DATA_END SELECTED`` (``train 2011-09-09 bgnbd``), holds
    params (config, data window, cutoffs, features, row counts), every numeric
    key of ``metrics.json`` flattened (``churn.lightgbm.roc_auc``), the report
    folder, the resolved config, the events as a dataset (path and content
    digest), tags (lapse version, data fingerprint, config hash, git commit when
    the config's folder is a git checkout) and a description: the data span, the
    race table and the selected model's metrics. The bundle becomes one pyfunc
    model (a signature and a synthetic input example), registered as a new version of
    ``models.name`` with a description and the provenance tags, with the alias
    ``challenger`` (and ``champion`` when there is none yet, a ``registered``
    entry of the promotion log).

    Raises
    ------
    LapseError
        The tracking store cannot be reached or written.
    """
    import mlflow  # noqa: TID251

    bundle = ChurnBundle.load(result.bundle_path)
    name = config.models.name
    signature = _signature(bundle)
    config_yaml = _config_yaml(config)  # hashed for the tag, logged as config.yaml
    provenance = {
        f"{_TAG}version": __version__,
        f"{_TAG}churn.selected": result.selected,
        f"{_TAG}data_fingerprint": _fingerprint(events_path, config),
        f"{_TAG}config_hash": hashlib.sha256(config_yaml.encode()).hexdigest()[:16],
        f"{_TAG}data_end": str(run_day(result.data_end)),
    }
    run_name = f"train {run_day(result.data_end)} {result.selected}"
    client, uri = _connect(config)
    with _mlflow_errors(uri):
        exp_id = _experiment_id(client, config, uri)
        notes = _end_dead_runs(client, exp_id, name)
        params = {
            **_config_params(config),
            "data.events": bundle.training_data.source
            if bundle.training_data
            else str(events_path),
            "data.end": str(run_day(result.data_end)),
            "data.first_training_cutoff": str(run_day(result.training_cutoffs[0])),
            "cutoffs.training": ",".join(str(run_day(c)) for c in result.training_cutoffs),
            "cutoffs.validation": str(run_day(result.validation_cutoff)),
            "cutoffs.test": str(run_day(result.test_cutoff)),
            "cutoffs.refit": ",".join(str(run_day(c)) for c in result.refit_cutoffs),
            "cutoffs.calibration": str(run_day(result.calibration_cutoff)),
            "rows.train": str(result.n_train),
            "rows.validation": str(result.n_validation),
            "rows.test": str(result.n_test),
            "features.count": str(len(bundle.feature_schema)),
            "features": _param(",".join(bundle.feature_schema)),
            **{k: _param(v) for k, v in _text_leaves(result.metrics).items()},
        }
        tags = {
            f"{_TAG}kind": "train",
            f"{_TAG}model_name": name,
            **provenance,
            _PROCESS: _process_tag(os.getpid()),
        }
        commit = _git_commit(config.base_dir)
        if commit:
            tags["git.commit"] = commit
        with (
            _signals_end_the_run(),
            tempfile.TemporaryDirectory(prefix="lapse-model-") as tmp,
            mlflow.start_run(
                experiment_id=exp_id,
                run_name=run_name,
                description=_train_description(result, bundle, events_path),
            ) as run,
        ):
            mlflow.set_tags(tags)
            fault_point("train_logging")
            mlflow.log_params(params)
            _log_events(mlflow, events_path, config, "training")
            mlflow.log_artifacts(str(result.out_dir), artifact_path="report")
            mlflow.log_text(config_yaml, "config.yaml")
            # a fixed file name, so every logged model holds data/bundle.pkl
            data = Path(tmp) / BUNDLE_FILE
            data.write_bytes(Path(result.bundle_path).read_bytes())
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module=__name__,
                data_path=str(data),
                signature=signature,
                input_example=_example(bundle).to_pandas(),
                pip_requirements=[f"lapse=={__version__}"],
                metadata={
                    "lapse_version": __version__,
                    "bundle_format": bundle.format,
                    "selected": bundle.selected,
                    "training_end": bundle.training_end.isoformat(),
                    "replenishment": str(
                        getattr(bundle.extras.get("replenishment"), "selected", "none")
                    ),
                },
            )
            # after the model: MLflow links them to it in one batch (logged before, it
            # copies each metric's history to the model, one query per metric)
            mlflow.log_metrics(flatten_metrics(result.metrics))
            unfinished = {_UNFINISHED: "registered; its training run has not set its aliases yet"}
            mv = mlflow.register_model(info.model_uri, name, tags={**provenance, **unfinished})
            fault_point("after_register")
            version = str(mv.version)
            client.update_model_version(
                name, version, description=_version_description(result, bundle, run_name, run)
            )
            client.set_registered_model_alias(name, CHALLENGER, version)
            aliases = [CHALLENGER]
            current = _aliases(client, name).get(CHAMPION)
            if current is None:
                client.set_registered_model_alias(name, CHAMPION, version)
                aliases.append(CHAMPION)
                _append(
                    client,
                    name,
                    _log(client, name),
                    action="registered",
                    version=int(version),
                    previous=None,
                    reason=f"first champion, registered by {run_name}",
                )
            client.delete_model_version_tag(name, version, _UNFINISHED)
    return RegisteredVersion(
        name=name,
        version=int(version),
        run_id=run.info.run_id,
        model_uri=f"models:/{name}/{version}",
        aliases=tuple(aliases),
        tracking_uri=redact_url(uri),
        notes=tuple(notes),
    )


@contextlib.contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """SIGTERM raises (SystemExit, code 143) inside the block, as SIGINT does
    (KeyboardInterrupt), so the MLflow run the block holds ends ``FAILED`` instead of
    staying ``RUNNING``; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, Linux), ``""`` when unknown:
    tells a live process from a later one that reuses a dead one's pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _process_tag(pid: int) -> str:
    """``host:pid:start`` of a process (the ``lapse.process`` tag)."""
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _dead(tag: str) -> bool:
    """Whether the process a ``lapse.process`` tag names is gone (only known on its host)."""
    host, _, rest = tag.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return bool(start) and _process_start(int(pid)) != start


def _end_dead_runs(client: MlflowClient, exp_id: str, name: str) -> list[str]:
    """Mark ``FAILED`` the ``RUNNING`` runs of processes that died, and say of each version
    whose training run ended before its aliases were set that it was never finished."""
    notes = []
    running = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'")
    for run in running:
        process = run.data.tags.get(_PROCESS)
        if process is None or not _dead(process):
            continue
        client.set_tag(
            run.info.run_id, f"{_TAG}failure", f"its process ({process}) died before it ended"
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        notes.append(
            f"MLflow run {run.info.run_id} was left RUNNING by a process that died "
            f"({process}); marked FAILED"
        )
    for mv in client.search_model_versions(f"name = {_quote(name)}"):
        tag = (mv.tags or {}).get(_UNFINISHED, "")
        if not tag.startswith("registered;") or not mv.run_id:
            continue
        status = client.get_run(mv.run_id).info.status
        if status == "RUNNING":  # its training is still going
            continue
        client.set_model_version_tag(
            name,
            mv.version,
            _UNFINISHED,
            f"never finished: its training run {mv.run_id} ended ({status}) before it set "
            "the aliases; no alias serves it, do not promote it",
        )
        notes.append(
            f"model {name!r} version {mv.version} was never finished (its training run "
            f"ended {status} before setting its aliases); tagged {_UNFINISHED}"
        )
    return notes


def _fingerprint(events_path: EventSource, config: LapseConfig) -> str:
    """16 hex digits of sha256: over the event files' names and bytes; for events in
    memory, the frame's content digest; for a database source, over the canonical
    events' row hashes (stable within one polars version)."""
    if not isinstance(events_path, str | Path):
        return frame_digest(events_path)
    if config.source.kind not in DATABASE_FORMATS:
        return _digest(_event_files(events_path))
    rows = read_events(events_path, config).collect().hash_rows(seed=0).sort()
    return hashlib.sha256(rows.to_numpy().tobytes()).hexdigest()[:16]


def _markdown_table(frame: pl.DataFrame) -> list[str]:
    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "*" if value else ""
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * frame.width]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return lines


def _span(result: TrainResult, bundle: ChurnBundle, events_path: EventSource) -> str:
    if bundle.training_data is None:
        shown = events_path if isinstance(events_path, str | Path) else frame_name(events_path)
        return f"{shown}, data end {run_day(result.data_end)}"
    return bundle.training_data.describe(bundle.event_names())


def _train_description(result: TrainResult, bundle: ChurnBundle, events_path: EventSource) -> str:
    """The run's description (Markdown): the data span, the race table, the selected model."""
    chosen = result.metrics.get("churn", {}).get("models", {}).get(result.selected, {})
    shown = ("roc_auc", "pr_auc", "brier", "ece", "top_decile_lift")
    lines = [
        f"Data: {_span(result, bundle, events_path)} (data end {run_day(result.data_end)}, "
        "exclusive).",
        "",
        f"Cutoffs: {len(result.training_cutoffs)} training "
        f"({run_day(result.training_cutoffs[0])} to {run_day(result.training_cutoffs[-1])}), "
        f"validation {run_day(result.validation_cutoff)}, test {run_day(result.test_cutoff)}; "
        f"rows {result.n_train:,} / {result.n_validation:,} / {result.n_test:,}.",
        "",
        f"Churn race (test cutoff {run_day(result.test_cutoff)}):",
        "",
        *_markdown_table(result.table),
        "",
        f"Selected: **{result.selected}**, {result.why}. Its test metrics: "
        + ", ".join(f"{k} {chosen[k]:.4f}" for k in shown if isinstance(chosen.get(k), float))
        + ".",
    ]
    rep = result.replenishment
    if rep is not None:
        lines += ["", "Replenishment race:", "", *_markdown_table(rep.table), ""]
        lines.append(f"Selected: **{rep.selected}**, {rep.why}.")
    return "\n".join(lines) + "\n"


def _version_description(result: TrainResult, bundle: ChurnBundle, run_name: str, run: Any) -> str:
    """One paragraph for the model version: what it is, what it was trained on, how it did."""
    auc = result.metrics.get("churn", {}).get("models", {}).get(result.selected, {}).get("roc_auc")
    replen = getattr(bundle.extras.get("replenishment"), "selected", None)
    return (
        f"lapse churn model {result.selected}"
        + (f" with replenishment model {replen}" if replen else "")
        + f", from MLflow run {run.info.run_id} ({run_name}). Trained on "
        f"{_span(result, bundle, '')}; test cutoff {run_day(result.test_cutoff)}"
        + (f", test ROC-AUC {auc:.4f}" if isinstance(auc, float) else "")
        + "."
    )


def _config_yaml(config: LapseConfig) -> str:
    """The resolved config as YAML with secret-looking keys masked."""
    import yaml

    data = _redact(yaml.safe_load(dump_config(config)))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _aliases(client: MlflowClient, name: str) -> dict[str, int]:
    model = client.get_registered_model(name)
    return {alias: int(v) for alias, v in (model.aliases or {}).items()}


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _missing(client: MlflowClient, name: str, alias: str | None, uri: str) -> LapseError:
    """A LapseError naming what the store does hold."""
    names = sorted(m.name for m in client.search_registered_models())
    if name not in names:
        listed = ", ".join(names) if names else "none"
        return LapseError(
            f"no registered model {name!r} at {redact_url(uri)} (registered models: {listed}); "
            "run `lapse train` to register one, or pass --name / set models.name"
        )
    aliases = _aliases(client, name)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name={_quote(name)}"))
    listed = ", ".join(f"{a} -> version {v}" for a, v in sorted(aliases.items())) or "none"
    what = f"alias {alias!r}" if alias else "such version"
    return LapseError(
        f"model {name!r} has no {what} (aliases: {listed}; versions: "
        f"{', '.join(map(str, versions)) or 'none'})"
    )


def _version(client: MlflowClient, name: str, ref: str | int, uri: str) -> ModelVersion:
    """Model version ``ref`` (a number or an alias) of ``name``, or a LapseError listing both."""
    from mlflow.exceptions import MlflowException  # noqa: TID251

    try:
        if isinstance(ref, int) or str(ref).isdigit():
            return client.get_model_version(name, str(ref))
        return client.get_model_version_by_alias(name, str(ref))
    except MlflowException:
        raise _missing(
            client, name, None if isinstance(ref, int) or str(ref).isdigit() else str(ref), uri
        ) from None


def _parse_models_uri(uri: str) -> tuple[str, str]:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` -> (name, alias or version)."""
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, _, ref = rest.rpartition("@")
    elif "/" in rest:
        name, _, ref = rest.rpartition("/")
    else:
        name, ref = rest, ""
    if not name or not ref:
        raise LapseError(
            f"{uri!r}: use models:/NAME@ALIAS (e.g. models:/lapse@champion) or models:/NAME/VERSION"
        )
    return name, ref


def _download_bundle(mv: ModelVersion, name: str) -> ChurnBundle:
    import mlflow  # noqa: TID251
    from mlflow.models import Model  # noqa: TID251

    with tempfile.TemporaryDirectory(prefix="lapse-model-") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp
            )
        )
        conf = Model.load(str(local)).flavors.get("python_function", {})
        if conf.get("loader_module") != __name__:
            raise LapseError(
                f"models:/{name}/{mv.version} is not a lapse model (its pyfunc loader is "
                f"{conf.get('loader_module')!r}); register models with `lapse train`"
            )
        return ChurnBundle.load(local / str(conf.get("data", f"data/{BUNDLE_FILE}")))


def load_bundle(uri_or_path: str | Path, config: LapseConfig) -> LoadedBundle:
    """The bundle behind ``models:/NAME@alias``, ``models:/NAME/VERSION`` or a local file.

    Raises
    ------
    LapseError
        The registered model, alias or version does not exist (the message lists
        what does), or the file is not a lapse bundle.
    """
    text = str(uri_or_path)
    if not text.startswith("models:/"):
        bundle = ChurnBundle.load(Path(text).expanduser())
        return LoadedBundle(bundle=bundle, source=text, name=bundle.name)
    name, ref = _parse_models_uri(text)
    client, uri = _connect(config)
    with _mlflow_errors(uri):
        mv = _version(client, name, ref, uri)
        bundle = _download_bundle(mv, name)
    return LoadedBundle(
        bundle=bundle, source=text, name=name, version=int(mv.version), run_id=mv.run_id
    )


# -- erasure ---------------------------------------------------------------------------------

_EXAMPLES: Final = ("input_example.json", "serving_input_example.json")


def example_files(config: LapseConfig, user_ids: Collection[str]) -> list[str]:
    """Input examples in the store that hold any of ``user_ids``, one line each.

    lapse logs a synthetic input example; models logged by lapse before it,
    or by hand, may hold customers' rows in
    ``input_example.json`` and ``serving_input_example.json``. MLflow artifacts
    cannot be rewritten, so ``lapse forget`` reports them instead. A local
    store that does not exist is not created.
    """
    import mlflow  # noqa: TID251

    db = _sqlite_path(tracking_uri(config))
    if db is not None and not db.is_file():
        return []
    needles = [json.dumps(str(u)) for u in user_ids]
    client, uri = _connect(config)
    found: list[str] = []
    with _mlflow_errors(uri):
        for model in client.search_registered_models():
            for mv in client.search_model_versions(f"name={_quote(model.name)}"):
                where = f"models:/{model.name}/{mv.version}"
                listed = {a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=where)}
                for file in (f for f in _EXAMPLES if f in listed):
                    text = mlflow.artifacts.load_text(f"{where}/{file}")
                    hits = sum(needle in text for needle in needles)
                    if hits:
                        found.append(
                            f"{where} {file} holds {hits} of these users; MLflow artifacts "
                            "cannot be rewritten: delete that model version (MLflow UI or "
                            "MlflowClient.delete_model_version) after registering a new one"
                        )
    return found


# -- review support (the review itself: lapse.train.review) -------------------------------------


@dataclass(frozen=True)
class ReviewPair:
    """The champion and the challenger of a registered model, loaded for a review
    (``bundles``: the champion's, then the challenger's)."""

    name: str
    champion: int
    challenger: int
    bundles: tuple[ChurnBundle, ChurnBundle]


def review_pair(config: LapseConfig, name: str | None = None) -> ReviewPair:
    """Load ``champion`` and ``challenger`` of ``name`` (default ``models.name``).

    Raises
    ------
    LapseError
        A missing model or alias, or both aliases on the same version.
    """
    name = name or config.models.name
    client, uri = _connect(config)
    with _mlflow_errors(uri):
        champ_mv = _version(client, name, CHAMPION, uri)
        chal_mv = _version(client, name, CHALLENGER, uri)
        champ, chal = int(champ_mv.version), int(chal_mv.version)
        if champ == chal:
            raise LapseError(
                f"nothing to review: {CHAMPION} and {CHALLENGER} of {name!r} are both version "
                f"{champ}; train a new version first (`lapse train`)"
            )
        bundles = (_download_bundle(champ_mv, name), _download_bundle(chal_mv, name))
    return ReviewPair(name=name, champion=champ, challenger=chal, bundles=bundles)


def log_review(
    config: LapseConfig,
    pair: ReviewPair,
    *,
    verdict: str,
    cutoffs: list[datetime],
    intervals: Mapping[str, Interval],
    table: pl.DataFrame,
    params: Mapping[str, str],
    description: str,
    files: list[Path],
    events_path: str | Path,
) -> str:
    """Log a review as an MLflow run named ``review NAME vB vs vA: VERDICT``; its run id.

    Tags: ``lapse.kind=review``, both versions, the verdict and the latest cutoff;
    metrics: ``champion.``/``challenger.``/``delta.TASK.METRIC`` for the table and
    the primary metrics' intervals (:func:`lapse.modeling.compare.interval_metrics`),
    which :func:`promote` reads back; the description is the review's Markdown.
    """
    import mlflow  # noqa: TID251

    client, uri = _connect(config)
    metrics: dict[str, float] = {"n_cutoffs": float(len(cutoffs))}
    for row in table.iter_rows(named=True):
        key = f"{row['task']}.{row['metric']}"
        metrics[f"{CHAMPION}.{key}"] = row[CHAMPION]
        metrics[f"{CHALLENGER}.{key}"] = row[CHALLENGER]
        metrics[f"delta.{key}"] = row["delta"]
    metrics.update(interval_metrics(intervals))
    with _mlflow_errors(uri):
        exp_id = _experiment_id(client, config, uri)
        tags = {
            f"{_TAG}kind": "review",
            f"{_TAG}version": __version__,
            f"{_TAG}model_name": pair.name,
            f"{_TAG}champion_version": str(pair.champion),
            f"{_TAG}challenger_version": str(pair.challenger),
            f"{_TAG}verdict": verdict,
            f"{_TAG}cutoff": str(run_day(cutoffs[-1])),
        }
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=f"review {pair.name} v{pair.challenger} vs v{pair.champion}: {verdict}",
            description=description,
        ) as run:
            mlflow.set_tags(tags)
            mlflow.log_params({k: _param(v) for k, v in params.items()})
            mlflow.log_metrics(metrics)
            _log_events(mlflow, events_path, config, "review")
            for path in files:
                mlflow.log_artifact(str(path))
    return str(run.info.run_id)


def _latest_review(
    client: MlflowClient, exp_id: str, name: str, candidate: int, champion: int
) -> Any | None:
    found = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`{_TAG}kind` = 'review' and tags.`{_TAG}model_name` = {_quote(name)} "
            f"and tags.`{_TAG}challenger_version` = '{candidate}' "
            f"and tags.`{_TAG}champion_version` = '{champion}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


# -- the promotion log -------------------------------------------------------------------------

_LOG: Final = f"{_TAG}promotion."
_REASON_MAX: Final = 2000
Action = Literal["registered", "promoted", "forced", "rolled_back", "refused"]


@dataclass(frozen=True)
class PromotionEvent:
    """One entry of a registered model's promotion log (:func:`history`).

    ``action``: ``registered`` (a new version became the first champion),
    ``promoted`` (by the review's verdict), ``forced`` (``--force``),
    ``rolled_back`` (``--rollback``) or ``refused`` (the review refused the
    version or was inconclusive; the champion stayed). ``version`` is the new
    champion (the refused version for ``refused``), ``previous`` the champion
    before.
    """

    seq: int
    at: str
    by: str
    action: Action
    version: int
    previous: int | None
    reason: str
    review_run: str | None = None
    verdict: str | None = None


def _log(client: MlflowClient, name: str) -> list[PromotionEvent]:
    tags = client.get_registered_model(name).tags or {}
    events = []
    for key, value in tags.items():
        if not key.startswith(_LOG):
            continue
        try:
            events.append(PromotionEvent(**json.loads(value)))
        except (ValueError, TypeError):
            raise LapseError(
                f"registered model {name!r}: tag {key} is not a promotion log entry lapse "
                "wrote; restore or delete it (MLflow UI, or MlflowClient."
                "delete_registered_model_tag)"
            ) from None
    return sorted(events, key=lambda e: e.seq)


def _append(
    client: MlflowClient, name: str, log: list[PromotionEvent], **entry: Any
) -> PromotionEvent:
    """Add an entry to the log (a registered model tag ``lapse.promotion.NNNNNN``)."""
    seq = (log[-1].seq if log else 0) + 1
    event = PromotionEvent(
        seq=seq,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        by=_user(),
        **{**entry, "reason": str(entry["reason"])[:_REASON_MAX]},
    )
    client.set_registered_model_tag(name, f"{_LOG}{seq:06d}", json.dumps(event.__dict__))
    log.append(event)
    return event


def _champions(log: list[PromotionEvent]) -> list[int]:
    """The champions in force, oldest first, the current one last: promotions push,
    a rollback pops back to the version it restored, refusals change nothing."""
    stack: list[int] = []
    for event in log:
        if event.action in ("registered", "promoted", "forced"):
            if not stack and event.previous is not None:  # a champion from before the log
                stack.append(event.previous)
            stack.append(event.version)
        elif event.action == "rolled_back":
            while stack and stack[-1] != event.version:
                stack.pop()
            if not stack:
                stack.append(event.version)
    return stack


def _live(client: MlflowClient, name: str, version: int) -> bool:
    """The version still exists and is not archived."""
    from mlflow.exceptions import MlflowException  # noqa: TID251

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        return False
    return str(mv.current_stage or "").lower() != "archived"


def _rollback_target(client: MlflowClient, name: str, stack: list[int]) -> int | None:
    """The last live champion before the current one (the top of ``stack``)."""
    return next((v for v in reversed(stack[:-1]) if _live(client, name, v)), None)


def _sync_previous(client: MlflowClient, name: str, stack: list[int]) -> int | None:
    """Point ``previous-champion`` at what a rollback would restore (or remove it)."""
    target = _rollback_target(client, name, stack)
    if target is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(target))
    elif PREVIOUS_CHAMPION in _aliases(client, name):
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    return target


def history(config: LapseConfig, name: str | None = None) -> list[PromotionEvent]:
    """The promotion log of ``name`` (default ``models.name``), oldest first.

    Raises
    ------
    LapseError
        The registered model does not exist.
    """
    from mlflow.exceptions import MlflowException  # noqa: TID251

    name = name or config.models.name
    client, uri = _connect(config)
    with _mlflow_errors(uri):
        try:
            return _log(client, name)
        except MlflowException:
            raise _missing(client, name, None, uri) from None


# -- promotion -------------------------------------------------------------------------------


def _decision(run: Any, config: LapseConfig) -> tuple[Decision, dict[str, float], list[str]]:
    """The review run's verdict under the config's primary metrics and tolerance now."""
    intervals = intervals_from_metrics(run.data.metrics)
    primary = [f"{t}.{m}" for t, m in config.registry.primary_metrics.items()]
    chosen = {k: intervals[k] for k in primary if k in intervals}
    notes = [
        f"{k} was not compared (not measured for both versions)" for k in primary if k not in chosen
    ]
    if not chosen:
        raise LapseError(
            f"review run {run.info.run_id} holds no interval for the primary metrics "
            f"({', '.join(primary)}); run `lapse review EVENTS` again"
        )
    decision = decide(chosen, config.registry.tolerance)
    return decision, {k: iv.delta for k, iv in chosen.items()}, notes


def promote(
    config: LapseConfig,
    *,
    name: str | None = None,
    version: int | None = None,
    force: bool = False,
    rollback: bool = False,
    reason: str | None = None,
) -> PromoteResult:
    """Move ``champion`` to the challenger (or ``version``), or roll it back.

    Promotion needs the latest review (:func:`lapse.train.review.review`) of that
    version against the current champion. Its primary metrics' intervals are
    judged again under the config's ``registry.tolerance``
    (:func:`lapse.modeling.compare.decide`): only the verdict ``promote`` moves
    the alias; ``refuse`` and ``inconclusive`` keep the champion (logged as
    ``refused``) unless ``force``. ``rollback`` restores the last champion before
    the current one in the promotion log (:func:`history`) that still exists and
    is not archived. Every change is an entry of the log (registered model tags),
    and ``previous-champion`` points at what the next rollback would restore.
    Model versions themselves are never changed.

    Raises
    ------
    PromotionRefused
        The review refused the version or was inconclusive (the message names the
        rule, the metric and its interval); exit code 4.
    LapseError
        No review to decide on, nothing to roll back to, a missing model, version
        or alias.
    """
    if force and rollback:
        raise LapseError("--force and --rollback cannot be combined")
    if rollback and version is not None:
        raise LapseError("--rollback restores the previous champion; it takes no --version")
    name = name or config.models.name
    client, uri = _connect(config)
    with _mlflow_errors(uri):
        if rollback:
            return _rollback(client, name, uri, reason)
        candidate = int(
            _version(client, name, CHALLENGER if version is None else int(version), uri).version
        )
        current = _aliases(client, name).get(CHAMPION)
        if current == candidate:
            raise LapseError(f"version {candidate} of {name!r} is already the {CHAMPION}")
        log = _log(client, name)
        checks: dict[str, float] = {}
        review_run: str | None = None
        verdict: str | None = None
        notes: list[str] = []
        auto = "first champion"
        if current is not None:
            run = _latest_review(
                client, _experiment_id(client, config, uri), name, candidate, current
            )
            if run is None and not force:
                raise LapseError(
                    f"no review compares version {candidate} of {name!r} with the {CHAMPION} "
                    f"(version {current}); run `lapse review EVENTS` first, or pass --force"
                )
            auto = "no review"
            if run is not None:
                review_run = run.info.run_id
                decision, checks, notes = _decision(run, config)
                verdict, auto = decision.verdict, f"{decision.rule} (review run {review_run})"
                if decision.verdict != "promote" and not force:
                    _append(
                        client,
                        name,
                        log,
                        action="refused",
                        version=candidate,
                        previous=current,
                        reason=auto,
                        review_run=review_run,
                        verdict=verdict,
                    )
                    raise PromotionRefused(
                        f"promotion of version {candidate} of {name!r} refused, the review's "
                        f"verdict is {decision.rule} (review run {review_run}); the champion "
                        f"stays version {current}; pass --force to promote anyway"
                    )
            if force:
                auto = "forced; " + auto
        why = f"{reason}: {auto}" if reason else auto
        client.set_registered_model_alias(name, CHAMPION, str(candidate))
        _append(
            client,
            name,
            log,
            action="forced" if force else "promoted",
            version=candidate,
            previous=current,
            reason=why,
            review_run=review_run,
            verdict=verdict,
        )
        previous = _sync_previous(client, name, _champions(log))
    return PromoteResult(
        name=name,
        action="forced" if force else "promoted",
        champion=candidate,
        previous_champion=previous,
        reason=why,
        user=_user(),
        review_run_id=review_run,
        checks=checks,
        notes=notes,
    )


def _rollback(client: MlflowClient, name: str, uri: str, reason: str | None) -> PromoteResult:
    """Restore the last live champion before the current one in the promotion log."""
    current = int(_version(client, name, CHAMPION, uri).version)
    log = _log(client, name)
    stack = _champions(log)
    if not stack or stack[-1] != current:
        logged = f"version {stack[-1]}" if stack else "no champion"
        raise LapseError(
            f"the {CHAMPION} of {name!r} is version {current} but its promotion log ends with "
            f"{logged} (the alias was moved outside lapse); set the champion with `lapse promote "
            "--version V --force` so the log records it"
        )
    target = _rollback_target(client, name, stack)
    if target is None:
        raise LapseError(
            f"nothing to roll back to: the promotion log of {name!r} holds no champion before "
            f"version {current} that still exists and is not archived (`lapse registry history`)"
        )
    why = reason or f"rollback from version {current}"
    client.set_registered_model_alias(name, CHAMPION, str(target))
    _append(client, name, log, action="rolled_back", version=target, previous=current, reason=why)
    previous = _sync_previous(client, name, _champions(log))
    return PromoteResult(
        name=name,
        action="rolled_back",
        champion=target,
        previous_champion=previous,
        reason=why,
        user=_user(),
    )
