"""The PACS worker: follow Orthanc's change feed, classify each stable MR series, write its result back.

For every ``StableSeries`` change the worker reads the series, keeps it only if it is MR (anything else is
skipped with its reason), classifies every slice through Triton with the SDK, and stores into the same
study a Comprehensive SR and a Secondary Capture of the top slice's Grad-CAM overlay (both in one STOW-RS
request). Its state file (:mod:`braintumor.pacs.state`) makes every series end exactly once ``done``,
``skipped`` or ``failed`` with a reason, across restarts. Logs name series by a hash of Orthanc's series ID
and slices by position: no names, IDs, dates or UIDs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from braintumor.classifier import TumorClassifier
from braintumor.config import DEFAULT_URL, MODEL_NAME
from braintumor.pacs.errors import (
    ClassificationError,
    ClassifierUnavailableError,
    OrthancRequestError,
    OrthancUnavailableError,
    ResultWriteError,
    UnreadableSliceError,
    UnsupportedSeriesError,
)
from braintumor.pacs.orthanc import OrthancClient
from braintumor.pacs.report import MANUFACTURER, build_sc, build_sr, encode, overlay_picture, result_uids
from braintumor.pacs.series import SeriesResult, classify_series, fingerprint, read_series, tag
from braintumor.pacs.state import TERMINAL, SeriesState, StateStore, Status

log = logging.getLogger("braintumor.pacs")

__all__ = ["PacsWorker", "Summary", "WorkerConfig"]


@dataclass(frozen=True)
class WorkerConfig:
    """How the worker reaches Triton and paces itself.

    Args:
        triton_url: Triton's gRPC ``host:port``.
        model_name: the served model.
        model_version: a version to pin, or ``None`` for the latest served.
        timeout: deadline of each Triton call, in seconds.
        attempts: tries per series while Triton is unavailable.
        backoff: first wait between those tries, in seconds (doubling).
        poll_interval: seconds between reads of the change feed when it is idle.
        workers: threads downloading and decoding slices.
    """

    triton_url: str = DEFAULT_URL
    model_name: str = MODEL_NAME
    model_version: str | None = None
    timeout: float = 30.0
    attempts: int = 4
    backoff: float = 2.0
    poll_interval: float = 2.0
    workers: int = 2


@dataclass
class Summary:
    """What one run of the worker did: series by how they ended."""

    counts: Counter = field(default_factory=Counter)

    def add(self, status: Status) -> None:
        """Count one series that ended with ``status``.

        Args:
            status: how it ended.
        """
        self.counts[str(status)] += 1

    def __str__(self) -> str:
        parts = [f"{self.counts[s]} {s}" for s in ("done", "skipped", "failed") if self.counts[s]]
        return ", ".join(parts) or "nothing to do"


def _series_numbers(info: dict[str, Any]) -> tuple[int, int]:
    """Series numbers of the SR and the Secondary Capture: 9000 and 9500 plus the input's (below 500)."""
    try:
        number = int(str(info.get("MainDicomTags", {}).get("SeriesNumber", "0")).strip() or 0)
    except ValueError:
        number = 0
    number = number if 0 <= number < 500 else 0
    return 9000 + number, 9500 + number


class PacsWorker:
    """Follows one Orthanc and writes results into it.

    Args:
        orthanc: the Orthanc client.
        state: the state file.
        config: Triton and pacing settings.
    """

    def __init__(self, orthanc: OrthancClient, state: StateStore, config: WorkerConfig | None = None) -> None:
        self.orthanc, self.state = orthanc, state
        self.config = config or WorkerConfig()
        self._classifier: TumorClassifier | None = None

    def close(self) -> None:
        """Close the Triton channel."""
        if self._classifier is not None:
            self._classifier.close()
            self._classifier = None

    # -- Triton -----------------------------------------------------------------------------------------
    def _connect(self) -> TumorClassifier:
        """The classifier, (re)reading the served model each time: a restarted Triton, or a newly published
        version, is picked up at the next series."""
        if self._classifier is None:
            c = self.config
            self._classifier = TumorClassifier(
                c.triton_url, c.model_name, c.model_version, timeout=c.timeout, retries=1, backoff=0.2, check=False
            )
        self._classifier.connect()
        return self._classifier

    # -- the change feed --------------------------------------------------------------------------------
    def poll(self) -> int:
        """Read the change feed to its end, recording each stable series as pending.

        Returns:
            How many series were queued.
        """
        queued = 0
        while True:
            changes, last, done = self.orthanc.changes(self.state.cursor)
            stable = [(c.resource_id, tag(c.resource_id)) for c in changes if c.change_type == "StableSeries"]
            queued += self.state.enqueue(stable, last)
            if done or not changes:
                return queued

    # -- one series -------------------------------------------------------------------------------------
    def process(self, row: SeriesState) -> Status:
        """Take one queued (or interrupted) series to its end: done, skipped or failed.

        Args:
            row: the series' state (:meth:`StateStore.next_series`).

        Raises:
            OrthancUnavailableError: when Orthanc stops answering; the series stays queued.
        """
        started = time.perf_counter()
        name = f"series {row.tag}"
        try:
            info = self.orthanc.series(row.series_id)
        except OrthancRequestError as err:
            if err.details.get("http") == 404:
                return self._end(row, Status.SKIPPED, "the series is no longer in Orthanc", started)
            return self._end(row, Status.FAILED, err.message, started)
        instances = list(info.get("Instances", []))
        instance_set = fingerprint(instances)
        if row.status == Status.PENDING and row.previous in TERMINAL and row.fingerprint == instance_set:
            self.state.finish(row.series_id, row.previous, row.reason)
            log.info("%s: stable again with the same %d instances; stays %s", name, len(instances), row.previous)
            return row.previous
        tags = info.get("MainDicomTags", {})
        modality = str(tags.get("Modality", "") or "unknown")
        if str(tags.get("Manufacturer", "")) == MANUFACTURER:
            return self._end(
                row, Status.SKIPPED, f"a {MANUFACTURER} result (modality {modality})", started, instance_set
            )
        if modality != "MR":
            return self._end(row, Status.SKIPPED, f"modality {modality}, not MR", started, instance_set)
        self.state.start(row.series_id, instance_set)
        log.info("%s: %d instances, processing", name, len(instances))
        phases: dict[str, float] = {}
        try:
            slices = read_series(self.orthanc, info, workers=max(2, self.config.workers))
            phases["read"] = time.perf_counter() - started
            result = classify_series(
                self._connect,
                slices,
                attempts=self.config.attempts,
                backoff=self.config.backoff,
                workers=self.config.workers,
                address=self.config.triton_url,
            )
            log.info(
                "%s: %d slices classified by %s v%s; tumour probability %.3f (%s) on slice %d",
                name,
                len(slices),
                result.model_name,
                result.model_version,
                result.tumor_probability,
                result.label,
                result.top + 1,
            )
            phases["classify"] = time.perf_counter() - started - sum(phases.values())
            written = self._write(row, info, result, instance_set)
            phases["write"] = time.perf_counter() - started - sum(phases.values())
        except UnsupportedSeriesError as err:
            return self._end(row, Status.SKIPPED, err.message, started, instance_set)
        except (UnreadableSliceError, ClassifierUnavailableError, ClassificationError, ResultWriteError) as err:
            return self._end(row, Status.FAILED, err.message, started, instance_set)
        except OrthancRequestError as err:
            return self._end(row, Status.FAILED, err.message, started, instance_set)
        except OrthancUnavailableError:
            raise
        except Exception as err:  # never stop the worker on one series; the message may hold header values
            log.debug("%s: unexpected error", name, exc_info=True)
            return self._end(row, Status.FAILED, f"unexpected error ({type(err).__name__})", started, instance_set)
        self.state.finish(row.series_id, Status.DONE, None, instance_set, written)
        split = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
        log.info("%s: done in %.2f s (%s)", name, time.perf_counter() - started, split)
        return Status.DONE

    def _end(
        self, row: SeriesState, status: Status, reason: str, started: float, instance_set: str | None = None
    ) -> Status:
        self.state.finish(row.series_id, status, reason, instance_set)
        level = logging.WARNING if status == Status.FAILED else logging.INFO
        log.log(level, "series %s: %s (%.2f s): %s", row.tag, status, time.perf_counter() - started, reason)
        return status

    def _delete(self, uids: Iterable[str], why: str, name: str) -> None:
        for uid in uids:
            for instance in self.orthanc.instance_ids(uid):
                self.orthanc.delete_instance(instance)
                log.info("%s: removed %s", name, why)

    def _write(
        self, row: SeriesState, info: dict[str, Any], result: SeriesResult, instance_set: str
    ) -> tuple[str, ...]:
        """Store the SR and the Secondary Capture, unless exactly this result is already stored; remove what
        an interrupted attempt or an older result of this series left. Returns the result's SOP UIDs."""
        name = f"series {row.tag}"
        header = result.slices[0].header
        uids = result_uids(str(header.SeriesInstanceUID), instance_set, result.model_name, result.model_version)
        self._delete([u for u in row.planned if u not in uids.instances], "an interrupted attempt's result", name)
        self.state.plan(row.series_id, uids.instances)
        stored = {uid: bool(self.orthanc.instance_ids(uid)) for uid in uids.instances}
        if all(stored.values()):
            log.info("%s: this result is already stored (an earlier run wrote it)", name)
        else:
            self._delete([u for u, there in stored.items() if there], "a partial result", name)
            try:
                served = self._classifier.model if self._classifier else None
                picture = overlay_picture(result, served.preprocessing if served else None)
                sr_number, sc_number = _series_numbers(info)
                files = [
                    encode(build_sc(result, uids, picture, sc_number)),
                    encode(build_sr(result, uids, sr_number)),
                ]
            except Exception as err:
                raise ResultWriteError(f"the result could not be built ({type(err).__name__})") from err
            started = time.perf_counter()
            try:
                self.orthanc.stow(str(header.StudyInstanceUID), files)
            except OrthancRequestError as err:
                self._delete(uids.instances, "a partly stored result", name)
                raise ResultWriteError(f"the result could not be stored: {err.message}") from err
            log.info("%s: SR and overlay stored in the study (%.2f s)", name, time.perf_counter() - started)
        self._delete([u for u in row.results if u not in uids.instances], "the result of an earlier version", name)
        return uids.instances

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, once: bool = False, stop: threading.Event | None = None) -> Summary:
        """Process queued series until stopped (or, with ``once``, until none is left).

        Args:
            once: read the change feed, process everything queued, and return.
            stop: set it to stop after the series in hand.

        Raises:
            OrthancUnavailableError: with ``once``, when Orthanc cannot be used; without it the worker waits
                for Orthanc, backing off up to a minute.
        """
        stop = stop or threading.Event()
        summary = Summary()
        wait = self.config.poll_interval
        while not stop.is_set():
            try:
                queued = self.poll()
                if queued:
                    log.info("%d series queued", queued)
                while not stop.is_set() and (row := self.state.next_series()) is not None:
                    summary.add(self.process(row))
                wait = self.config.poll_interval
            except OrthancUnavailableError as err:
                if once:
                    raise
                wait = min(60.0, max(wait * 2, 1.0))
                log.warning("%s; trying again in %.0f s", err, wait)
            if once:
                break
            stop.wait(wait)
        return summary
