"""Shadow rollout with a real Triton: a candidate version 4 shadows version 3.

Versions 2 and 3 agree on every class and tumour decision of the test images (the largest |Δ tumour
probability| is 0.035), so the candidate is version 1's graph published as version 4 with version 3's
preprocessing: a candidate that disagrees on a few images. The disagreements the server counts are compared
with those computed here from each version's own answers (version 3 through the callers' unpinned requests,
version 4 asked directly as the candidate model), and an absent candidate only counts errors.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

from helpers import copy_repository, free_ports

from braintumor.config import DEFAULT_DATA_DIR, DEFAULT_MODEL_REPOSITORY, NO_TUMOR_INDEX
from braintumor.preprocessing import Preprocessing
from braintumor_serving import shadow
from braintumor_serving.triton import ServerConfig, TritonServer
from synthetic import random_slice

PRIMARY, CANDIDATE = 3, 4
BATCHES = (1, 3, 8, 1, 5, 2, 12)  # 32 images, in requests of several sizes


def _images(n: int, repository: Path) -> np.ndarray:
    """``n`` tensors of the primary's preprocessing: real Testing slices where the shared data is, else synthetic
    slices, plus a few noise tensors (where versions tend to disagree)."""
    prep = Preprocessing.from_json((repository / "braintumor" / str(PRIMARY) / "preprocessing.json").read_text())
    rng = np.random.default_rng(18)
    files = sorted((DEFAULT_DATA_DIR / "Testing").glob("*/*.jpg"))
    chosen = [files[i] for i in rng.choice(len(files), n - 4, replace=False)] if len(files) >= n else []
    sources = chosen or [random_slice(rng, label=k % 4) for k in range(n - 4)]
    tensors = [prep(s) for s in sources] + [rng.integers(0, 256, (160, 160, 3), dtype=np.uint8) for _ in range(4)]
    return np.stack(tensors)


def _infer(client, model: str, images: np.ndarray, version: str = "", heatmap: bool = False):
    tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("probabilities", "heatmap")[: 2 if heatmap else 1]]
    result = client.infer(model, [tensor], model_version=version, outputs=outputs)
    return result.get_response().model_version, result.as_numpy("probabilities")


def _wait_for(metrics_url: str, images: int, timeout: float = 60.0) -> dict[str, float]:
    """The shadow counters once every image has an outcome (compared, error or dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        counters = shadow.read_counters(metrics_url)
        done = counters["compared"] + counters["error"] + counters["dropped"]
        if done >= images or time.monotonic() > deadline:
            return counters
        time.sleep(0.2)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    repository = copy_repository(tmp_path_factory.mktemp("shadow") / "source", keep=(PRIMARY,), extra_versions=1)
    shutil.copy2(DEFAULT_MODEL_REPOSITORY / "braintumor" / "1" / "model.onnx", repository / "braintumor" / "4")
    return repository


def _server(repository: Path) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    return TritonServer(ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics))


@pytest.mark.slow  # starts a real Triton
def test_disagreement_metrics_count_exactly_what_the_versions_disagree_on(source, tmp_path):
    repository = tmp_path / "repo"
    spec = shadow.shadow_repository(source, CANDIDATE, repository)
    assert (spec.primary, spec.candidate_model, spec.candidate_version) == (PRIMARY, "braintumor_candidate", CANDIDATE)
    images = _images(sum(BATCHES), source)
    with _server(repository) as server:
        server.wait_until_ready(240)
        client = grpcclient.InferenceServerClient(server.config.grpc_url)
        answers, start = [], 0
        for k, size in enumerate(BATCHES):
            version, probabilities = _infer(client, "braintumor", images[start : start + size], heatmap=k % 3 == 1)
            assert version == str(PRIMARY)  # callers that name no version get the primary
            answers.append(probabilities)
            start += size
        primary = np.concatenate(answers)
        counters = _wait_for(server.config.metrics_url, len(images))
        # the candidate, asked directly (not shadowed: only the primary's requests are)
        version, candidate = _infer(client, "braintumor_candidate", images)
        assert version == str(CANDIDATE)
        summary = shadow.summarise(shadow.read_counters(server.config.metrics_url))
        report = subprocess.run(
            [
                sys.executable,
                "-m",
                "braintumor_serving.shadow",
                "report",
                "--metrics",
                server.config.metrics_url,
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    # the callers' answers are the primary's own, never the candidate's
    import onnxruntime as ort

    session = ort.InferenceSession(str(source / "braintumor" / str(PRIMARY) / "model.onnx"))
    np.testing.assert_allclose(primary, session.run(["probabilities"], {"image": images})[0], atol=1e-5)
    assert not np.allclose(primary, candidate, atol=1e-3)

    tumour_p, tumour_c = 1 - primary[:, NO_TUMOR_INDEX], 1 - candidate[:, NO_TUMOR_INDEX]
    expected = {
        "class": int(np.sum(primary.argmax(1) != candidate.argmax(1))),
        "tumour": int(np.sum((tumour_p >= 0.5) != (tumour_c >= 0.5))),
        "probability": int(np.sum(np.abs(tumour_p - tumour_c) > spec.probability_tolerance)),
    }
    print(f"\nshadow counters {counters}; expected {expected}")
    assert counters["compared"] == len(images) and counters["error"] == 0 and counters["dropped"] == 0
    assert expected["class"] > 0  # the check below can fail: the versions do disagree on these images
    assert {k: counters[k] for k in expected} == expected
    assert counters["abs_diff_sum"] == pytest.approx(float(np.abs(tumour_p - tumour_c).sum()), rel=1e-4, abs=1e-4)
    assert summary["compared"] == len(images) and summary["disagreements"]["class"]["count"] == expected["class"]
    printed = json.loads(report.stdout)
    assert printed["disagreements"]["tumour"]["count"] == expected["tumour"] and printed["compared"] == len(images)
    assert report.returncode == {"pass": 0, "fail": 1, "undecided": 3}[printed["verdict"]]


@pytest.mark.slow  # starts a real Triton
def test_serve_shadow_command_serves_the_primary_and_refuses_an_unknown_candidate(tmp_path):
    # the committed layout up to version 4 (latest 2 served: 3 and 4): the shadow of 4 serves 3 alone, not 2
    source = copy_repository(tmp_path / "published", keep=(1, 2, 3, 4))
    command = [sys.executable, "-m", "braintumor.cli", "serve", "--repository", str(source)]
    refused = subprocess.run([*command, "--shadow", "7"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "version 7 of braintumor is not in" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    http, grpc, metrics = free_ports(3)
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([*command, *ports, "--shadow", str(CANDIDATE)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "Triton is ready" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert f"Shadow: version {PRIMARY} answers" in log.read_text()
        assert f"braintumor (versions {PRIMARY}), braintumor_candidate (versions {CANDIDATE})" in log.read_text()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        version, _ = _infer(client, "braintumor", _images(6, source))
        assert version == str(PRIMARY)
        assert _wait_for(f"http://127.0.0.1:{metrics}/metrics", 6)["compared"] == 6
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0


@pytest.mark.slow  # starts a real Triton
def test_an_absent_candidate_counts_errors_and_fails_no_request(source, tmp_path):
    repository = tmp_path / "repo"
    spec = shadow.shadow_repository(source, CANDIDATE, repository)
    shutil.rmtree(repository / spec.candidate_model)  # the candidate never loads: every shadow request fails
    images = _images(12, source)
    with _server(repository) as server:
        server.wait_until_ready(240)
        client = grpcclient.InferenceServerClient(server.config.grpc_url)
        for start in range(0, len(images), 4):
            version, probabilities = _infer(client, "braintumor", images[start : start + 4])
            assert version == str(PRIMARY) and probabilities.shape == (4, 4)
        counters = _wait_for(server.config.metrics_url, len(images))
        assert server.is_ready()
    assert counters["error"] == len(images)
    assert counters["compared"] == counters["dropped"] == 0
    assert shadow.summarise(counters)["verdict"] == "undecided"


def test_shadow_repository_refuses_what_cannot_be_compared(tmp_path):
    source = copy_repository(tmp_path / "source", keep=(1, 2))
    with pytest.raises(shadow.ShadowError, match="another preprocessing"):
        shadow.shadow_repository(source, 2, tmp_path / "a")
    with pytest.raises(shadow.ShadowError, match="not in"):
        shadow.shadow_repository(source, 7, tmp_path / "b")


def test_report_verdict_and_wilson_interval():
    base = dict.fromkeys((*shadow.OUTCOMES, *shadow.KINDS, "abs_diff_sum"), 0.0)
    passing = shadow.summarise({**base, "compared": 2000, "tumour": 4, "class": 9, "abs_diff_sum": 20.0})
    assert passing["verdict"] == "pass" and passing["mean_abs_tumour_probability_difference"] == 0.01
    assert shadow.summarise({**base, "compared": 2000, "tumour": 100})["verdict"] == "fail"
    assert shadow.summarise({**base, "compared": 20, "tumour": 0})["verdict"] == "undecided"  # too few
    low, high = shadow.wilson(4, 2000)
    assert low < 4 / 2000 < high and high == pytest.approx(0.00513, abs=1e-4)
