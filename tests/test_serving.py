"""The embedded Triton server, started for real on free loopback ports."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import copy_repository, free_ports, metric

from synthetic import random_slice

ort = pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException

from braintumor.config import (
    DEFAULT_MODEL_REPOSITORY,
    HEATMAP_NAME,
    IMAGE_SIZE,
    INPUT_NAME,
    LABELS,
    MAX_BATCH_SIZE,
    MODEL_NAME,
    OUTPUT_NAME,
)
from braintumor.model_repository import versions
from braintumor.preprocessing import preprocess_batch
from braintumor_serving.triton import (
    ServeError,
    ServerConfig,
    TritonServer,
    ready_models,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(triton):
    return triton


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(5)
    return preprocess_batch([random_slice(rng, 224, k % 4) for k in range(6)])


#: The latest published version: the test server serves it beside version 1 (see conftest.py).
LATEST = versions(DEFAULT_MODEL_REPOSITORY / MODEL_NAME)[-1]


def _reference(repository, version, pixels):
    session = ort.InferenceSession(str(repository / MODEL_NAME / str(version) / "model.onnx"))
    return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def _grpc_infer(client, batch, version="", **kwargs):
    inp = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    out = grpcclient.InferRequestedOutput(OUTPUT_NAME, **kwargs)
    return client.infer(MODEL_NAME, [inp], model_version=version, outputs=[out])


def test_health_metadata_and_config(server):
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    meta = client.get_model_metadata(MODEL_NAME, as_json=True)
    assert meta["inputs"] == [{"name": INPUT_NAME, "datatype": "UINT8", "shape": ["-1", "160", "160", "3"]}]
    assert meta["outputs"] == [
        {"name": OUTPUT_NAME, "datatype": "FP32", "shape": ["-1", str(len(LABELS))]},
        {"name": HEATMAP_NAME, "datatype": "FP32", "shape": ["-1", str(len(LABELS)), "5", "5"]},
    ]
    config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
    assert config["backend"] == "onnxruntime_python" and config["max_batch_size"] == MAX_BATCH_SIZE
    assert "dynamic_batching" in config and config["model_warmup"]
    http = httpclient.InferenceServerClient(server.config.http_url)
    assert http.is_server_live() and http.is_model_ready(MODEL_NAME)


def test_grpc_and_http_equal_in_process_onnx_runtime(server, pixels):
    expected = _reference(server.config.repository, LATEST, pixels)
    got = _grpc_infer(grpcclient.InferenceServerClient(server.config.grpc_url), pixels).as_numpy(OUTPUT_NAME)
    assert np.abs(got - expected).max() <= 1e-5

    http = httpclient.InferenceServerClient(server.config.http_url)
    inp = httpclient.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=True)
    got_http = http.infer(MODEL_NAME, [inp]).as_numpy(OUTPUT_NAME)
    assert np.abs(got_http - expected).max() <= 1e-5


def test_batches_form_under_concurrency(server, pixels):
    url = server.config.metrics_url
    before = (
        metric(url, "nv_inference_count", model=MODEL_NAME),
        metric(url, "nv_inference_exec_count", model=MODEL_NAME),
    )
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    done: queue.Queue = queue.Queue()
    for i in range(96):  # all 96 in flight at once: more than the two instances can take, so they queue
        inp = grpcclient.InferInput(INPUT_NAME, [1, *pixels.shape[1:]], "UINT8")
        inp.set_data_from_numpy(pixels[i % 6 : i % 6 + 1])
        client.async_infer(MODEL_NAME, [inp], callback=lambda result, error: done.put((result, error)))
    results = [done.get(timeout=60) for _ in range(96)]
    assert all(e is None and r.as_numpy(OUTPUT_NAME).shape == (1, len(LABELS)) for r, e in results)
    inferences = metric(url, "nv_inference_count", model=MODEL_NAME) - before[0]
    executions = metric(url, "nv_inference_exec_count", model=MODEL_NAME) - before[1]
    assert inferences == 96
    assert executions < inferences, f"no batching: {executions} executions for {inferences} inferences"


def test_two_versions_are_served_and_selectable(server, pixels):
    index = ready_models(server.config.http_url, server.config.admin_key)
    assert index[MODEL_NAME] == [1, LATEST]
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    for version in ("1", str(LATEST)):
        response = _grpc_infer(client, pixels[:2], version=version)
        assert response.get_response().model_version == version
        expected = _reference(server.config.repository, version, pixels[:2])
        assert np.abs(response.as_numpy(OUTPUT_NAME) - expected).max() <= 1e-5
    latest = _grpc_infer(client, pixels[:1]).get_response().model_version
    assert latest == str(LATEST)


def test_classification_extension_returns_labels(server, pixels):
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    result = _grpc_infer(client, pixels[:1], class_count=2).as_numpy(OUTPUT_NAME)
    assert result.shape == (1, 2)
    probs = _reference(server.config.repository, LATEST, pixels[:1])[0]
    value, index, label = result[0][0].decode().split(":")
    assert int(index) == int(probs.argmax()) and label == LABELS[int(index)]
    assert float(value) == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.parametrize(
    ("array", "datatype", "message"),
    [
        (np.zeros((1, 100, 100, 3), np.uint8), "UINT8", "shape"),
        (np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32), "FP32", "data-type"),
        (np.zeros((MAX_BATCH_SIZE + 1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), "UINT8", "batch-size"),
    ],
    ids=["wrong-shape", "wrong-dtype", "batch-too-large"],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, pixels, array, datatype, message):
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    inp = grpcclient.InferInput(INPUT_NAME, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException, match=message) as err:
        client.infer(MODEL_NAME, [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert _grpc_infer(client, pixels[:1]).as_numpy(OUTPUT_NAME).shape == (1, len(LABELS))


def test_serve_command_starts_and_stops_cleanly_on_sigterm(tmp_path):
    http, grpc, metrics = free_ports(3)
    command = [
        sys.executable,
        "-m",
        "braintumor.cli",
        "serve",
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Triton is ready" in line or not line:
            break
    assert any("Triton is ready" in line for line in lines), "".join(lines) + proc.stderr.read()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    assert client.is_server_ready()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Stopped (in-flight requests finished; Triton ended before unloading the models)." in out
    with pytest.raises(InferenceServerException):
        client.is_server_live()


def test_busy_port_gives_a_clear_error_and_nonzero_exit(server):
    _, http, metrics = free_ports(3)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "braintumor.cli",
            "serve",
            "--grpc-port",
            str(server.config.grpc_port),
            "--http-port",
            str(http),
            "--metrics-port",
            str(metrics),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"gRPC port {server.config.grpc_port} on 127.0.0.1 is already in use" in result.stderr


def test_broken_model_makes_the_server_exit_with_its_error(tmp_path):
    repository = copy_repository(tmp_path / "model_repository")
    (repository / MODEL_NAME / str(LATEST) / "model.onnx").write_bytes(b"not an onnx file")  # a served version
    http, grpc, metrics = free_ports(3)
    server = TritonServer(ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics))
    with server, pytest.raises(ServeError, match="exited"):
        server.wait_until_ready(120)


def test_benchmark_measures_both_sides_and_writes_its_report(server, pixels, tmp_path):
    from braintumor_serving.bench import format_table, run_benchmark, write_results

    model = server.config.repository / MODEL_NAME / str(LATEST) / "model.onnx"
    results = run_benchmark(
        model,
        server.config.grpc_url,
        server.config.metrics_url,
        pixels,
        seconds=0.5,
        batch_sizes=(1, 8),
        concurrencies=(1, 16),
    )
    assert [p["batch_size"] for p in results["onnxruntime"]][:2] == [1, 8]
    assert all(p["images_per_s"] > 0 for p in results["onnxruntime"] + results["triton"])
    assert all(p["formed_batch"] >= 1.0 for p in results["triton"])
    assert "triton_c16_over_onnxruntime_at_formed_batch" in results["ratios"]
    assert "p99_overhead_ms" in results["ratios"]["triton_c1_latency_overhead_ms"]
    write_results(results, tmp_path)
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "triton" in format_table(results)


def test_version_benchmark_compares_published_versions_side_by_side(tmp_path, capsys):
    from braintumor.cli import main

    assert main(["bench", "--versions", "1", "2", "--seconds", "0.4", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "versions.json").read_text())
    rows = {(r["version"], r["batch_size"]): r for r in results["versions"]}
    assert set(rows) == {("1", 1), ("1", 32), ("2", 1), ("2", 32)}
    assert rows[("1", 32)]["throughput_vs_first"] == 1.0 and rows[("2", 1)]["images_per_s"] > 0
    assert "latency vs first" in capsys.readouterr().out
    assert main(["bench", "--versions", "1", "7", "--out", str(tmp_path)]) == 2


def test_administrative_apis_need_the_admin_key_and_inference_does_not(server, pixels):
    http = f"http://{server.config.http_url}"
    for path in ("/v2/repository/index", "/v2/models/stats", "/v2/logging"):
        request = urllib.request.Request(http + path, data=b"{}" if "index" in path else None)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 403, path
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    with pytest.raises(InferenceServerException, match=r"restricted|admin-key"):
        client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match=r"restricted|admin-key"):
        client.unload_model(MODEL_NAME)
    key = {"triton-grpc-protocol-admin-key": server.config.admin_key}  # Triton prefixes gRPC restriction keys
    index = client.get_model_repository_index(headers=key, as_json=True)
    assert any(m["name"] == MODEL_NAME for m in index["models"])
    with pytest.raises(InferenceServerException):  # model control is off, even with the key
        client.unload_model(MODEL_NAME, headers=key)
    assert client.is_model_ready(MODEL_NAME)
    assert _grpc_infer(client, pixels[:1]).as_numpy(OUTPUT_NAME).shape == (1, len(LABELS))


def test_overload_is_refused_quickly_and_the_server_recovers(server, pixels):
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    done: queue.Queue = queue.Queue()
    total = 600  # far more than the queue holds (128) and the instances can take
    start = time.monotonic()
    for i in range(total):
        inp = grpcclient.InferInput(INPUT_NAME, [1, *pixels.shape[1:]], "UINT8")
        inp.set_data_from_numpy(pixels[i % 6 : i % 6 + 1])
        client.async_infer(
            MODEL_NAME,
            [inp],
            callback=lambda result, error: done.put((result, error, time.monotonic())),
            client_timeout=30,
        )
    outcomes = [done.get(timeout=60) for _ in range(total)]
    answered = [r for r, e, _ in outcomes if e is None]
    refused = [(e, t) for r, e, t in outcomes if e is not None]
    assert len(answered) + len(refused) == total  # nothing lost
    assert refused, "the queue limit was never reached"
    assert all("queue" in e.message().lower() for e, _ in refused), refused[0][0].message()
    assert all(e.status() == "StatusCode.UNAVAILABLE" for e, _ in refused)
    assert min(t for _, t in refused) - start < 5.0  # refusals come quickly, not after a long wait
    expected = _reference(server.config.repository, LATEST, pixels[:1])
    assert np.abs(_grpc_infer(client, pixels[:1]).as_numpy(OUTPUT_NAME) - expected).max() <= 1e-5
    assert client.is_server_ready()


def test_unknown_models_versions_and_mismatched_payloads_are_refused_and_answers_stay_the_same(server, pixels):
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    expected = _reference(server.config.repository, LATEST, pixels[:2])
    inp = grpcclient.InferInput(INPUT_NAME, [1, *pixels.shape[1:]], "UINT8")
    inp.set_data_from_numpy(pixels[:1])
    with pytest.raises(InferenceServerException, match=r"unknown model|not found"):
        client.infer("no_such_model", [inp])
    with pytest.raises(InferenceServerException, match=r"unknown model|version|not found"):
        client.infer(MODEL_NAME, [inp], model_version="99")
    oversized = grpcclient.InferInput(INPUT_NAME, [1, *pixels.shape[1:]], "UINT8")
    oversized.set_data_from_numpy(pixels[:1])
    oversized._raw_content = pixels[:2].tobytes()  # twice the bytes its shape declares
    with pytest.raises(InferenceServerException, match=r"byte size|bytes"):
        client.infer(MODEL_NAME, [oversized])
    assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    got = _grpc_infer(client, pixels[:2]).as_numpy(OUTPUT_NAME)
    assert np.abs(got - expected).max() <= 1e-5
