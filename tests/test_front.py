"""One request must not take the server down (issue 17), on the real embedded Triton server.

Triton 2.51's HTTP server aborts on an inference request whose JSON declares a tensor beyond memory. Here:
that request and others declaring shapes far beyond memory, on every input path (HTTP JSON, HTTP binary
extension, gRPC typed contents, gRPC raw contents), are refused with a 4xx or INVALID_ARGUMENT, and the
server is still ready and answers correctly after them; the HTTP front refuses malformed requests with 400
and a JSON error; and a bounded protocol fuzz of both endpoints leaves the server serving correct answers.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

import numpy as np
import pytest

from synthetic import random_slice

ort = pytest.importorskip("onnxruntime")
grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from braintumor.config import CHANNELS, IMAGE_SIZE, INPUT_NAME, MAX_BATCH_SIZE, MODEL_NAME, OUTPUT_NAME
from braintumor.preprocessing import preprocess_batch
from braintumor_serving.front import (
    FRONT_KEY_HEADER,
    ModelSpec,
    RequestError,
    TensorSpec,
    check_inference_request,
    parse_inference_body,
)

pytestmark = pytest.mark.slow

INFER = f"/v2/models/{MODEL_NAME}/infer"
#: The request from issue 17: it made tritonserver abort.
ISSUE_17 = {"inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [1, 100000, 100000, 3], "data": [0]}]}
#: Declared shapes far beyond memory: (datatype, shape). 2**62 is near the int64 limit of the gRPC protocol.
BEYOND_MEMORY = [
    ("UINT8", [1, 100000, 100000, 3]),
    ("FP64", [1, 100000, 100000, 3]),
    ("UINT8", [2**40, IMAGE_SIZE, IMAGE_SIZE, CHANNELS]),
    ("INT64", [1, 2**31, 2**31, CHANNELS]),
    ("UINT8", [2**62, 4, IMAGE_SIZE, CHANNELS]),
]
#: Bounded for CI; BRAINTUMOR_FUZZ_EXAMPLES=5000 runs a longer campaign.
EXAMPLES = int(os.environ.get("BRAINTUMOR_FUZZ_EXAMPLES", "100"))
BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=5000,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def server(triton):
    return triton


@pytest.fixture(scope="module")
def reference(server):
    """Two images, and the latest served version's answers for them from in-process ONNX Runtime."""
    rng = np.random.default_rng(17)
    pixels = preprocess_batch([random_slice(rng, 224, k) for k in range(2)])
    latest = max(server.models[MODEL_NAME])
    session = ort.InferenceSession(str(server.config.repository / MODEL_NAME / str(latest) / "model.onnx"))
    return pixels, session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def assert_still_serving(server, reference) -> None:
    """Triton runs, is ready, and answers a correct request correctly over gRPC and over HTTP (the front)."""
    pixels, expected = reference
    assert server.process.poll() is None, f"tritonserver exited ({server.process.returncode}):\n{server.errors()}"
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    assert client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    inp = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    assert np.abs(client.infer(MODEL_NAME, [inp]).as_numpy(OUTPUT_NAME) - expected).max() <= 1e-5
    http_client = httpclient.InferenceServerClient(server.config.http_url)
    assert http_client.is_server_ready()
    inp = httpclient.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=True)
    assert np.abs(http_client.infer(MODEL_NAME, [inp]).as_numpy(OUTPUT_NAME) - expected).max() <= 1e-5


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST and return the status and the JSON answer (for errors too)."""
    request = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def binary_request(datatype: str, shape: list[int], payload: bytes) -> tuple[bytes, dict[str, str]]:
    """A request body and headers for the binary-data extension."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


def grpc_request(datatype: str, shape: list[int], raw: bool) -> service_pb2.ModelInferRequest:
    """A gRPC request with one element of data, as typed contents or as raw contents."""
    request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    tensor = request.inputs.add(name=INPUT_NAME, datatype=datatype, shape=shape)
    if raw:
        request.raw_input_contents.append(b"\0" * 8)
    elif datatype == "FP64":
        tensor.contents.fp64_contents.append(0.0)
    elif datatype == "INT64":
        tensor.contents.int64_contents.append(0)
    else:
        tensor.contents.uint_contents.append(0)
    return request


def grpc_stub(server) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.config.grpc_url))


def test_the_issue_17_request_is_refused_and_the_server_keeps_serving(server, reference):
    status, answer = post(server.config.http_url, INFER, json.dumps(ISSUE_17).encode())
    assert status == 400 and "shape [1, 100000, 100000, 3]" in answer["error"], answer
    assert_still_serving(server, reference)


@pytest.mark.parametrize("path", ["http-json", "http-binary", "grpc-typed", "grpc-raw"])
def test_shapes_beyond_memory_are_refused_on_every_input_path(server, reference, path):
    for datatype, shape in BEYOND_MEMORY:
        if path == "http-json":
            status, answer = post(
                server.config.http_url,
                INFER,
                json.dumps(
                    {"inputs": [{"name": INPUT_NAME, "datatype": datatype, "shape": shape, "data": [0]}]}
                ).encode(),
            )
            assert 400 <= status < 500 and answer["error"], (shape, answer)
        elif path == "http-binary":
            status, answer = post(server.config.http_url, INFER, *binary_request(datatype, shape, b"\0" * 8))
            assert 400 <= status < 500 and answer["error"], (shape, answer)
        else:
            with pytest.raises(grpc.RpcError) as refused:
                grpc_stub(server).ModelInfer(grpc_request(datatype, shape, raw=path == "grpc-raw"), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, refused.value.details())
        assert server.process.poll() is None, f"{path} {datatype} {shape} killed tritonserver:\n{server.errors()}"
    assert_still_serving(server, reference)


def test_triton_itself_refuses_inference_that_did_not_pass_the_front(server, reference):
    """Triton's own HTTP port is on loopback and answers inference only with the front's key; a key that a
    caller sends is replaced by the front's (a valid request with a forged key is served), and the same
    forged key sent straight to Triton's port is refused."""
    pixels, _ = reference
    valid, headers = binary_request("UINT8", list(pixels.shape), pixels.tobytes())
    status, answer = post(server.local_http_url, INFER, json.dumps(ISSUE_17).encode())
    assert status == 403 and FRONT_KEY_HEADER in answer["error"]
    forged = {**headers, FRONT_KEY_HEADER: "guess"}
    status, answer = post(server.local_http_url, INFER, valid, forged)
    assert status == 403 and FRONT_KEY_HEADER in answer["error"], answer
    status, answer = post(server.config.http_url, INFER, valid, forged)
    assert status == 200 and answer["outputs"][0]["name"] == OUTPUT_NAME, answer
    status, answer = post(server.config.http_url, INFER, valid, headers)
    assert status == 200 and answer["outputs"][0]["name"] == OUTPUT_NAME
    assert_still_serving(server, reference)


def _image_json(shape: list[int], data: object, datatype: str = "UINT8", **extra: object) -> bytes:
    return json.dumps(
        {"inputs": [{"name": INPUT_NAME, "datatype": datatype, "shape": shape, "data": data}], **extra}
    ).encode()


ONE = [1, IMAGE_SIZE, IMAGE_SIZE, CHANNELS]
ONE_ELEMENTS = IMAGE_SIZE * IMAGE_SIZE * CHANNELS


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (_image_json([1, 100, 100, 3], [0] * 30000), {}, "does not match the model's"),  # Triton said 500
        (_image_json(ONE, [0.5] * ONE_ELEMENTS, "FP32"), {}, "datatype must be UINT8"),
        (_image_json([MAX_BATCH_SIZE + 1, *ONE[1:]], [0]), {}, "batch size 33"),
        (_image_json(ONE, [0] * 10), {}, f"holds {ONE_ELEMENTS} elements but 'data' has 10"),
        (_image_json(ONE, [256] * ONE_ELEMENTS), {}, "integers from 0 to 255"),
        (_image_json(ONE, ["a"] * ONE_ELEMENTS), {}, "integers from 0 to 255"),
        (_image_json(ONE, [0] * ONE_ELEMENTS, outputs=[{"name": "nope"}]), {}, "no output 'nope'"),
        (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [0]}]}', {}, "no input 'pixels'"),
        (b'{"inputs": []}', {}, "non-empty list 'inputs'"),
        (b"{not json", {}, "cannot be parsed"),
        (b"[" * 100000 + b"]" * 100000, {}, "cannot be parsed"),
        (*binary_request("UINT8", ONE, b"\0" * 10), "takes 76800 bytes, but binary_data_size is 10"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "outside the body"),
        (b"{}", {"Inference-Header-Content-Length": "-1"}, "bad Inference-Header-Content-Length"),
        (gzip.compress(b"{}")[:-9], {"Content-Encoding": "gzip"}, "it is incomplete"),
        (b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"}, "cannot be decompressed"),
        (b"{}", {"Content-Encoding": "br"}, "Content-Encoding 'br' is not supported"),
    ],
)
def test_malformed_http_inference_gets_400_and_a_clear_json_error(server, reference, body, headers, message):
    status, answer = post(server.config.http_url, INFER, body, headers)
    assert status == (415 if "br" in headers.values() else 400), answer
    assert message in answer["error"], answer
    assert server.process.poll() is None


def _exchange(server, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to the HTTP front and read until it closes the connection."""
    host, port = server.config.http_url.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return received


def _status(answer: bytes) -> int:
    """The final status of the (first) answer in raw bytes, past any interim 1xx answer (``100 Continue``);
    0 when there is none (the connection was dropped without one)."""
    while found := re.match(rb"HTTP/1\.1 (\d{3}) ", answer):
        status = int(found.group(1))
        if status >= 200:
            return status
        answer = answer.partition(b"\r\n\r\n")[2]  # an interim answer: the final one follows
    return 0


def test_status_reads_the_final_answer():
    assert _status(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\nA: b\r\n\r\n{}") == 400
    assert _status(b"HTTP/1.1 100 Continue\r\n\r\n") == 0
    assert _status(b"") == 0


def test_the_front_bounds_bodies_and_heads_and_speaks_http_1_1(server, reference):
    pixels, expected = reference
    limit_case = _exchange(server, f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n".encode())
    assert _status(limit_case) == 413 and b"exceeds" in limit_case
    assert _status(_exchange(server, b"GET /v2 HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n")) == 431
    smuggle = f"POST {INFER} HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _status(_exchange(server, smuggle.encode())) == 400
    assert _status(_exchange(server, b"GARBAGE\r\n\r\n")) == 400
    assert _status(_exchange(server, b"GET /v2 HTTP/1.1\r\nX: a\nContent-Length: 5\r\n\r\n")) == 400
    assert _status(_exchange(server, f"GET {INFER} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())) == 405
    generate = f"POST /v2/models/{MODEL_NAME}/generate HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    assert _status(_exchange(server, generate.encode())) == 404
    for header in ("Content-Length", "Inference-Header-Content-Length"):  # '²'.isdigit() is True; int() refuses
        for value in ("\u00b2\u00b3\u00b9", "\u00b9", "1" * 19, "+5", " "):
            raw = f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{header}: {value}\r\nConnection: close\r\n\r\n"
            answer = _exchange(server, raw.encode("latin-1"))  # the front reads heads as latin-1: '²' arrives
            assert _status(answer) == 400 and b"bad " in answer, (header, value, answer[:200])

    body, headers = binary_request("UINT8", list(pixels.shape), pixels.tobytes())
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    chunked = f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{head}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 50000]), body[i : i + 50000]) for i in range(0, len(body), 50000)
    )
    assert _status(_exchange(server, chunked.encode() + chunks + b"0\r\n\r\n")) == 200

    host, port = server.config.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # Expect: 100-continue, as curl sends
        expect = f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
        sock.sendall(expect.encode() + b"\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        answer = json.loads(response.read())
    got = np.array(answer["outputs"][0]["data"], np.float32).reshape(expected.shape)
    assert np.abs(got - expected).max() <= 1e-5

    connection = http.client.HTTPConnection(host, int(port), timeout=10)  # keep-alive: one connection
    for _ in range(3):
        connection.request("POST", INFER, body=_image_json([1, 100, 100, 3], [0]))
        refused = connection.getresponse()
        assert refused.status == 400 and refused.read()
        connection.request("POST", INFER, body=body, headers=headers)
        served = connection.getresponse()
        assert served.status == 200 and json.loads(served.read())["outputs"]
        connection.request("GET", "/v2/health/ready")
        ready = connection.getresponse()
        assert ready.status == 200 and ready.read() == b""
        sock = connection.sock
    assert connection.sock is sock  # no reconnection was needed
    connection.close()

    json_client = httpclient.InferenceServerClient(server.config.http_url)
    inp = httpclient.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=False)
    for compression in (None, "gzip", "deflate"):
        got = json_client.infer(MODEL_NAME, [inp], request_compression_algorithm=compression).as_numpy(OUTPUT_NAME)
        assert np.abs(got - expected).max() <= 1e-5
    assert_still_serving(server, reference)


def test_versions_in_paths_are_numbers_and_the_fronts_cache_stays_small(server, reference):
    """``/versions/01`` and ``/versions/0001`` are version 1 (one cache entry); a version that is not 1 to 18
    ASCII digits is refused with 400; the cache of model configurations never holds more than 64."""
    from braintumor_serving.front import SPEC_CACHE

    pixels, _ = reference
    body, headers = binary_request("UINT8", list(pixels[:1].shape), pixels[:1].tobytes())
    for zeros in range(0, 40):
        status, answer = post(
            server.config.http_url, INFER.replace("/infer", f"/versions/{'0' * zeros}1/infer"), body, headers
        )
        assert status == (200 if zeros <= 17 else 400), (zeros, answer)
    for version in ("x", "-1", "\u00b9", "1.0", "1" * 19):
        path = urllib.parse.quote(INFER.replace("/infer", f"/versions/{version}/infer"))
        status, answer = post(server.config.http_url, path, body, headers)
        assert status == 400 and "version must be a number" in answer["error"], (version, answer)
    specs = server._front._specs
    assert len(specs) <= SPEC_CACHE and sum(model == MODEL_NAME and v == "1" for model, v in specs) == 1, specs
    assert_still_serving(server, reference)


def test_the_fronts_model_spec_is_the_served_configuration(server):
    with urllib.request.urlopen(f"http://{server.config.http_url}/v2/models/{MODEL_NAME}/config", timeout=5) as r:
        spec = ModelSpec.from_config(json.loads(r.read()))
    assert spec.max_batch_size == MAX_BATCH_SIZE
    (image,) = spec.inputs
    assert (image.name, image.datatype, image.dims) == (INPUT_NAME, "UINT8", (IMAGE_SIZE, IMAGE_SIZE, CHANNELS))
    assert spec.body_limit(True, 2**40) == MAX_BATCH_SIZE * IMAGE_SIZE * IMAGE_SIZE * CHANNELS + 64 * 1024
    check_inference_request(spec, json.loads(_image_json(ONE, [0] * ONE_ELEMENTS)), None)


def test_json_limits_admit_the_largest_real_request_and_refuse_empty_lists_before_parsing():
    """The body and container limits fit the widest compact JSON of a full batch, nested or flat; a body of
    empty lists (3 bytes each, ~60 bytes each once parsed) is refused by counting, before json.loads."""
    spec = ModelSpec("m", 4, (TensorSpec("x", "UINT8", (5, 6, 3)),))
    nested = np.full((4, 5, 6, 3), 255, np.uint8).tolist()
    for data in (nested, np.asarray(nested).ravel().tolist()):
        body = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [4, 5, 6, 3], "data": data}]})
        assert len(body) <= spec.body_limit(False, 2**40) - 64 * 1024 + 100
        parse_inference_body(spec, body.encode(), None)
    head = b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [4, 5, 6, 3], "data": ['
    empty = head + b"[]," * 2000 + b"[]]}]}"
    with pytest.raises(RequestError, match="lists and objects") as refused:
        parse_inference_body(spec, empty, None)
    assert refused.value.status == 400
    assert spec.body_limit(False, 2**40) < 8 * 4 * 5 * 6 * 3 + 64 * 1024  # UINT8: 5 bytes an element, not 24


def _empty_lists_body(count: int) -> bytes:
    head = json.dumps({"name": INPUT_NAME, "datatype": "UINT8", "shape": ONE})[:-1].encode()
    return b'{"inputs": [' + head + b', "data": [' + b"[]," * count + b"[]]}]}"


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_a_body_of_empty_lists_is_refused_quickly_and_the_server_stays_ready(server, reference, compressed):
    """Two million empty lists (6 MB, 60 KB gzipped) would take ~130 MB per parse and hold the GIL for
    seconds; the front counts the brackets first and refuses it."""
    body, headers = _empty_lists_body(2_000_000), {}
    if compressed:
        body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
    started = time.monotonic()
    status, answer = post(server.config.http_url, INFER, body, headers)
    took = time.monotonic() - started
    assert status in (400, 413) and "lists and objects" in answer["error"], answer
    assert took < 10, f"refusing took {took:.1f} s"
    with urllib.request.urlopen(f"http://{server.config.http_url}/v2/health/ready", timeout=5) as ready:
        assert ready.status == 200
    assert_still_serving(server, reference)


# -- bounded protocol fuzz ---------------------------------------------------------------------------------

_DATATYPES = ["UINT8", "INT8", "FP32", "FP64", "INT64", "BYTES", "BOOL", "FP16", "", "uint8", "NOPE"]
_dims = st.one_of(
    st.integers(0, 200), st.sampled_from([IMAGE_SIZE, CHANNELS, 2**31, 2**62, 2**63 - 1]), st.integers(-(2**63), -1)
)
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
_parameters = st.dictionaries(
    st.sampled_from(["binary_data_size", "shared_memory_region", "shared_memory_byte_size", "binary_data", "x"]),
    st.one_of(st.integers(-(2**64), 2**64), st.text(max_size=6), st.booleans()),
    max_size=2,
)
_inputs = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just(INPUT_NAME), st.text(max_size=6)),
        "datatype": st.sampled_from(_DATATYPES),
        "shape": st.one_of(st.lists(_dims, max_size=6), _json_values),
    },
    optional={"data": _json_values, "parameters": _parameters},
)
_outputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from([OUTPUT_NAME, "heatmap", "x"])},
        optional={"parameters": st.dictionaries(st.sampled_from(["classification", "binary_data"]), _json_scalars)},
    ),
    max_size=2,
)
_requests = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(_inputs, max_size=3)}, optional={"outputs": _outputs}),
    _json_values,
)
_paths = st.one_of(
    st.just(INFER),
    st.sampled_from(
        [
            f"/v2/models/{MODEL_NAME}/versions/1/infer",
            f"/v2/models/{MODEL_NAME}/versions/99/infer",
            "/v2/models/nosuch/infer",
            f"/v2/models/{MODEL_NAME}/generate",
            f"/v2/models/{MODEL_NAME}/generate_stream",
            f"/v2/models/{MODEL_NAME}/config",
            "/v2/health/ready",
            "/v2/repository/index",
            f"/v2/models/{MODEL_NAME}/infer?x=1",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda s: "/" + s),
)
_headers = st.dictionaries(
    st.sampled_from(["Inference-Header-Content-Length", "Content-Encoding", "Expect", "X-Any", FRONT_KEY_HEADER]),
    st.one_of(st.integers(-5, 10**6).map(str), st.sampled_from(["gzip", "deflate", "100-continue", "chunked"])),
    max_size=3,
)


def _valid_binary_request(pixels: np.ndarray) -> bytes:
    body, _ = binary_request("UINT8", list(pixels.shape), pixels.tobytes())
    return body


@BOUNDED
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "HEAD", "DELETE", "P\x00ST"]),
    path=_paths,
    request=_requests,
    headers=_headers,
    mode=st.sampled_from(["json", "binary", "mutated", "bytes", "chunked", "short", "valid"]),
    noise=st.binary(max_size=64),
    data=st.data(),
)
def test_http_protocol_fuzz_leaves_the_server_serving(
    server, reference, method, path, request, headers, mode, noise, data
):
    pixels, _ = reference
    body = json.dumps(request).encode()
    if mode == "binary":  # a fuzzed JSON header in front of real image bytes
        headers["Inference-Header-Content-Length"] = str(len(body))
        body += pixels[:1].tobytes()
    elif mode == "mutated":  # a real binary request with a few bytes of its JSON header changed
        body = bytearray(_valid_binary_request(pixels[:1]))
        length = body.index(b"}]}") + 3
        headers["Inference-Header-Content-Length"] = str(length)
        for _ in range(data.draw(st.integers(1, 4))):
            body[data.draw(st.integers(0, length - 1))] = data.draw(st.integers(0, 255))
        body = bytes(body)
    elif mode == "bytes":
        body = noise
    elif mode == "valid":  # a real request, with only the fuzzed headers around it: it reaches Triton
        method, path = "POST", INFER
        body = _valid_binary_request(pixels[:1])
        headers["Inference-Header-Content-Length"] = str(body.index(b"}]}") + 3)
    if headers.get("Content-Encoding") in ("gzip", "deflate") and data.draw(st.booleans()):
        body = gzip.compress(body)
    framing = (
        "Transfer-Encoding: chunked\r\n"
        if mode == "chunked"
        else f"Content-Length: {len(body) // (2 if mode == 'short' else 1)}\r\n"
    )
    if mode == "chunked":
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "Expect" or mode != "short")
    head = f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\n{extra}{framing}Connection: close\r\n\r\n"
    answer = _exchange(server, head.encode("latin-1", "replace") + body)
    assert server.process.poll() is None, f"{head!r} {body[:300]!r} killed tritonserver:\n{server.errors()}"
    status = _status(answer)
    STATUSES[status] += 1
    if mode != "short":  # only a body shorter than its framing may end with the connection dropped unanswered
        assert status != 0, f"no answer to {head!r} {body[:300]!r}"
    assert status < 500, answer[:300]  # a refusal is the caller's fault (4xx), never a server error


STATUSES: Counter[int] = Counter()


def test_http_fuzz_left_the_server_serving(server, reference):
    """After the fuzz above: still ready and correct (and it reached Triton as well as the front's checks)."""
    print(f"\nHTTP fuzz statuses: {dict(sorted(STATUSES.items()))}")
    if STATUSES:  # the fuzz ran in this session (not deselected)
        assert STATUSES[200] > 0, f"no fuzzed request reached Triton and was served: {dict(STATUSES)}"
    assert_still_serving(server, reference)


_tensors = st.builds(
    lambda name, datatype, shape, kind, values: (name, datatype, shape, kind, values),
    st.one_of(st.just(INPUT_NAME), st.text(max_size=6)),
    st.sampled_from(_DATATYPES),
    st.lists(_dims, max_size=6),
    st.sampled_from(["uint", "int", "int64", "fp32", "fp64", "bytes", "bool", "raw", "none"]),
    st.lists(st.integers(0, 255), max_size=16),
)


@BOUNDED
@given(
    model=st.sampled_from([MODEL_NAME, MODEL_NAME, "nosuch", ""]),
    version=st.sampled_from(["", "1", "2", "99", "x"]),
    tensors=st.lists(_tensors, max_size=3),
    raw=st.lists(st.binary(max_size=64), max_size=3),
    class_count=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    garbage=st.one_of(st.none(), st.binary(max_size=128)),
)
def test_grpc_protocol_fuzz_leaves_the_server_serving(server, model, version, tensors, raw, class_count, garbage):
    channel = grpc.insecure_channel(server.config.grpc_url)
    try:
        if garbage is not None:  # bytes that may not even be a ModelInferRequest
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with contextlib.suppress(grpc.RpcError):
                call(garbage, timeout=10)
        else:
            request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
            for name, datatype, shape, kind, values in tensors:
                tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
                contents = {
                    "uint": tensor.contents.uint_contents,
                    "int": tensor.contents.int_contents,
                    "int64": tensor.contents.int64_contents,
                    "fp32": tensor.contents.fp32_contents,
                    "fp64": tensor.contents.fp64_contents,
                    "bool": tensor.contents.bool_contents,
                }.get(kind)
                if contents is not None:
                    contents.extend([bool(v) for v in values] if kind == "bool" else values)
                elif kind == "bytes":
                    tensor.contents.bytes_contents.extend(bytes([v]) for v in values)
            request.raw_input_contents.extend(raw)
            if class_count is not None:
                output = request.outputs.add(name=OUTPUT_NAME)
                output.parameters["classification"].int64_param = class_count
            with contextlib.suppress(grpc.RpcError):  # refusals are expected; the server must survive them
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    finally:
        channel.close()
    assert server.process.poll() is None, f"{model} {version} {tensors} killed tritonserver:\n{server.errors()}"


def test_grpc_fuzz_left_the_server_serving(server, reference):
    assert_still_serving(server, reference)
