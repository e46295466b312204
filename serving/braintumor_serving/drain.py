"""Drain a replica before it stops: wait until it has no request in flight.

Run as a Kubernetes ``preStop`` hook (``deploy/k8s``) before the kubelet sends SIGTERM:

    python -m braintumor_serving.drain --metrics-url http://127.0.0.1:8002/metrics --wait 10 --timeout 40

It first waits ``--wait`` seconds while the pod, now terminating, leaves the Service's endpoints (kube-proxy,
ingress controllers and the headless Service's DNS take a few seconds to see it; requests that arrive
meanwhile are served), then until Triton's metrics show no request pending and none completing for
``--quiet`` seconds: the last in-flight request has finished. Then SIGTERM stops Triton, which has nothing
left to finish. Outside Kubernetes, :func:`.rollout.rolling_update` calls :func:`wait_idle` after taking a
replica out of nginx.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
from collections.abc import Callable

from braintumor_serving.triton import read_metric

PENDING = "nv_inference_pending_request_count"
COMPLETED = ("nv_inference_request_success", "nv_inference_request_failure")
#: How :func:`wait_for_idle` ended: nothing in flight; still busy at the timeout; Triton's metrics could not be
#: read; cut short (a second signal to ``braintumor serve``).
IDLE, BUSY, UNREADABLE, INTERRUPTED = "idle", "busy", "unreadable", "interrupted"


def activity(metrics_url: str) -> tuple[float, float]:
    """Requests pending in Triton's schedulers now, and requests completed so far (all models).

    Args:
        metrics_url: Triton's Prometheus endpoint.
    """
    return read_metric(metrics_url, PENDING), sum(read_metric(metrics_url, name) for name in COMPLETED)


def wait_for_idle(
    metrics_url: str,
    quiet: float = 1.0,
    timeout: float = 30.0,
    interval: float = 0.1,
    interrupted: Callable[[], bool] | None = None,
) -> str:
    """Wait until nothing is pending and no request completed for ``quiet`` seconds; say how the wait ended.

    A request being executed is not counted as pending; it shows when it completes, so ``quiet`` must be
    longer than the slowest request (a batch of 32 takes about 0.1 s here).

    Args:
        metrics_url: Triton's Prometheus endpoint.
        quiet: seconds without activity that count as idle.
        timeout: give up after this long.
        interval: seconds between two readings.
        interrupted: checked before each reading; when it returns ``True`` the wait ends at once.

    Returns:
        :data:`IDLE`; :data:`BUSY` when ``timeout`` passed first; :data:`UNREADABLE` when the metrics cannot be
        read (nothing is known about the requests in flight); :data:`INTERRUPTED` when ``interrupted`` said so.
    """
    deadline = time.monotonic() + timeout
    last: float | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        if interrupted is not None and interrupted():
            return INTERRUPTED
        try:
            pending, completed = activity(metrics_url)
        except (urllib.error.URLError, OSError):
            return UNREADABLE
        now = time.monotonic()
        if pending > 0 or completed != last:
            last, since = completed, now
        elif now - since >= quiet:
            return IDLE
        time.sleep(interval)
    return BUSY


def wait_idle(metrics_url: str, quiet: float = 1.0, timeout: float = 30.0, interval: float = 0.1) -> bool:
    """Wait until nothing is pending and no request completed for ``quiet`` seconds (:func:`wait_for_idle`).

    Args:
        metrics_url: Triton's Prometheus endpoint.
        quiet: seconds without activity that count as idle.
        timeout: give up after this long.
        interval: seconds between two readings.

    Returns:
        ``True`` when idle, ``False`` when ``timeout`` passed first or the metrics cannot be read (a server
        that is gone has nothing in flight either; the caller goes on either way).
    """
    return wait_for_idle(metrics_url, quiet, timeout, interval) == IDLE


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m braintumor_serving.drain``."""
    p = argparse.ArgumentParser(prog="python -m braintumor_serving.drain", description=__doc__.split("\n")[0])
    p.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    p.add_argument("--wait", type=float, default=10.0, help="seconds for the endpoints to forget the pod first")
    p.add_argument("--quiet", type=float, default=2.0, help="seconds without activity that count as idle")
    p.add_argument("--timeout", type=float, default=30.0, help="most seconds to wait for idleness after --wait")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor_serving.drain``: the ``preStop`` hook.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 always (a hook that fails only delays the stop); says on stderr when it gave up waiting.
    """
    args = parser().parse_args(argv)
    if min(args.wait, args.quiet, args.timeout) < 0:
        print("braintumor drain: --wait, --quiet and --timeout must be 0 or more", file=sys.stderr)
        return 2
    time.sleep(args.wait)
    if not wait_idle(args.metrics_url, args.quiet, args.timeout):
        print(f"braintumor drain: still busy or unreadable after {args.timeout:g} s; stopping anyway", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
