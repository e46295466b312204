"""Soak: a real server under steady load at ~70 % of its measured capacity stays healthy and correct (issue 17).

The load mixes both served versions, batch sizes 1 to 16 and heatmap (explanation) requests. After warm-up,
resident memory of ``tritonserver`` and its stubs grows by at most 5 %, their open file descriptors stay
flat, no request fails, and every answer equals in-process ONNX Runtime on the same tensors within 1e-5.
Latency is measured from each request's scheduled send time and divided by its class's median; the median
of the per-10 s p99s of the last window, over that of the first, is the latency check (see
:mod:`braintumor_serving.soak`). When the load generator itself falls behind (p99 of its lag > 100 ms: the
machine starved the client), or other processes took more than a quarter of the machine's CPU time (p99
would measure their bursts), the latency check is not evaluated and the test says so by skipping after
the other checks passed.

- ``test_soak_two_minutes`` runs in the default suite (about 2.5 minutes): 120 s, 20 s warm-up, the first
  and last three blocks of 10 s compared, failing only above :data:`CI_P99_LIMIT` (2.0): on a small shared
  CI machine two minutes of p99 are too noisy for a tighter bound (a fresh-clone CI run measured 1.69 with
  nothing else running, where the same test alone measured 1.12 and, beside a training job, 0.42), so it
  catches only large regressions; the 10-minute soak holds the issue's 1.2.
- ``test_soak`` is marked ``soak`` and left out of the default run: ``SOAK_SECONDS`` long (default 600), one
  minute of warm-up, the first and last minutes compared, with the issue's bound: within 20 %
  (:data:`P99_LIMIT`). Run it with ``pytest -m soak tests/test_soak.py``.

``SOAK_REPORT=docs/soak`` writes ``soak-<seconds>s.json``, ``.md`` and ``.png`` there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_repository, free_ports

from synthetic import random_slice

pytest.importorskip("pytriton")
pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

from braintumor.config import MODEL_NAME
from braintumor.preprocessing import preprocess_batch
from braintumor_serving.soak import (
    Mix,
    Reference,
    measure_capacity,
    read_usage,
    run_soak,
    summarize,
    warm_shapes,
    write_report,
)
from braintumor_serving.triton import ServerConfig, TritonServer, ready_models

#: The share of the measured capacity that the soak sends.
LOAD_FRACTION = 0.7
#: The 10-minute soak's latency bound: the last minute's p99 within 20 % of the first's (issue 17).
P99_LIMIT = 1.2
#: The 2-minute CI soak's latency bound: generous, for large regressions only (its windows are 30 s).
CI_P99_LIMIT = 2.0
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
REPORT = os.environ.get("SOAK_REPORT")


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    """A real server (both latest versions) on free ports, for this module alone."""
    repository = copy_repository(tmp_path_factory.mktemp("soak") / "model_repository")
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with TritonServer(config) as server:
        server.wait_until_ready(180)
        yield server


def soak(server: TritonServer, seconds: float, warmup: float, command: str, capsys, p99_limit: float) -> dict:
    """Measure capacity, soak at :data:`LOAD_FRACTION` of it, print and (with ``SOAK_REPORT``) write the
    figures, and return the summary.

    Args:
        server: the running server.
        seconds: the soak's length.
        warmup: seconds the checks leave out.
        command: how to reproduce the run (for the report).
        capsys: pytest's capture (the figures are printed past it).
        p99_limit: the latency check's bound (see :func:`summarize`).
    """
    versions = tuple(ready_models(server.local_http_url, server.config.admin_key)[MODEL_NAME])  # the served ones
    rng = np.random.default_rng(70)
    pixels = preprocess_batch([random_slice(rng, 224, k % 4) for k in range(64)])
    reference = Reference(server.config.repository, versions, pixels)
    mix = Mix(versions=versions)
    preparation = {"rss_mib_ready": read_usage(server.shm_prefix).rss_bytes / 2**20}
    warm_shapes(server.config.grpc_url, reference, versions)
    preparation["rss_mib_after_shapes"] = read_usage(server.shm_prefix).rss_bytes / 2**20
    capacity = measure_capacity(server.config.grpc_url, reference, mix, seconds=6.0, warmup=1.0)
    preparation["rss_mib_after_capacity"] = read_usage(server.shm_prefix).rss_bytes / 2**20
    run = run_soak(
        server.config.grpc_url,
        server.shm_prefix,
        reference,
        mix,
        seconds=seconds,
        rate=LOAD_FRACTION * capacity,
        capacity=capacity,
        warmup=warmup,
        preparation=preparation,
    )
    summary = summarize(run, p99_limit=p99_limit)
    written = write_report(run, summary, Path(REPORT), command) if REPORT else []
    with capsys.disabled():
        print(f"\nsoak {seconds:.0f} s: {summary['requests']} requests at {summary['rate_requests_per_s']:.1f}/s")
        for name, check in summary["checks"].items():
            verdict = check.get("skipped") or ("ok" if check["passed"] else "FAILED")
            print(f"  {name}: {check['value']:.4g} (limit {check['limit']}) {verdict}")
        print(
            f"  p99/class median {summary['p99_normalised_first_window']:.2f} -> "
            f"{summary['p99_normalised_last_window']:.2f}; raw p99 {summary['p99_ms_first_window']:.0f} -> "
            f"{summary['p99_ms_last_window']:.0f} ms; generator lag p99 {summary['generator_lag_p99_ms']:.0f} ms; "
            f"other processes' CPU share {100 * summary['foreign_cpu_share']:.0f} %; "
            f"memory "
            f"{summary['rss_mib_first_window']:.0f} -> {summary['rss_mib_last_window']:.0f} MiB, training jobs "
            f"beside: {summary['environment']['training_jobs_running']}"
            + (f"; wrote {', '.join(map(str, written))}" if written else "")
        )
    return summary


def assert_healthy(summary: dict) -> None:
    """Every check passed (and say which did not); a check that could not be evaluated (the latency check
    when the load generator fell behind) makes the test skip, saying so, after all the others passed."""
    failed = {
        name: check for name, check in summary["checks"].items() if "skipped" not in check and not check["passed"]
    }
    assert not failed, f"soak checks failed: {failed}; first errors: {summary['first_errors']}"
    skipped = {name: check["skipped"] for name, check in summary["checks"].items() if "skipped" in check}
    if skipped:
        pytest.skip(
            "every other soak check passed (memory, descriptors, errors, answers), but "
            + "; ".join(f"{name} was {reason}" for name, reason in skipped.items())
        )


@pytest.mark.slow
def test_soak_two_minutes(soak_server, capsys):
    command = f"SOAK_REPORT={REPORT or 'docs/soak'} .venv/bin/pytest tests/test_soak.py -k two_minutes"
    summary = soak(soak_server, seconds=120.0, warmup=20.0, command=command, capsys=capsys, p99_limit=CI_P99_LIMIT)
    assert_healthy(summary)


@pytest.mark.soak
@pytest.mark.slow
def test_soak(soak_server, capsys, request):
    if not re.search(r"(?<!not )\bsoak\b", request.config.getoption("markexpr") or ""):
        pytest.skip("the long soak runs only when chosen: pytest -m soak tests/test_soak.py")
    command = (
        f"SOAK_SECONDS={SOAK_SECONDS:g} SOAK_REPORT={REPORT or 'docs/soak'} .venv/bin/pytest -m soak tests/test_soak.py"
    )
    warmup = min(60.0, SOAK_SECONDS / 6)
    summary = soak(
        soak_server, seconds=SOAK_SECONDS, warmup=warmup, command=command, capsys=capsys, p99_limit=P99_LIMIT
    )
    assert_healthy(summary)
