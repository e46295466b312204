"""``braintumor pacs``: the command line of the PACS worker.

This module imports only the standard library and :mod:`braintumor.config` at import time, so that
``braintumor --help`` works without the ``pacs`` extra; :func:`run` imports the worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from braintumor.config import DEFAULT_URL

__all__ = ["add_arguments", "default_state_path", "run"]


def default_state_path() -> Path:
    """``$XDG_STATE_HOME/braintumor/pacs.sqlite`` (``~/.local/state/...`` when unset)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "braintumor" / "pacs.sqlite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``pacs`` subcommand's arguments.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument(
        "--orthanc", required=True, metavar="URL", help="Orthanc's base URL, e.g. http://127.0.0.1:8042"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    parser.add_argument("--model-version", default=None, help="pin a served version (default: the latest)")
    parser.add_argument(
        "--state",
        default=None,
        metavar="PATH",
        help=f"state file: which series are done, in progress or failed (default {default_state_path()})",
    )
    parser.add_argument("--once", action="store_true", help="process every stable series pending, then exit")
    parser.add_argument("--retry-failed", action="store_true", help="queue the series that failed again first")
    parser.add_argument("--status", action="store_true", help="print what the state file holds, and exit")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between reads of an idle change feed")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each Triton call, in seconds")
    parser.add_argument(
        "--triton-attempts", type=int, default=4, help="tries per series while Triton is unavailable (default 4)"
    )
    parser.add_argument(
        "--triton-backoff", type=float, default=2.0, help="first wait between those tries, doubling (default 2 s)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _print_status(state) -> int:
    rows = state.all()
    counts = state.counts()
    print(", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "skipped", "failed", "pending", "in_progress")))
    for row in rows:
        if row.status in ("failed", "skipped", "in_progress", "pending"):
            print(f"series {row.tag}  {row.status:11s}  {row.reason or ''}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the worker as the arguments say.

    Returns:
        0 when the run ended normally, 1 when a series failed in a ``--once`` run, 2 when Orthanc, the
        credentials or the state file cannot be used.

    Args:
        args: the parsed arguments (:func:`add_arguments`).
    """
    from braintumor.pacs.errors import OrthancUnavailableError, StateMismatchError
    from braintumor.pacs.orthanc import OrthancClient, credentials_from_env
    from braintumor.pacs.state import StateStore
    from braintumor.pacs.worker import PacsWorker, WorkerConfig

    # Other libraries log at WARNING only: highdicom, for one, names source UIDs in its INFO messages.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log = logging.getLogger("braintumor.pacs")
    log.setLevel(args.log_level)
    state_path = Path(args.state) if args.state else default_state_path()
    try:
        orthanc = OrthancClient(args.orthanc, credentials_from_env())
        state = StateStore(state_path, orthanc.address)
    except (OrthancUnavailableError, StateMismatchError) as err:
        print(f"braintumor pacs: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("stopping after the series in hand (%s)", signal.Signals(signum).name)
        stop.set()

    config = WorkerConfig(
        triton_url=args.url,
        model_version=args.model_version,
        timeout=args.timeout,
        attempts=args.triton_attempts,
        backoff=args.triton_backoff,
        poll_interval=args.poll,
    )
    worker = PacsWorker(orthanc, state, config)
    try:
        if args.status:
            return _print_status(state)
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            version = orthanc.system().get("Version", "?")
            log.info(
                "following Orthanc %s at %s; Triton at %s; state %s", version, orthanc.address, args.url, state_path
            )
            if args.retry_failed:
                log.info("%d failed series queued again", state.retry_failed())
            summary = worker.run(once=args.once, stop=stop)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    except OrthancUnavailableError as err:
        print(f"braintumor pacs: {err}", file=sys.stderr)
        return 2
    finally:
        worker.close()
        state.close()
        orthanc.close()
    log.info("finished: %s", summary)
    return 1 if args.once and summary.counts["failed"] else 0
