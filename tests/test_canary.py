"""Canary with a real Triton: the candidate version 4 answers a share of the requests that name no version.

The candidate is version 1's graph published as version 4 with version 3's preprocessing (as in
``test_shadow.py``), so every answer says by its numbers which graph computed it: the output ``answered_by``
(Triton 2.51's python backend cannot set response parameters) is checked against that, the share it shows
against a binomial bound and against the server's counters, requests pinned to version 3 never reach the
candidate, and an absent candidate only turns diverted requests into fallbacks, never into failures.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton")
grpcclient = pytest.importorskip("tritonclient.grpc")

from helpers import copy_repository, free_ports

from braintumor import cli
from braintumor.config import ANSWERED_BY_OUTPUT, DEFAULT_MODEL_REPOSITORY, LABELS
from braintumor.model_repository import PREPROCESSING_PARAMETER, ROUTING_VERSION_BASE, next_version
from braintumor_serving import shadow
from braintumor_serving.triton import ServerConfig, TritonServer

PRIMARY, CANDIDATE = 3, 4
ROUTER = ROUTING_VERSION_BASE + PRIMARY  # never a number export publishes
SHARE, REQUESTS = 0.3, 400
FALLBACK = ("--max-fallback", "0.05")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    repository = copy_repository(tmp_path_factory.mktemp("canary") / "source", keep=(PRIMARY,), extra_versions=1)
    shutil.copy2(DEFAULT_MODEL_REPOSITORY / "braintumor" / "1" / "model.onnx", repository / "braintumor" / "4")
    return repository


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Eight tensors, noise: versions 1 and 3 answer them far apart."""
    return np.random.default_rng(4).integers(0, 256, (8, 160, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def expected(source, images) -> dict[str, np.ndarray]:
    """Each version's own probabilities for :func:`images`, from in-process ONNX Runtime."""
    import onnxruntime as ort

    found = {}
    for version in (PRIMARY, CANDIDATE):
        session = ort.InferenceSession(str(source / "braintumor" / str(version) / "model.onnx"))
        found[str(version)] = session.run(["probabilities"], {"image": images})[0]
    assert np.abs(found["3"] - found["4"]).max() > 0.05  # the answers tell the versions apart
    return found


def _infer(client, images: np.ndarray, version: str = "") -> tuple[str, str, np.ndarray]:
    """(the response's model version, the version its ``answered_by`` output names, the probabilities)."""
    tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("probabilities", ANSWERED_BY_OUTPUT)]
    result = client.infer("braintumor", [tensor], model_version=version, outputs=outputs)
    answered_by = result.as_numpy(ANSWERED_BY_OUTPUT)
    assert answered_by.shape == (len(images), 1) and len(set(answered_by[:, 0])) == 1
    return result.get_response().model_version, str(answered_by[0, 0]), result.as_numpy("probabilities")


def _counts(metrics_url: str) -> dict[str, int]:
    counters = shadow.read_counters(metrics_url)
    return {a: int(counters[f"canary_{a}"]) for a in shadow.ANSWERED_BY}


def _server(repository: Path) -> TritonServer:
    http, grpc, metrics = free_ports(3)
    return TritonServer(ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics))


@pytest.mark.slow  # starts a real Triton
def test_the_candidate_answers_its_share_and_says_so_and_pinned_requests_never_reach_it(
    source, images, expected, tmp_path
):
    from braintumor import TumorClassifier

    spec = shadow.canary_repository(source, CANDIDATE, tmp_path / "repo", SHARE, seed=7)
    assert (spec.primary, spec.router, spec.candidate_version) == (PRIMARY, ROUTER, CANDIDATE)
    answered: dict[str, int] = {"3": 0, "4": 0}
    with _server(tmp_path / "repo") as server:
        server.wait_until_ready(240)
        client = grpcclient.InferenceServerClient(server.config.grpc_url)
        for k in range(REQUESTS):
            image = k % len(images)
            model_version, by, probabilities = _infer(client, images[image : image + 1])
            assert model_version == str(ROUTER) and by in answered
            # the output names the graph that computed this answer
            np.testing.assert_allclose(probabilities[0], expected[by][image], atol=1e-5)
            answered[by] += 1
        counts = _counts(server.config.metrics_url)
        # pinned to the primary: its own instances, never the candidate, not counted
        for k in range(40):
            model_version, by, probabilities = _infer(client, images[k % 8 : k % 8 + 1], version=str(PRIMARY))
            assert (model_version, by) == (str(PRIMARY), str(PRIMARY))
            np.testing.assert_allclose(probabilities[0], expected["3"][k % 8], atol=1e-5)
        assert _counts(server.config.metrics_url) == counts
        # the SDK resolves the latest (the routing version) and reports the version that answered
        sdk = TumorClassifier(server.config.grpc_url)
        versions = [sdk.predict_pixels(images[k % 8 : k % 8 + 1])[0] for k in range(30)]
        for k, prediction in enumerate(versions):
            assert prediction.model_version in answered
            found = [prediction.probabilities[label] for label in LABELS]
            assert found == pytest.approx(list(expected[prediction.model_version][k % 8]), abs=1e-5)
        after = _counts(server.config.metrics_url)
        assert after["candidate"] - counts["candidate"] == sum(p.model_version == "4" for p in versions)
        pinned = TumorClassifier(server.config.grpc_url, model_version=str(PRIMARY))
        assert {pinned.predict_pixels(images[:2])[0].model_version for _ in range(10)} == {"3"}
        report = subprocess.run(
            # no fallback in about 130 requests: the upper bound is near 0.03
            [
                sys.executable,
                "-m",
                "braintumor_serving.shadow",
                "report",
                "--metrics",
                server.config.metrics_url,
                *FALLBACK,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    bound = 4.5 * math.sqrt(REQUESTS * SHARE * (1 - SHARE))  # a false alarm about once in 150,000 runs
    print(f"\ncanary answers {answered}, counters {counts}, bound ±{bound:.0f} around {REQUESTS * SHARE:.0f}")
    assert abs(answered["4"] - REQUESTS * SHARE) <= bound
    assert counts == {"primary": answered["3"], "candidate": answered["4"], "fallback": 0}
    assert f"canary requests {REQUESTS + 30}" in report.stdout and "fallback 0" in report.stdout
    assert report.returncode == 0 and "canary verdict: pass" in report.stdout, report.stdout + report.stderr


@pytest.mark.slow  # starts a real Triton
def test_an_absent_candidate_makes_fallbacks_and_fails_no_request(source, images, expected, tmp_path):
    spec = shadow.canary_repository(source, CANDIDATE, tmp_path / "repo", 0.5, seed=1)
    shutil.rmtree(tmp_path / "repo" / spec.candidate_model)  # never loads: every diverted request fails
    with _server(tmp_path / "repo") as server:
        server.wait_until_ready(240)
        client = grpcclient.InferenceServerClient(server.config.grpc_url)
        for k in range(40):
            model_version, by, probabilities = _infer(client, images[k % 8 : k % 8 + 1])
            assert (model_version, by) == (str(ROUTER), str(PRIMARY))
            np.testing.assert_allclose(probabilities[0], expected["3"][k % 8], atol=1e-5)
        counts = _counts(server.config.metrics_url)
        assert server.is_ready()
    print(f"\ncanary counters with the candidate absent: {counts}")
    assert counts["candidate"] == 0 and counts["primary"] + counts["fallback"] == 40
    assert counts["fallback"] >= 5  # half of them were sent to the candidate (P(fewer than 5) ≈ 1e-7)
    verdict = shadow.summarise_canary({f"canary_{a}": float(n) for a, n in counts.items()})
    assert verdict["verdict"] == "fail"


@pytest.mark.slow  # starts a real Triton
def test_concurrent_requests_of_several_sizes_get_the_answer_of_the_version_named(source, images, expected, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    shadow.canary_repository(source, CANDIDATE, tmp_path / "repo", 0.5, seed=5)
    with _server(tmp_path / "repo") as server:
        server.wait_until_ready(240)

        def send(k: int) -> tuple[int, int]:
            client = grpcclient.InferenceServerClient(server.config.grpc_url)
            start, size = k % 6, 1 + k % 3  # batches of the dynamic batcher mix requests of 1 to 3 images
            _, by, probabilities = _infer(client, images[start : start + size])
            np.testing.assert_allclose(probabilities, expected[by][start : start + size], atol=1e-5)
            return int(by == str(CANDIDATE)), size

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, range(160)))
        counts = _counts(server.config.metrics_url)
    print(f"\ncanary under 8 concurrent callers: {counts}")
    assert counts["candidate"] == sum(c for c, _ in results) and counts["fallback"] == 0
    assert counts["candidate"] + counts["primary"] == 160 and 0 < counts["candidate"] < 160


@pytest.mark.slow  # starts two real Tritons
def test_an_sdk_over_a_canary_and_a_plain_server_asks_answered_by_of_neither(source, images, expected, tmp_path):
    from dataclasses import replace

    from braintumor import TumorClassifier

    shadow.canary_repository(source, CANDIDATE, tmp_path / "canary", 0.5, seed=2)
    with _server(tmp_path / "canary") as canary, _server(source) as plain:
        canary.wait_until_ready(240)
        plain.wait_until_ready(240)
        url = f"{canary.config.grpc_url},{plain.config.grpc_url}"
        client = TumorClassifier(url)
        try:
            # the version both serve, and no answered_by (the plain server would refuse it)
            assert client.model.version == str(PRIMARY) and not client.model.answered_by
            for k in range(16):
                prediction = client.predict_pixels(images[k % 8 : k % 8 + 1])[0]
                assert prediction.model_version == str(PRIMARY)
                found = [prediction.probabilities[label] for label in LABELS]
                assert found == pytest.approx(list(expected["3"][k % 8]), abs=1e-5)
            # a model learned from the canary alone (a leftover): the plain server's refusal drops the output
            client.model = replace(client.model, answered_by=True)
            answered = [client.predict_pixels(images[k % 8 : k % 8 + 1])[0].model_version for k in range(8)]
            assert set(answered) == {str(PRIMARY)} and not client.model.answered_by
        finally:
            client.close()


@pytest.mark.slow  # starts a real Triton
def test_serve_canary_command(images, tmp_path):
    # the committed layout up to version 4 (latest 2 served: 3 and 4): the canary of 4 serves 3 and the router,
    # not 2
    source = copy_repository(tmp_path / "published", keep=(1, 2, 3, 4))
    assert [p.name for p in sorted((source / "braintumor").iterdir()) if p.name.isdigit()] == ["1", "2", "3", "4"]
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "braintumor.cli", "serve", "--repository", str(source)]
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, *ports, "--canary", str(CANDIDATE), "--canary-share", "0.5"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while "Triton is ready" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        assert f"Canary: requests that name no version reach routing version {ROUTER}" in text
        assert f"braintumor (versions {PRIMARY}, {ROUTER}), braintumor_candidate (versions {CANDIDATE})" in text
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        answers = {_infer(client, images[:1])[1] for _ in range(20)}
        assert answers <= {"3", "4"} and answers
        assert sum(_counts(f"http://127.0.0.1:{metrics}/metrics").values()) == 20
    finally:
        process.terminate()
        process.wait(60)
    assert not (source / "braintumor" / str(ROUTER)).exists()  # the committed-style source is untouched


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--canary", "4", "--canary-share", "0"], "between 0 and 1"),
        (["--canary", "4", "--canary-share", "1"], "between 0 and 1"),
        (["--canary", "4", "--canary-share", "-0.2"], "between 0 and 1"),
        (["--canary", "4", "--canary-share", "nan"], "between 0 and 1"),
        (["--canary", "4", "--canary-share", "five"], "must be a number"),
        (["--canary", "4"], "go together"),
        (["--canary-share", "0.1"], "go together"),
        (["--canary", "4", "--canary-share", "0.1", "--shadow", "4"], "cannot be combined"),
        (["--canary", "7", "--canary-share", "0.1"], "version 7 of braintumor is not in"),
        (["--canary", "3", "--canary-share", "0.1"], "has no version besides 3"),
    ],
)
def test_serve_canary_refuses_in_one_line(arguments, message, tmp_path, capsys):
    source = copy_repository(tmp_path / "source", keep=(3,))  # one version: --canary 3 leaves nothing to serve
    shutil.copytree(source / "braintumor" / "3", source / "braintumor" / "4")
    if "3" in arguments:
        shutil.rmtree(source / "braintumor" / "4")
    assert cli.main(["serve", "--repository", str(source), *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error


def test_canary_repository_adds_a_routing_version_and_keeps_the_source(source, tmp_path):
    before = (source / "braintumor" / "configs" / "cpu.pbtxt").read_text()
    spec = shadow.canary_repository(source, CANDIDATE, tmp_path / "repo", 0.25, seed=3)
    assert spec == shadow.CanarySpec(PRIMARY, ROUTER, "braintumor_candidate", CANDIDATE, 0.25, 3)
    ours = tmp_path / "repo" / "braintumor"
    assert sorted(int(p.name) for p in ours.iterdir() if p.name.isdigit()) == [PRIMARY, ROUTER]
    assert (ours / str(ROUTER) / "model.onnx").read_bytes() == (ours / str(PRIMARY) / "model.onnx").read_bytes()
    config = (ours / "configs" / "cpu.pbtxt").read_text()
    assert f"version_policy: {{ specific: {{ versions: [ {PRIMARY}, {ROUTER} ] }} }}" in config
    assert "num_versions" not in config
    line = next(x for x in config.splitlines() if f'"{PREPROCESSING_PARAMETER}{PRIMARY}"' in x)
    assert line.replace(f"/{PRIMARY}", f"/{ROUTER}") in config  # the routing version's preprocessing
    assert (source / "braintumor" / "configs" / "cpu.pbtxt").read_text() == before
    assert not (tmp_path / "repo" / "braintumor" / str(CANDIDATE)).exists()
    assert (tmp_path / "repo" / "braintumor_candidate" / str(CANDIDATE) / "model.onnx").exists()
    with pytest.raises(shadow.CanaryError, match="between 0 and 1"):
        shadow.canary_repository(source, CANDIDATE, tmp_path / "other", 1.5)


def test_canary_spec_json_and_version_policies():
    spec = shadow.CanarySpec(3, 5, "braintumor_candidate", 4, 0.1)
    assert shadow.CanarySpec.from_json(spec.to_json()) == spec
    for text in ("[]", "{}", '{"primary": 3}', spec.to_json().replace("0.1", "2"), "not json"):
        with pytest.raises(shadow.CanaryError, match="invalid canary parameter"):
            shadow.CanarySpec.from_json(text)
    published = [1, 2, 3, 4]
    assert shadow.served_versions('name: "m"\n', published) == [4]  # Triton's default: the latest
    assert shadow.served_versions("version_policy: { latest: { num_versions: 2 } }\n", published) == [3, 4]
    assert shadow.served_versions("version_policy: { specific: { versions: [1, 3, 7] } }", published) == [1, 3]
    assert shadow.served_versions("version_policy: { all: {} }", published) == published
    written = shadow._serve_exactly('name: "m"\nversion_policy: { latest: { num_versions: 2 } }\nx: 1\n', [3, 9])
    assert written == 'name: "m"\nversion_policy: { specific: { versions: [ 3, 9 ] } }\nx: 1\n'


def test_shadow_and_canary_serve_what_was_served_but_the_candidate(tmp_path):
    source = copy_repository(tmp_path / "published", keep=(1, 2, 3, 4))  # latest 2: 3 and 4 served
    shadow.shadow_repository(source, 4, tmp_path / "shadow")
    shadow.canary_repository(source, 4, tmp_path / "canary", 0.1)
    shadow.shadow_repository(source, 2, tmp_path / "old")  # an unserved candidate: nothing changes
    for folder, served in (("shadow", [3]), ("canary", [3, ROUTER]), ("old", [3, 4])):
        config = (tmp_path / folder / "braintumor" / "configs" / "cpu.pbtxt").read_text()
        listed = [int(p.name) for p in (tmp_path / folder / "braintumor").iterdir() if p.name.isdigit()]
        assert shadow.served_versions(config, listed) == served, folder


def test_export_never_publishes_a_routing_version(tmp_path):
    model_dir = tmp_path / "braintumor"
    (model_dir / "4").mkdir(parents=True)
    assert next_version(model_dir) == 5
    (model_dir / str(ROUTER)).mkdir()  # a routing version left in a repository: still not a published number
    assert next_version(model_dir) == 5
    (model_dir / str(ROUTING_VERSION_BASE - 1)).mkdir()
    with pytest.raises(ValueError, match="reserved"):
        next_version(model_dir)


def test_canary_report_verdict():
    counters = {"canary_primary": 9500.0, "canary_candidate": 500.0, "canary_fallback": 0.0}
    passing = shadow.summarise_canary(counters)
    assert passing["verdict"] == "pass" and passing["candidate_share"]["asked"] == 0.05
    assert shadow.summarise_canary({**counters, "canary_fallback": 50.0})["verdict"] == "fail"
    assert shadow.summarise_canary({**counters, "canary_candidate": 50.0})["verdict"] == "undecided"  # too few
    assert "fallback 0" in shadow.format_canary(passing)
