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
    the alias ``challenger``; the first version, or any version while no
    ``champion`` exists, also becomes ``champion``. :func:`promote` moves
    ``champion`` and keeps the one before as ``previous-champion``; a rollback
    swaps them back.

Replenishment
    The bundle's replenishment model (``extras["replenishment"]``, a
    :class:`lapse.train.replenishment.ReplenishmentModel`) rides along in the same
    registered version but is not part of the pyfunc output: it predicts the
    episodes open at a date from raw events, not from feature rows, so its
    predictions stay in the lapse API (``ReplenishmentModel.predict_open``
    on the bundle from :func:`load_bundle`). :func:`review` compares it
    (``concordance``, ``mae_days``) with
    :func:`lapse.train.replenishment.evaluate_model` when both versions carry one.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import polars as pl

from lapse.config import LapseConfig, dump_config
from lapse.exceptions import LapseError

if TYPE_CHECKING:
    from mlflow import MlflowClient  # noqa: TID251
    from mlflow.entities.model_registry import ModelVersion  # noqa: TID251

    from lapse.modeling.bundle import ChurnBundle
    from lapse.train.churn import TrainResult

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PREVIOUS_CHAMPION",
    "LoadedBundle",
    "PromoteResult",
    "RegisteredVersion",
    "ReviewResult",
    "flatten_metrics",
    "load_bundle",
    "log_training",
    "promote",
    "review",
    "score_rows",
    "tracking_uri",
]

CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"
PREVIOUS_CHAMPION: Final = "previous-champion"
DEFAULT_TRACKING_URI: Final = "sqlite:///mlflow.db"
BUNDLE_FILE: Final = "bundle.pkl"

# metrics where a smaller value is better; every other metric: larger is better
LOWER_IS_BETTER: Final = frozenset(
    {"brier", "log_loss", "ece", "mae_days", "ibs", "brier_7d", "brier_14d", "brier_30d"}
)
REVIEW_METRICS: Final = {
    "churn": ("roc_auc", "pr_auc", "brier", "ece", "top_decile_lift"),
    "replenishment": ("concordance", "mae_days"),
}
_PARAM_MAX: Final = 6000  # MLflow's limit on a parameter value
_SECRET: Final = re.compile(r"secret|token|passw|api_?key|credential|auth", re.IGNORECASE)
_TAG = "lapse."


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


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle and where it came from (``version`` is None for a local file)."""

    bundle: ChurnBundle
    source: str
    name: str
    version: int | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class ReviewResult:
    """Challenger vs champion scored on one cutoff after both models' label windows.

    ``table``: ``task, metric, champion, challenger, delta, better`` (``higher`` or
    ``lower``), ``primary``; ``verdict`` is ``promote`` when no primary metric is
    worse than the champion's by more than the tolerance, else ``keep``.
    """

    name: str
    champion: int
    challenger: int
    cutoff: datetime
    n_users: int
    churn_rate: float
    table: pl.DataFrame
    verdict: Literal["promote", "keep"]
    reasons: list[str]
    run_id: str
    plots: dict[str, Path]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromoteResult:
    """What :func:`promote` changed. ``checks`` are ``task.metric -> delta`` it compared."""

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


def _redact_uri(uri: str) -> str:
    """``uri`` without a password (user:secret@host -> user:***@host)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _artifact_location(config: LapseConfig, uri: str) -> str | None:
    configured = config.registry.artifact_location
    if configured:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", configured):
            return configured
        return config.resolve(configured).as_uri()
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


@contextlib.contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """Turn MLflow's failures (unreachable server, bad store) into one LapseError line."""
    from mlflow.exceptions import MlflowException  # noqa: TID251

    try:
        yield
    except MlflowException as exc:
        raise LapseError(f"MLflow at {_redact_uri(uri)}: {exc.message}") from None


def _connect(config: LapseConfig) -> tuple[MlflowClient, str]:
    """A client on the configured store; also points mlflow's globals there (for models:/ URIs)."""
    import mlflow  # noqa: TID251

    # mlflow sets its logger to INFO on import; its store-migration lines are noise for lapse users
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = tracking_uri(config)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


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
            f"MLflow experiment {name!r} at {_redact_uri(uri)} is deleted; restore it "
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
    return obj


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


def _day(d: datetime) -> str:
    return f"{d:%Y-%m-%d}"


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


def _lapse_version() -> str:
    from lapse import __version__

    return __version__


def _event_files(events_path: str | Path) -> list[Path]:
    from lapse.events.readers import resolve_format

    return resolve_format(events_path)[1]


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _log_events(mlflow: Any, events_path: str | Path, config: LapseConfig, context: str) -> None:
    """``mlflow.log_input`` of the event files; a database source is named in a tag instead
    (its rows have no file digest; the label never holds the connection URI)."""
    from lapse.config import DATABASE_FORMATS
    from lapse.events.database import source_label

    if config.source.kind in DATABASE_FORMATS:
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

    from lapse.schema import EVENT_COLUMNS

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
    from lapse.modeling.bundle import ChurnBundle

    return _PyfuncModel(ChurnBundle.load(data_path))


def _signature(bundle: ChurnBundle, example: pl.DataFrame) -> Any:
    from mlflow.models import ModelSignature, infer_signature  # noqa: TID251
    from mlflow.types import ColSpec, DataType, Schema  # noqa: TID251

    cols: list[Any] = [ColSpec(DataType.string, "user_id", required=False)]
    cols += [
        ColSpec(_mlflow_type(example.schema[name]), name)
        for name in bundle.feature_schema
        if name in example.columns
    ]
    output = score_rows(bundle, example.drop("user_id")).to_pandas()
    return ModelSignature(inputs=Schema(cols), outputs=infer_signature(None, output).outputs)


# -- logging a training run ------------------------------------------------------------------


def log_training(
    result: TrainResult, config: LapseConfig, *, events_path: str | Path
) -> RegisteredVersion:
    """Log a ``lapse train`` result as an MLflow run and register its bundle.

    The run holds params (config, data window, cutoffs, features, row counts),
    every numeric key of ``metrics.json`` flattened (``churn.lightgbm.roc_auc``),
    the report folder, the resolved config, the events as a dataset (path and
    content digest) and tags (lapse version, git commit when the config's folder
    is a git checkout). The bundle becomes one pyfunc model, registered as a new
    version of ``models.name`` with the alias ``challenger`` (and ``champion``
    when there is none yet).

    Raises
    ------
    LapseError
        The tracking store cannot be reached or written.
    """
    import mlflow  # noqa: TID251

    from lapse.modeling.bundle import ChurnBundle

    bundle = ChurnBundle.load(result.bundle_path)
    name = config.models.name
    example = result.example
    signature = _signature(bundle, example)
    client, uri = _connect(config)
    with _mlflow_errors(uri):
        exp_id = _experiment_id(client, config, uri)
        params = {
            **_config_params(config),
            "data.events": str(events_path),
            "data.end": _day(result.data_end),
            "data.first_training_cutoff": _day(result.training_cutoffs[0]),
            "cutoffs.training": ",".join(_day(c) for c in result.training_cutoffs),
            "cutoffs.validation": _day(result.validation_cutoff),
            "cutoffs.test": _day(result.test_cutoff),
            "cutoffs.refit": ",".join(_day(c) for c in result.refit_cutoffs),
            "cutoffs.calibration": _day(result.calibration_cutoff),
            "rows.train": str(result.n_train),
            "rows.validation": str(result.n_validation),
            "rows.test": str(result.n_test),
            "features.count": str(len(bundle.feature_schema)),
            "features": _param(",".join(bundle.feature_schema)),
            **{k: _param(v) for k, v in _text_leaves(result.metrics).items()},
        }
        tags = {
            f"{_TAG}kind": "train",
            f"{_TAG}version": _lapse_version(),
            f"{_TAG}model_name": name,
            f"{_TAG}churn.selected": result.selected,
        }
        commit = _git_commit(config.base_dir)
        if commit:
            tags["git.commit"] = commit
        with (
            tempfile.TemporaryDirectory(prefix="lapse-model-") as tmp,
            mlflow.start_run(experiment_id=exp_id, run_name=f"train {name}") as run,
        ):
            mlflow.set_tags(tags)
            mlflow.log_params(params)
            _log_events(mlflow, events_path, config, "training")
            mlflow.log_artifacts(str(result.out_dir), artifact_path="report")
            mlflow.log_text(_config_yaml(config), "config.yaml")
            # a fixed file name, so every logged model holds data/bundle.pkl
            data = Path(tmp) / BUNDLE_FILE
            data.write_bytes(Path(result.bundle_path).read_bytes())
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module=__name__,
                data_path=str(data),
                signature=signature,
                input_example=example.to_pandas(),
                pip_requirements=[f"lapse=={_lapse_version()}"],
                metadata={
                    "lapse_version": _lapse_version(),
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
            mv = mlflow.register_model(
                info.model_uri,
                name,
                tags={f"{_TAG}version": _lapse_version(), f"{_TAG}churn.selected": result.selected},
            )
        version = str(mv.version)
        client.set_registered_model_alias(name, CHALLENGER, version)
        aliases = [CHALLENGER]
        if CHAMPION not in _aliases(client, name):
            client.set_registered_model_alias(name, CHAMPION, version)
            aliases.append(CHAMPION)
    return RegisteredVersion(
        name=name,
        version=int(version),
        run_id=run.info.run_id,
        model_uri=f"models:/{name}/{version}",
        aliases=tuple(aliases),
        tracking_uri=_redact_uri(uri),
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
            f"no registered model {name!r} at {_redact_uri(uri)} (registered models: {listed}); "
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

    from lapse.modeling.bundle import ChurnBundle

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
    from lapse.modeling.bundle import ChurnBundle

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


# -- review --------------------------------------------------------------------------------


def _worse(metric: str, delta: float, tolerance: float) -> bool:
    """The challenger is worse than the champion by more than ``tolerance``."""
    if math.isnan(delta):
        return True
    return delta > tolerance if metric in LOWER_IS_BETTER else delta < -tolerance


def _checks(
    deltas: Mapping[str, float], config: LapseConfig
) -> tuple[dict[str, float], list[str], list[str]]:
    """(primary deltas compared, failures, notes) under the config's primary metrics."""
    tol = config.registry.tolerance
    compared: dict[str, float] = {}
    failures: list[str] = []
    notes: list[str] = []
    for task, metric in config.registry.primary_metrics.items():
        key = f"{task}.{metric}"
        if key not in deltas:
            notes.append(f"{key} was not compared (not measured for both versions)")
            continue
        delta = deltas[key]
        compared[key] = delta
        if _worse(metric, delta, tol):
            direction = "higher" if metric in LOWER_IS_BETTER else "lower"
            failures.append(
                f"{key} is {abs(delta):.4f} {direction} than the champion's (tolerance {tol:g})"
                if not math.isnan(delta)
                else f"{key} could not be measured"
            )
    return compared, failures, notes


def _review_labels(
    events: pl.LazyFrame, config: LapseConfig, bundles: list[ChurnBundle]
) -> tuple[datetime, pl.DataFrame]:
    """The review cutoff (latest complete one) and its churn labels, after both label windows."""
    from lapse.labels import churn_labels, data_span

    _, data_end = data_span(events)
    horizon = timedelta(days=config.labels.horizon_days)
    cutoff = data_end - horizon
    seen = max(_label_end(b) for b in bundles)
    if cutoff < seen:
        raise LapseError(
            f"the events end {_day(data_end)}, so the latest cutoff with a complete "
            f"{config.labels.horizon_days}-day label window is {_day(cutoff)}, but the newer "
            f"model saw labels up to {_day(seen)}; review on events that reach at least "
            f"{_day(seen + horizon)}"
        )
    return cutoff, churn_labels(events, [cutoff], config, data_end=data_end)


def _label_end(bundle: ChurnBundle) -> datetime:
    """End of the last label window the bundle was fitted or calibrated on."""
    end = bundle.cutoffs.get("data_end", bundle.training_end)
    return end if isinstance(end, datetime) else bundle.training_end


def _churn_scores(
    bundle: ChurnBundle, events: pl.LazyFrame, cutoff: datetime, column: str
) -> pl.DataFrame:
    from lapse.events import load_attributes

    rows = bundle.prepare(events, cutoff, attributes=load_attributes(bundle.config))
    bundle.check_schema(rows)
    return pl.DataFrame({"user_id": rows["user_id"], column: bundle.predict_proba(rows)})


def _replenishment(
    bundles: list[ChurnBundle], events: pl.LazyFrame, cutoff: datetime, config: LapseConfig
) -> tuple[dict[str, dict[str, float]] | None, str]:
    """(champion and challenger replenishment metrics, or None; a note for the review)."""
    from lapse.train.replenishment import NotEnoughEpisodes, ReplenishmentModel, evaluate_model

    found_models = [b.extras.get("replenishment") for b in bundles]
    models = [m for m in found_models if isinstance(m, ReplenishmentModel)]
    missing = [
        side
        for side, m in zip((CHAMPION, CHALLENGER), found_models, strict=True)
        if not isinstance(m, ReplenishmentModel)
    ]
    if missing:
        return None, (
            f"replenishment was not compared: the {' and the '.join(missing)} carries no "
            "replenishment model (trained with replenishment disabled, or its race was skipped)"
        )
    found: dict[str, dict[str, float]] = {}
    try:
        for side, m in zip((CHAMPION, CHALLENGER), models, strict=True):
            found[side] = evaluate_model(m, events, cutoff, config)
    except NotEnoughEpisodes as exc:
        return None, f"replenishment was not compared: {exc}"
    n = {side: int(found[side]["n"]) for side in found}
    return found, (
        f"replenishment: episodes open at {_day(cutoff)} followed for "
        f"{found[CHAMPION]['follow_up_days']:g} days ({n[CHAMPION]} under the champion's "
        f"consumables, {n[CHALLENGER]} under the challenger's)"
    )


def review(
    events_path: str | Path,
    config: LapseConfig,
    *,
    name: str | None = None,
    out_dir: str | Path | None = None,
) -> ReviewResult:
    """Score ``challenger`` and ``champion`` on one cutoff and log the comparison.

    The cutoff is the latest one of ``events_path`` whose label window is complete;
    it must lie after both models' last label windows (the refit's calibration
    cutoff plus the horizon), so neither model has seen its labels. Both are scored
    on the users eligible for both; churn: AUC, PR-AUC, Brier, ECE, top-decile lift;
    replenishment (``concordance``, ``mae_days``) when both bundles carry a replenishment
    model: the episodes open at the cutoff, followed for ``replenishment.follow_up_days``
    or to the end of the events (:func:`lapse.train.replenishment.evaluate_model`).
    The comparison is an MLflow run tagged with both versions, holding the table and
    overlaid ROC and calibration plots (also written to ``out_dir`` when given).

    Raises
    ------
    LapseError
        A missing model or alias, only one version to compare, or events that do
        not reach past both models' label windows.
    """
    import mlflow  # noqa: TID251

    from lapse.events import read_events
    from lapse.modeling.metrics import binary_metrics
    from lapse.modeling.plots import write_plots

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
        bundles = [_download_bundle(champ_mv, name), _download_bundle(chal_mv, name)]

    events = read_events(events_path, config).collect().lazy()
    cutoff, labels = _review_labels(events, config, bundles)
    scored = labels.select("user_id", "churned")
    for bundle, column in zip(bundles, (CHAMPION, CHALLENGER), strict=True):
        scored = scored.join(
            _churn_scores(bundle, events, cutoff, column), on="user_id", how="inner"
        )
    notes: list[str] = []
    if scored.height < labels.height:
        notes.append(
            f"{labels.height - scored.height} of {labels.height} labelled users are not "
            "eligible under both models' configs and were left out"
        )
    if scored.height == 0:
        raise LapseError(
            f"no user at the review cutoff {_day(cutoff)} is eligible under both models"
        )
    y = scored["churned"].cast(pl.Float64).to_numpy()
    found: dict[str, dict[str, dict[str, float]]] = {"churn": {}}
    for side in (CHAMPION, CHALLENGER):
        found["churn"][side] = binary_metrics(y, scored[side].to_numpy())
    replen, replen_note = _replenishment(bundles, events, cutoff, config)
    if replen is not None:
        found["replenishment"] = replen
    notes.append(replen_note)

    rows: list[dict[str, Any]] = []
    deltas: dict[str, float] = {}
    primary = {f"{t}.{m}" for t, m in config.registry.primary_metrics.items()}
    for task, sides in found.items():
        wanted = list(REVIEW_METRICS.get(task, ()))
        chosen = config.registry.primary_metrics.get(task)
        if chosen is not None and chosen not in wanted:
            wanted.append(chosen)
        for metric in wanted:
            if metric not in sides[CHAMPION] or metric not in sides[CHALLENGER]:
                continue
            a, b = sides[CHAMPION][metric], sides[CHALLENGER][metric]
            deltas[f"{task}.{metric}"] = b - a
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    CHAMPION: a,
                    CHALLENGER: b,
                    "delta": b - a,
                    "better": "lower" if metric in LOWER_IS_BETTER else "higher",
                    "primary": f"{task}.{metric}" in primary,
                }
            )
    table = pl.DataFrame(rows)
    _, failures, check_notes = _checks(deltas, config)
    notes += check_notes
    verdict: Literal["promote", "keep"] = "keep" if failures else "promote"
    reasons = failures or [
        f"no primary metric is worse than the champion's by more than {config.registry.tolerance:g}"
    ]

    with contextlib.ExitStack() as stack:
        folder = (
            Path(out_dir)
            if out_dir is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lapse-review-")))
        )
        folder.mkdir(parents=True, exist_ok=True)
        plots = write_plots(
            folder,
            y,
            {
                f"champion v{champ}": scored[CHAMPION].to_numpy(),
                f"challenger v{chal}": scored[CHALLENGER].to_numpy(),
            },
            title=f"review cutoff {_day(cutoff)}",
        )
        table.write_csv(folder / "review.csv")
        (folder / "review.md").write_text(
            _review_md(
                name,
                champ,
                chal,
                cutoff,
                scored.height,
                float(y.mean()),
                table,
                verdict,
                reasons,
                notes,
            ),
            encoding="utf-8",
        )
        with _mlflow_errors(uri):
            exp_id = _experiment_id(client, config, uri)
            tags = {
                f"{_TAG}kind": "review",
                f"{_TAG}version": _lapse_version(),
                f"{_TAG}model_name": name,
                f"{_TAG}champion_version": str(champ),
                f"{_TAG}challenger_version": str(chal),
                f"{_TAG}verdict": verdict,
                f"{_TAG}cutoff": _day(cutoff),
            }
            with mlflow.start_run(
                experiment_id=exp_id, run_name=f"review {name} v{chal} vs v{champ}"
            ) as run:
                mlflow.set_tags(tags)
                mlflow.log_params(
                    {
                        "cutoff": _day(cutoff),
                        "n_users": str(scored.height),
                        "tolerance": str(config.registry.tolerance),
                        "primary_metrics": _param(config.registry.primary_metrics),
                        "events": str(events_path),
                    }
                )
                metrics: dict[str, float] = {"n_users": float(scored.height)}
                for row in table.iter_rows(named=True):
                    key = f"{row['task']}.{row['metric']}"
                    metrics[f"{CHAMPION}.{key}"] = row[CHAMPION]
                    metrics[f"{CHALLENGER}.{key}"] = row[CHALLENGER]
                    metrics[f"delta.{key}"] = row["delta"]
                mlflow.log_metrics(metrics)
                _log_events(mlflow, events_path, config, "review")
                for path in (*plots.values(), folder / "review.csv", folder / "review.md"):
                    mlflow.log_artifact(str(path))
            for version in (champ, chal):
                client.set_model_version_tag(
                    name, str(version), f"{_TAG}last_review_run", run.info.run_id
                )
    return ReviewResult(
        name=name,
        champion=champ,
        challenger=chal,
        cutoff=cutoff,
        n_users=scored.height,
        churn_rate=float(y.mean()),
        table=table,
        verdict=verdict,
        reasons=reasons,
        run_id=run.info.run_id,
        plots=plots if out_dir is not None else {},
        notes=notes,
    )


def _review_md(
    name: str,
    champ: int,
    chal: int,
    cutoff: datetime,
    n_users: int,
    churn_rate: float,
    table: pl.DataFrame,
    verdict: str,
    reasons: list[str],
    notes: list[str],
) -> str:
    lines = [
        f"# Review of {name}: challenger v{chal} vs champion v{champ}",
        "",
        f"Cutoff {_day(cutoff)}, {n_users} users, churn rate {churn_rate:.3f}.",
        "",
        "| task | metric | champion | challenger | delta | better | primary |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table.iter_rows(named=True):
        lines.append(
            f"| {r['task']} | {r['metric']} | {r[CHAMPION]:.4f} | {r[CHALLENGER]:.4f} | "
            f"{r['delta']:+.4f} | {r['better']} | {'yes' if r['primary'] else ''} |"
        )
    lines += ["", f"Verdict: **{verdict}**. " + "; ".join(reasons) + "."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# -- promotion -------------------------------------------------------------------------------


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

    Promotion needs the latest :func:`review` of that version against the current
    champion: it is refused when a primary metric (``registry.primary_metrics``)
    is worse than the champion's by more than ``registry.tolerance``, unless
    ``force``. The old champion becomes ``previous-champion``; ``rollback`` swaps
    the two back. The promoted version's tags record the reason, the compared
    metrics, who and when.

    Raises
    ------
    LapseError
        Refused promotion (the message names the metric, both values and the
        tolerance), no review to decide on, a missing model, version or alias.
    """
    if force and rollback:
        raise LapseError("--force and --rollback cannot be combined")
    if rollback and version is not None:
        raise LapseError("--rollback restores the previous champion; it takes no --version")
    name = name or config.models.name
    user = _user()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    client, uri = _connect(config)
    with _mlflow_errors(uri):
        if rollback:
            current = int(_version(client, name, CHAMPION, uri).version)
            previous = int(_version(client, name, PREVIOUS_CHAMPION, uri).version)
            why = reason or f"rollback from version {current}"
            client.set_registered_model_alias(name, CHAMPION, str(previous))
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(current))
            for key, value in {
                "rolled_back_at": now,
                "rolled_back_by": user,
                "rollback_reason": why,
                "rolled_back_from": str(current),
            }.items():
                client.set_model_version_tag(name, str(previous), f"{_TAG}{key}", value)
            return PromoteResult(
                name=name,
                action="rolled_back",
                champion=previous,
                previous_champion=current,
                reason=why,
                user=user,
            )

        target = _version(client, name, CHALLENGER if version is None else int(version), uri)
        candidate = int(target.version)
        aliases = _aliases(client, name)
        current_champion = aliases.get(CHAMPION)
        if current_champion == candidate:
            raise LapseError(f"version {candidate} of {name!r} is already the {CHAMPION}")
        checks: dict[str, float] = {}
        review_run: str | None = None
        notes: list[str] = []
        if current_champion is not None:
            exp_id = _experiment_id(client, config, uri)
            run = _latest_review(client, exp_id, name, candidate, current_champion)
            if run is None and not force:
                raise LapseError(
                    f"no review compares version {candidate} of {name!r} with the {CHAMPION} "
                    f"(version {current_champion}); run `lapse review EVENTS` first, or pass "
                    "--force"
                )
            if run is not None:
                review_run = run.info.run_id
                deltas = {
                    k.removeprefix("delta."): float(v)
                    for k, v in run.data.metrics.items()
                    if k.startswith("delta.")
                }
                checks, failures, notes = _checks(deltas, config)
                if failures and not force:
                    raise LapseError(
                        f"promotion of version {candidate} of {name!r} refused: "
                        + "; ".join(failures)
                        + f" (review run {review_run}); pass --force to promote anyway"
                    )
        action: Literal["promoted", "forced"] = "forced" if force else "promoted"
        if current_champion is None:
            auto = "first champion"
        else:
            compared = "; ".join(f"{k} {v:+.4f} vs the champion" for k, v in checks.items())
            auto = compared or "no review"
            if review_run:
                auto += f" (review run {review_run})"
            if force:
                auto = "forced; " + auto
        why = f"{reason}: {auto}" if reason else auto
        if current_champion is not None:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(current_champion))
        client.set_registered_model_alias(name, CHAMPION, str(candidate))
        tags = {
            "promoted_at": now,
            "promoted_by": user,
            "promotion_reason": why,
            "promotion_forced": str(force).lower(),
            "promotion_metrics": json.dumps(checks),
            "promoted_over": str(current_champion) if current_champion is not None else "",
            "promotion_review_run": review_run or "",
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, str(candidate), f"{_TAG}{key}", value)
    return PromoteResult(
        name=name,
        action=action,
        champion=candidate,
        previous_champion=current_champion,
        reason=why,
        user=user,
        review_run_id=review_run,
        checks=checks,
        notes=notes,
    )
