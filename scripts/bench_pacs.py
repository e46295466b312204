"""Benchmark of the PACS worker: a 24-slice MR series, from the moment Orthanc calls it stable to the moment
its SR and overlay are stored, with ``braintumor pacs`` following Orthanc as in production.

Starts a temporary Orthanc (Debian's package, free loopback ports, made-up credentials) and, unless ``--url``
names a running one, the embedded Triton on the committed model repository; sends one series to warm up,
then ``--series`` more, one at a time, by C-STORE; prints each time and their median.

    .venv/bin/python scripts/bench_pacs.py                 # starts Triton itself
    .venv/bin/python scripts/bench_pacs.py --url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from orthanc_helpers import OrthancServer, Patient, c_store, mr_series, orthanc_missing  # noqa: E402


@contextlib.contextmanager
def triton(url: str | None) -> Iterator[str]:
    """A running Triton's gRPC address: ``url``, or an embedded server started for the benchmark."""
    if url:
        yield url
        return
    from braintumor_serving.triton import ServerConfig, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    config = ServerConfig(http_port=http, grpc_port=grpc, metrics_port=metrics)
    with TritonServer(config) as server:
        server.wait_until_ready(300)
        yield config.grpc_url


def wait(condition, timeout: float, step: float = 0.02) -> float:
    """Poll ``condition`` until true; returns the time it became true (``time.perf_counter``)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if condition():
            return time.perf_counter()
        time.sleep(step)
    raise TimeoutError("timed out")


def one_series(server: OrthancServer, rng: np.random.Generator, slices: int, size: int) -> tuple[float, float]:
    """Send one series; return (seconds from stable to stored, seconds from the last slice sent to stored)."""
    patient = Patient()
    series = mr_series(rng, patient, n=slices, size=size)
    c_store(series, server)
    sent = time.perf_counter()
    series_id = server.series_id(series[0].SeriesInstanceUID)
    stable = wait(lambda: server.json(f"/series/{series_id}").get("IsStable"), 60)

    def stored() -> bool:
        found = server.series_of_study(patient.study_uid)
        return sum(s["MainDicomTags"].get("Modality") in ("SR", "OT") for s in found) == 2

    done = wait(stored, 120)
    return done - stable, done - sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running Triton's gRPC address (default: start one)")
    parser.add_argument("--series", type=int, default=5, help="measured series (after one to warm up)")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each slice (12-bit)")
    args = parser.parse_args()
    missing = orthanc_missing()
    if missing:
        print(f"bench_pacs: {missing}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    with (
        tempfile.TemporaryDirectory() as folder,
        triton(args.url) as grpc_url,
        OrthancServer(Path(folder) / "orthanc", stable_age=1) as server,
    ):
        command = [
            str(Path(sys.executable).with_name("braintumor")),
            "pacs",
            "--orthanc",
            server.url,
            "--url",
            grpc_url,
            "--state",
            str(Path(folder) / "state.sqlite"),
            "--poll",
            "0.1",
        ]
        log = (Path(folder) / "worker.log").open("w")
        worker = subprocess.Popen(command, env={**os.environ, **server.env()}, stderr=log)
        try:
            warm, _ = one_series(server, rng, args.slices, args.size)
            print(f"warm-up series: {warm:.2f} s from stable to stored")
            times = []
            for k in range(args.series):
                from_stable, from_sent = one_series(server, rng, args.slices, args.size)
                times.append(from_stable)
                print(f"series {k + 1}: {from_stable:.2f} s from stable to stored ({from_sent:.2f} s from sent)")
        finally:
            worker.terminate()
            worker.wait(60)
            log.close()
        done = [line for line in (Path(folder) / "worker.log").read_text().splitlines() if ": done in " in line]
    print(
        f"{args.slices}-slice series ({args.size}x{args.size}, 12-bit), stable to stored: median "
        f"{statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)} series"
    )
    print("worker's own time per series:")
    for line in done[1:]:
        print("  " + line.rsplit("done in ", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
