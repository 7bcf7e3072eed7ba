"""The audit trail of score runs, under ``audit.path``.

```
<audit.path>/
  ledger.sqlite                                  run ledger (lapse.delivery.ledger)
  locks/<sink>.lock                              one run per sink at a time
  snapshots/run_date=YYYY-MM-DD/<run>.parquet    every scored user of a run
  snapshots/run_date=YYYY-MM-DD/<run>.json       the run's summary, drift included
  outbox/<run>/<sink>.parquet                    the records a run sends (resume reads it)
  dead_letters/<run>.<sink>.ndjson               records that did not get through
```

``run_date`` is the run's ``as_of`` date. Snapshots are written before
anything is sent, after the run is in the ledger; ``lapse impact`` reads only
the snapshots of runs the ledger shows delivered. Every file is written to a
temporary name and renamed into place (:func:`lapse.files.atomic_path`): a full
disk leaves no partial file, and is one :class:`~lapse.exceptions.WriteFailed`.
:func:`prune` applies ``audit.retention_days``; :func:`remove_run` deletes one
run's files (a run cut off before it sent anything); :func:`forget` erases users
from every file here, the snapshots of such cut-off runs included (the ledger has
its own).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from lapse.exceptions import LapseError
from lapse.files import atomic_path, temporary

__all__ = ["AuditTrail"]


@dataclass(frozen=True)
class AuditTrail:
    """Paths and file operations of one audit folder."""

    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def snapshot(self, run_date: date, score_run_id: str) -> Path:
        return (
            self.root / "snapshots" / f"run_date={run_date.isoformat()}" / f"{score_run_id}.parquet"
        )

    def outbox(self, score_run_id: str, sink: str) -> Path:
        return self.root / "outbox" / score_run_id / f"{sink}.parquet"

    def dead_letters(self, score_run_id: str, sink: str) -> Path:
        return self.root / "dead_letters" / f"{score_run_id}.{sink}.ndjson"

    # -- writing ---------------------------------------------------------------------------
    def write_snapshot(
        self, run_date: date, score_run_id: str, records: pl.DataFrame, summary: dict[str, Any]
    ) -> Path:
        """Write the run's snapshot and its JSON summary (atomically, before any send)."""
        path = self.snapshot(run_date, score_run_id)
        _write_parquet(records, path)
        self.write_summary(run_date, score_run_id, summary)
        return path

    def write_summary(self, run_date: date, score_run_id: str, summary: dict[str, Any]) -> Path:
        path = self.snapshot(run_date, score_run_id).with_suffix(".json")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        return path

    def write_outbox(self, score_run_id: str, sink: str, outbox: pl.DataFrame) -> Path:
        path = self.outbox(score_run_id, sink)
        _write_parquet(outbox, path)
        return path

    def read_outbox(self, score_run_id: str, sink: str) -> pl.DataFrame:
        path = self.outbox(score_run_id, sink)
        if not path.exists():
            raise LapseError(
                f"score run {score_run_id!r}: its outbox {path} is gone (pruned or forgotten); "
                "it cannot be resumed, run `lapse score` again"
            )
        return pl.read_parquet(path)

    # -- reading -----------------------------------------------------------------------------
    def snapshots(self, since: date | None = None) -> pl.DataFrame:
        """Every snapshot row from ``since`` on, with ``run_date`` (empty frame when none)."""
        files = [p for d, p in self._snapshot_files() if since is None or d >= since]
        if not files:
            return pl.DataFrame()
        return pl.concat(
            [
                pl.read_parquet(p).with_columns(pl.lit(d).alias("run_date"))
                for d, p in self._snapshot_files()
                if p in files
            ],
            how="diagonal_relaxed",
        )

    def _snapshot_files(self) -> list[tuple[date, Path]]:
        base = self.root / "snapshots"
        out = []
        for folder in sorted(base.glob("run_date=*")) if base.exists() else []:
            try:
                day = date.fromisoformat(folder.name.removeprefix("run_date="))
            except ValueError:
                continue
            out += [(day, p) for p in sorted(folder.glob("*.parquet"))]
        return out

    # -- retention and erasure ------------------------------------------------------------------
    def remove_run(self, run_date: date, score_run_id: str) -> None:
        """Delete one run's snapshot, summary, outbox and dead letters (and any temporary
        file a cut-off write left)."""
        snapshot = self.snapshot(run_date, score_run_id)
        for path in (snapshot, snapshot.with_suffix(".json")):
            path.unlink(missing_ok=True)
            temporary(path).unlink(missing_ok=True)
        if snapshot.parent.exists() and not any(snapshot.parent.iterdir()):
            snapshot.parent.rmdir()
        shutil.rmtree(self.root / "outbox" / score_run_id, ignore_errors=True)
        for dl in (self.root / "dead_letters").glob(f"{score_run_id}.*.ndjson"):
            dl.unlink(missing_ok=True)

    def prune(self, retention_days: int | None, today: date) -> list[str]:
        """Delete snapshots (and those runs' outboxes and dead letters) past retention.

        Returns the pruned ``score_run_id``s, so the caller drops them from the ledger.
        """
        if retention_days is None:
            return []
        oldest = today - timedelta(days=retention_days)
        runs: list[str] = []
        for day, path in self._snapshot_files():
            if day < oldest:
                runs.append(path.stem)
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
                if not any(path.parent.iterdir()):
                    path.parent.rmdir()
        for run in runs:
            shutil.rmtree(self.root / "outbox" / run, ignore_errors=True)
            for dl in (self.root / "dead_letters").glob(f"{run}.*.ndjson"):
                dl.unlink(missing_ok=True)
        return runs

    def forget(self, user_ids: set[str]) -> dict[str, int]:
        """Remove these users from every snapshot, outbox and dead-letter file here."""
        counts = {"snapshot_rows": 0, "outbox_rows": 0, "dead_letters": 0}
        ids = pl.Series(sorted(user_ids), dtype=pl.String)
        parquet = [p for _, p in self._snapshot_files()]
        parquet += sorted((self.root / "outbox").glob("*/*.parquet"))
        for path in parquet:
            frame = pl.read_parquet(path)
            keep = frame.filter(~pl.col("user_id").cast(pl.String).is_in(ids.implode()))
            if keep.height < frame.height:
                key = "outbox_rows" if path.parent.parent.name == "outbox" else "snapshot_rows"
                counts[key] += frame.height - keep.height
                _write_parquet(keep, path)
        for path in sorted((self.root / "dead_letters").glob("*.ndjson")):
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [
                line
                for line in lines
                if str(json.loads(line).get("record", {}).get("user_id")) not in user_ids
            ]
            if len(kept) < len(lines):
                counts["dead_letters"] += len(lines) - len(kept)
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        return counts


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)
