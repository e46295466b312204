"""What the PACS worker has done: a small SQLite file, so that a restart resumes where it stopped.

Each series Orthanc calls stable is recorded as ``pending`` in the same transaction that moves the change-feed
cursor past it, so no series is lost between reading the feed and processing it. A series being worked on
is ``in_progress``; one found in that state at start-up was interrupted, and is processed again (its result
objects have deterministic UIDs, so a partial write is found and replaced). Every series ends ``done``,
``skipped`` or ``failed`` with its reason. The file holds Orthanc's series IDs (hashes) and hashed tags, no
patient data. One worker at a time: a second one on the same file is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from braintumor.pacs.errors import StateMismatchError

__all__ = ["SeriesState", "StateStore", "Status"]


class Status(StrEnum):
    """Where a series stands."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


TERMINAL = (Status.DONE, Status.SKIPPED, Status.FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id TEXT PRIMARY KEY,              -- Orthanc's series ID (itself a hash of DICOM identifiers)
    tag TEXT NOT NULL,                -- the short hash the logs use
    status TEXT NOT NULL,
    previous TEXT,                    -- the status before a new StableSeries re-queued it
    reason TEXT,
    fingerprint TEXT,                 -- hash of the instance set the status is about
    results TEXT NOT NULL DEFAULT '[]',  -- SOP Instance UIDs of the result objects written
    planned TEXT NOT NULL DEFAULT '[]',  -- SOP Instance UIDs of the result being written now
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
"""


@dataclass(frozen=True)
class SeriesState:
    """One row of the state file."""

    series_id: str
    tag: str
    status: Status
    previous: Status | None
    reason: str | None
    fingerprint: str | None
    results: tuple[str, ...]
    planned: tuple[str, ...]
    attempts: int


class StateStore:
    """The state file of one worker following one Orthanc.

    Args:
        path: the SQLite file (created with its folder when missing).
        orthanc: the Orthanc address it belongs to; a file made for another one is refused.

    Raises:
        StateMismatchError: when the file belongs to another Orthanc, or another worker holds it.
    """

    def __init__(self, path: Path, orthanc: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] | None = self.path.with_name(self.path.name + ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._lock.close()
            self._lock = None
            raise StateMismatchError(f"another braintumor pacs worker is using {self.path}") from err
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        self._db.executescript(_SCHEMA)
        with self._transaction():
            known = self._db.execute("SELECT value FROM meta WHERE key = 'orthanc'").fetchone()
            if known is None:
                self._db.execute("INSERT INTO meta VALUES ('orthanc', ?), ('cursor', '0')", (orthanc,))
        if known is not None and known[0] != orthanc:
            self.close()
            raise StateMismatchError(
                f"{self.path} follows another Orthanc ({known[0]}): use another --state file for {orthanc}"
            )

    def close(self) -> None:
        """Close the database and release the lock."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the change feed --------------------------------------------------------------------------------
    @property
    def cursor(self) -> int:
        """The last change-feed sequence number already recorded."""
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()[0])

    def enqueue(self, series: Iterable[tuple[str, str]], cursor: int) -> int:
        """Record stable series as pending and move the cursor, in one transaction.

        A series already finished is queued again (Orthanc calls a series stable again when instances are
        added to it): the worker then compares its instance set with the one its status is about.

        Args:
            series: ``(Orthanc series ID, tag)`` pairs.
            cursor: the change-feed position they were read up to.

        Returns:
            How many series were queued (new or again).
        """
        queued = 0
        now = time.time()
        with self._transaction():
            for series_id, tag in series:
                row = self._db.execute("SELECT status FROM series WHERE id = ?", (series_id,)).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO series (id, tag, status, updated) VALUES (?, ?, ?, ?)",
                        (series_id, tag, Status.PENDING, now),
                    )
                    queued += 1
                elif row[0] in TERMINAL:
                    self._db.execute(
                        "UPDATE series SET status = ?, previous = ?, updated = ? WHERE id = ?",
                        (Status.PENDING, row[0], now, series_id),
                    )
                    queued += 1
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'cursor'", (str(max(cursor, self.cursor)),))
        return queued

    # -- processing -------------------------------------------------------------------------------------
    def _row(self, row: tuple) -> SeriesState:
        series_id, tag, status, previous, reason, fingerprint, results, planned, attempts = row
        return SeriesState(
            series_id,
            tag,
            Status(status),
            Status(previous) if previous else None,
            reason,
            fingerprint,
            tuple(json.loads(results)),
            tuple(json.loads(planned)),
            attempts,
        )

    _COLUMNS = "id, tag, status, previous, reason, fingerprint, results, planned, attempts"

    def get(self, series_id: str) -> SeriesState | None:
        """The state of one series, or ``None`` when it is unknown.

        Args:
            series_id: Orthanc's series ID.
        """
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM series WHERE id = ?", (series_id,)).fetchone()
        return self._row(row) if row else None

    def next_series(self) -> SeriesState | None:
        """The next series to work on: an interrupted one first, then pending ones in the order they came."""
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM series WHERE status IN (?, ?) ORDER BY status = ? DESC, rowid LIMIT 1",
            (Status.IN_PROGRESS, Status.PENDING, Status.IN_PROGRESS),
        ).fetchone()
        return self._row(row) if row else None

    def start(self, series_id: str, fingerprint: str) -> None:
        """Mark a series in progress.

        Args:
            series_id: Orthanc's series ID.
            fingerprint: the instance set being processed.
        """
        with self._transaction():
            self._db.execute(
                "UPDATE series SET status = ?, fingerprint = ?, attempts = attempts + 1, updated = ? WHERE id = ?",
                (Status.IN_PROGRESS, fingerprint, time.time(), series_id),
            )

    def plan(self, series_id: str, instances: Iterable[str]) -> None:
        """Record the SOP Instance UIDs of the result about to be written, before writing it: a worker that
        stops while writing finds them on restart.

        Args:
            series_id: Orthanc's series ID.
            instances: the result objects' SOP Instance UIDs.
        """
        with self._transaction():
            self._db.execute(
                "UPDATE series SET planned = ?, updated = ? WHERE id = ?",
                (json.dumps(list(instances)), time.time(), series_id),
            )

    def finish(
        self,
        series_id: str,
        status: Status,
        reason: str | None = None,
        fingerprint: str | None = None,
        results: Iterable[str] | None = None,
    ) -> None:
        """Record how a series ended.

        Args:
            series_id: Orthanc's series ID.
            status: ``done``, ``skipped`` or ``failed``.
            reason: why it was skipped or failed (safe to show: no patient data).
            fingerprint: the instance set it is about (kept when ``None``).
            results: SOP Instance UIDs of the result objects written (kept when ``None``).
        """
        if status not in TERMINAL:
            raise ValueError(f"a series ends done, skipped or failed, not {status}")
        with self._transaction():
            self._db.execute(
                "UPDATE series SET status = ?, previous = NULL, reason = ?, fingerprint = COALESCE(?, fingerprint), "
                "results = COALESCE(?, results), planned = '[]', updated = ? WHERE id = ?",
                (
                    status,
                    reason,
                    fingerprint,
                    None if results is None else json.dumps(list(results)),
                    time.time(),
                    series_id,
                ),
            )

    def retry_failed(self) -> int:
        """Queue every failed series again (``--retry-failed``); returns how many."""
        with self._transaction():
            cursor = self._db.execute(
                "UPDATE series SET status = ?, previous = NULL, updated = ? WHERE status = ?",
                (Status.PENDING, time.time(), Status.FAILED),
            )
        return cursor.rowcount

    # -- reporting --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """How many series are in each status."""
        rows = self._db.execute("SELECT status, COUNT(*) FROM series GROUP BY status").fetchall()
        return {str(status): int(n) for status, n in rows}

    def all(self) -> list[SeriesState]:
        """Every series, in the order they came."""
        return [self._row(r) for r in self._db.execute(f"SELECT {self._COLUMNS} FROM series ORDER BY rowid")]
