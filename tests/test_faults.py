"""Faults under load, with a ledger: every request ends with a correct answer or a clear error, none is lost.

A bounded load (2,000 batch-1 requests, 16 in flight, through one SDK client with retries) runs while the
server is killed with SIGKILL and restarted on the same ports, and while a python-backend stub process is
killed. The test prints the ledger (sent / answered / errored / lost) and requires lost = 0, and then that
no process (``tritonserver``, stub, watchdog) or shared-memory region of either server is left.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_repository, free_ports

from synthetic import random_slice

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

from braintumor.classifier import TumorClassifier
from braintumor.config import INPUT_NAME, LABELS, MODEL_NAME, OUTPUT_NAME
from braintumor.errors import BrainTumorError
from braintumor.preprocessing import preprocess_batch
from braintumor_serving import lifecycle
from braintumor_serving.triton import ServerConfig, TritonServer

pytestmark = pytest.mark.slow
TOTAL, IN_FLIGHT, TIMEOUT, RETRIES, BACKOFF = 2000, 16, 10.0, 7, 0.25
#: The longest one request may take: every attempt's deadline plus every backoff wait.
WORST_CASE = (RETRIES + 1) * TIMEOUT + BACKOFF * (2**RETRIES - 1)


def _stub_pids(server_pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == server_pid and b"triton_python_backend_stub" in cmdline:
                pids.append(int(entry.name))
    return pids


def _left_behind(prefixes: list[str], within: float = 10.0) -> list[str]:
    """What of the servers with ``prefixes`` is still there ``within`` seconds from now: live processes
    carrying a prefix (``tritonserver``, stubs, the watchdog) and shared-memory regions."""
    assert all(prefixes), "a server without a shared-memory prefix"
    deadline = time.monotonic() + within
    while True:
        left = [
            f"pid {p.pid} {p.name}"
            for p in lifecycle.processes()
            if p.alive and p.pid != os.getpid() and any(p.carries(x) for x in prefixes)
        ]
        left += [f"/dev/shm/{f.name}" for x in prefixes for f in lifecycle.region_files(x)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_sigkill_restart_and_stub_kill_lose_nothing(tmp_path, capsys):
    repository = copy_repository(tmp_path / "model_repository")
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    server = TritonServer(config).start()
    server.wait_until_ready(120)
    ledger: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    classifier = TumorClassifier(config.grpc_url, timeout=TIMEOUT, retries=RETRIES, backoff=BACKOFF)
    # The version the client sends to (the latest), with its own preprocessing, and its answers in-process.
    rng = np.random.default_rng(3)
    pixels = preprocess_batch(
        [random_slice(rng, 224, k % 4) for k in range(8)], preprocessing=classifier.model.preprocessing
    )
    session = ort.InferenceSession(str(repository / MODEL_NAME / classifier.model.version / "model.onnx"))
    expected = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]

    def one(i: int) -> None:
        k = i % len(pixels)
        try:
            prediction = classifier.predict_pixels(pixels[k : k + 1])[0]
            got = np.array([prediction.probabilities[label] for label in LABELS])
            outcome = "answered" if np.abs(got - expected[k]).max() <= 1e-5 else "wrong"
        except BrainTumorError as err:
            outcome = "errored"
            with lock:
                errors[f"{err.status}: {str(err)[:120]}"] += 1
        with lock:
            ledger[outcome] += 1

    def answered() -> int:
        with lock:
            return ledger["answered"] + ledger["errored"] + ledger["wrong"]

    started = time.monotonic()
    restarted = None
    try:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(one, i) for i in range(TOTAL)]
            while answered() < 400:
                time.sleep(0.01)
            os.kill(server.process.pid, signal.SIGKILL)  # (a) the server dies
            server.stop()  # as `braintumor serve` does when Triton dies: its HTTP front goes too
            time.sleep(1.0)
            restarted = TritonServer(config).start()  # same ports, same repository
            restarted.wait_until_ready(120)
            while answered() < 1200:
                time.sleep(0.01)
            stubs = _stub_pids(restarted.process.pid)
            assert stubs, "no python backend stub found"
            os.kill(stubs[0], signal.SIGKILL)  # (b) one backend stub dies
            _, not_done = wait(futures, timeout=WORST_CASE + 60)
    finally:
        classifier.close()
        for s in (server, restarted):
            if s is not None:
                s.stop()
    elapsed = time.monotonic() - started
    lost = TOTAL - (ledger["answered"] + ledger["errored"] + ledger["wrong"])
    left = _left_behind([s.shm_prefix for s in (server, restarted) if s is not None])
    with capsys.disabled():
        print(
            f"\nfault ledger: sent {TOTAL}, answered {ledger['answered']}, errored {ledger['errored']}, "
            f"wrong {ledger['wrong']}, lost {lost} in {elapsed:.1f} s; errors: {dict(errors)}; "
            f"left behind: {left or 'nothing'}"
        )
    assert not left, f"processes or shared memory of the servers outlived them: {left}"
    assert not not_done and lost == 0
    assert ledger["wrong"] == 0
    assert ledger["answered"] >= TOTAL * 0.9  # retries carried almost every request across the restart
