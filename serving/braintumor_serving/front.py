"""The public HTTP endpoint of ``braintumor serve``: a small front that checks inference requests before
Triton's HTTP server sees them.

Triton 2.51's HTTP server allocates the bytes that an inference request's JSON *declares* before it checks
them against the model: one request declaring ``[1, 100000, 100000, 3]`` makes ``tritonserver`` abort.
So Triton's HTTP server listens on a loopback port, with its inference API restricted to a key that only
this front knows, and the front serves the public port (plain HTTP, or TLS and mutual TLS, which Triton's
HTTP server lacks). It relays every request, and checks each inference request first: the names,
datatypes and shapes of its inputs against the model's configuration (read from Triton), and its data
against those shapes, on the JSON path and on the binary-data extension path
(``Inference-Header-Content-Length``). A request that fails gets a 4xx status and ``{"error": "..."}``
and never reaches Triton; only requests that pass carry the key.

It runs an asyncio loop in a background thread of the serve process, so it lives and dies with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import math
import re
import secrets
import ssl
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The header carrying the front's key to Triton, which restricts HTTP inference to it.
FRONT_KEY_HEADER = "braintumor-front-key"
#: Triton's inference routes (its ``generate`` extensions are not offered: they bypass the checks below).
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/(infer|generate|generate_stream)")
#: The readiness paths (the server's and a model's), which a draining front answers 503 itself.
READY_PATH = re.compile(r"/v2/health/ready|/v2/models/[^/]+(?:/versions/[^/]+)?/ready")
#: Bytes per element of each fixed-size datatype (``BYTES`` elements are length-prefixed strings).
DATATYPE_SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
}
#: The most text one element takes in compact JSON (``json.dumps``' separators): its widest value and ", ".
#: A JSON body may hold at most this per element, plus the lists that nest them (see :meth:`ModelSpec.body_limit`).
JSON_BYTES_PER_ELEMENT = {
    "BOOL": len("false, "),
    "UINT8": len("255, "),
    "INT8": len("-128, "),
    "UINT16": len("65535, "),
    "INT16": len("-32768, "),
    "UINT32": len("4294967295, "),
    "INT32": len("-2147483648, "),
    "UINT64": len("18446744073709551615, "),
    "INT64": len("-9223372036854775808, "),
    **{name: len("-2.2250738585072014e-308, ") for name in ("FP16", "BF16", "FP32", "FP64")},
}
#: Lists and objects a request may hold beyond those that nest its data (``inputs``, ``parameters``, ...).
JSON_EXTRA_CONTAINERS = 64
_INTEGER_RANGES = {
    name: (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if name.startswith("INT") else (0, (1 << 8 * size) - 1)
    for name, size in DATATYPE_SIZES.items()
    if "INT" in name
}
#: Model configurations the front keeps (per model and version).
SPEC_CACHE = 64
#: Headers that belong to one connection and are not relayed (RFC 9110 §7.6.1).
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A length header's value: ASCII digits only (``str.isdigit`` takes '²', which ``int`` refuses).
_LENGTH = re.compile(r"[0-9]{1,18}")
#: A model version in a request path: Triton reads it as a 64-bit integer.
_VERSION = re.compile(r"[0-9]{1,18}")


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``client_ca``, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class RequestError(Exception):
    """A request the front refuses, with its HTTP status and a message for the caller.

    Args:
        status: the HTTP status (4xx, or 502/503 when Triton cannot be reached or the front is full).
        message: what is wrong, for the ``{"error": ...}`` body.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class TensorSpec:
    """One input of a model, as its configuration declares it.

    Args:
        name: the input's name.
        datatype: its datatype in the inference protocol's spelling (``UINT8``, ``FP32``, ``BYTES``, ...).
        dims: its shape without the batch dimension; ``-1`` is a dimension of any size.
        optional: whether a request may leave it out.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """What a model accepts: the part of its Triton configuration that the front checks requests against.

    Args:
        name: the model's name.
        max_batch_size: the largest batch (0: the model takes no batch dimension).
        inputs: its inputs.
        outputs: the names of its outputs.
    """

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Build from a model configuration in Triton's JSON form (``GET /v2/models/<name>/config``)."""

        def datatype(entry: dict[str, Any]) -> str:
            name = str(entry.get("data_type", "")).removeprefix("TYPE_")
            return "BYTES" if name == "STRING" else name

        inputs = tuple(
            TensorSpec(
                name=str(entry["name"]),
                datatype=datatype(entry),
                dims=tuple(int(d) for d in entry.get("dims", [])),
                optional=bool(entry.get("optional", False)),
            )
            for entry in config.get("input", [])
        )
        outputs = tuple(str(entry["name"]) for entry in config.get("output", []))
        return cls(str(config["name"]), int(config.get("max_batch_size", 0)), inputs, outputs)

    def max_elements(self, tensor: TensorSpec) -> int | None:
        """The most elements one request may send for ``tensor``; ``None`` when a dimension is variable."""
        if any(d < 0 for d in tensor.dims):
            return None
        return max(self.max_batch_size, 1) * math.prod(tensor.dims)

    def max_lists(self, tensor: TensorSpec) -> int | None:
        """The most JSON lists one request's ``data`` for ``tensor`` needs: fully nested, one list per
        element of each dimension but the last, and the outer one; ``None`` when a dimension is variable."""
        if any(d < 0 for d in tensor.dims):
            return None
        shape = ([max(self.max_batch_size, 1)] if self.max_batch_size > 0 else []) + list(tensor.dims)
        return sum(math.prod(shape[:k]) for k in range(len(shape)))

    def json_container_limit(self) -> int | None:
        """The most ``[`` and ``{`` a JSON request (or JSON header) may hold; ``None`` when unbounded.

        Counted before the JSON is parsed: ``json.loads`` makes a Python list of about 60 bytes from the
        3 bytes ``[],``, so a body of empty lists would cost twenty times its size in memory.
        """
        total = JSON_EXTRA_CONTAINERS
        for tensor in self.inputs:
            lists = self.max_lists(tensor)
            if lists is None:
                return None
            total += lists
        return total

    def body_limit(self, binary: bool, cap: int) -> int:
        """The largest request body worth reading for this model, at most ``cap``.

        A binary-data request holds each input's raw bytes and a small JSON header; a JSON request writes
        every element as compact text, at most :data:`JSON_BYTES_PER_ELEMENT` bytes each for its datatype,
        and the lists that nest them (``"[", "]", ", "``: 4 bytes each).
        """
        total = 64 * 1024  # the JSON around the data
        for tensor in self.inputs:
            elements = self.max_elements(tensor)
            size = DATATYPE_SIZES.get(tensor.datatype)
            if elements is None or size is None:
                return cap
            if binary:
                total += elements * size
            else:
                total += elements * JSON_BYTES_PER_ELEMENT[tensor.datatype] + 4 * (self.max_lists(tensor) or 0)
        return min(total, cap)


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is a subclass of int, and not an integer here


def _flatten(data: object) -> list[Any]:
    """The leaves of nested JSON lists, in order, in time linear in the number of lists and leaves."""
    if not isinstance(data, list):
        return [data]
    flat = data
    while flat and all(isinstance(item, list) for item in flat):  # evenly nested: one level at a time
        flat = [leaf for item in flat for leaf in item]
    if not any(isinstance(item, list) for item in flat):
        return flat
    leaves: list[Any] = []
    stack = [iter(flat)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            leaves.append(item)
        else:
            stack.pop()
    return leaves


def _check_values(name: str, datatype: str, values: list[Any]) -> None:
    if datatype == "BYTES":
        ok = all(type(v) is str for v in values)
        expected = "strings"
    elif datatype == "BOOL":
        ok = all(type(v) is bool for v in values)
        expected = "true or false"
    elif datatype in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[datatype]
        ok = all(type(v) is int for v in values) and (not values or (low <= min(values) and max(values) <= high))
        expected = f"integers from {low} to {high}"
    else:
        ok = all(type(v) in (int, float) for v in values)
        expected = "numbers"
    if not ok:
        raise RequestError(400, f"input '{name}': data must be {expected} ({datatype})")


def check_inference_request(spec: ModelSpec, header: object, binary_bytes: int | None) -> None:
    """Check an inference request's JSON against what the model accepts, before Triton sees it.

    Args:
        spec: the model.
        header: the request's JSON (for the binary-data extension, its JSON header).
        binary_bytes: the length of the binary data after the JSON header; ``None`` without the extension.

    Raises:
        RequestError: 400 with what is wrong: unknown or missing inputs, a datatype or shape the model does
            not take, a batch above its maximum, data or binary sizes that do not match the shape.
    """
    if not isinstance(header, dict):
        raise RequestError(400, "the request must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "the request must have a non-empty list 'inputs'")
    known = {t.name: t for t in spec.inputs}
    seen: set[str] = set()
    binary_total = 0
    batch_sizes: set[int] = set()
    for entry in inputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RequestError(400, "each input must be a JSON object with a 'name'")
        name = entry["name"]
        tensor = known.get(name)
        if tensor is None:
            raise RequestError(400, f"model '{spec.name}' has no input '{name}' (inputs: {', '.join(known)})")
        if name in seen:
            raise RequestError(400, f"input '{name}' is given twice")
        seen.add(name)
        if entry.get("datatype") != tensor.datatype:
            raise RequestError(
                400, f"input '{name}': datatype must be {tensor.datatype}, not {entry.get('datatype')!r}"
            )
        shape = entry.get("shape")
        expected = ([-1] if spec.max_batch_size > 0 else []) + list(tensor.dims)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise RequestError(400, f"input '{name}': 'shape' must be a list of non-negative integers")
        if len(shape) != len(expected) or any(e >= 0 and d != e for d, e in zip(shape, expected, strict=False)):
            raise RequestError(
                400, f"input '{name}': shape {shape} does not match the model's {expected} (-1: any size)"
            )
        if spec.max_batch_size > 0:
            if not 1 <= shape[0] <= spec.max_batch_size:
                raise RequestError(400, f"input '{name}': batch size {shape[0]} is outside 1..{spec.max_batch_size}")
            batch_sizes.add(shape[0])
        elements = math.prod(shape)
        parameters = entry.get("parameters", {})
        if not isinstance(parameters, dict):
            raise RequestError(400, f"input '{name}': 'parameters' must be a JSON object")
        sources = [k for k in ("data",) if k in entry] + [
            k for k in ("binary_data_size", "shared_memory_region") if k in parameters
        ]
        if len(sources) != 1:
            raise RequestError(
                400,
                f"input '{name}' must carry exactly one of 'data', parameters.binary_data_size or "
                f"parameters.shared_memory_region (found {sources or 'none'})",
            )
        size = DATATYPE_SIZES.get(tensor.datatype)
        if sources[0] == "data":
            values = _flatten(entry["data"])
            if len(values) != elements:
                raise RequestError(
                    400, f"input '{name}': shape {shape} holds {elements} elements but 'data' has {len(values)}"
                )
            _check_values(name, tensor.datatype, values)
        elif sources[0] == "binary_data_size":
            declared = parameters["binary_data_size"]
            if binary_bytes is None:
                raise RequestError(400, f"input '{name}': binary data needs the Inference-Header-Content-Length header")
            if not _is_int(declared) or declared < 0:
                raise RequestError(400, f"input '{name}': binary_data_size must be a non-negative integer")
            if size is not None and declared != elements * size:
                raise RequestError(
                    400,
                    f"input '{name}': shape {shape} of {tensor.datatype} takes {elements * size} bytes, "
                    f"but binary_data_size is {declared}",
                )
            if size is None and declared < 4 * elements:
                raise RequestError(400, f"input '{name}': {declared} bytes cannot hold {elements} BYTES elements")
            binary_total += declared
    if len(batch_sizes) > 1:
        raise RequestError(400, f"inputs disagree on the batch size ({sorted(batch_sizes)})")
    missing = [t.name for t in spec.inputs if not t.optional and t.name not in seen]
    if missing:
        raise RequestError(400, f"missing input(s): {', '.join(missing)}")
    if binary_bytes is not None and binary_total != binary_bytes:
        raise RequestError(
            400, f"the inputs declare {binary_total} bytes of binary data but the request carries {binary_bytes}"
        )
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise RequestError(400, "'outputs' must be a list of JSON objects with a 'name'")
    for output in outputs:
        if spec.outputs and output["name"] not in spec.outputs:
            raise RequestError(
                400, f"model '{spec.name}' has no output '{output['name']}' (outputs: {', '.join(spec.outputs)})"
            )


def parse_inference_body(spec: ModelSpec, body: bytes | bytearray, header_length: int | None) -> None:
    """Decode an inference request's body (JSON, or JSON header and binary data) and check it.

    Raises:
        RequestError: 400 when the JSON holds more lists and objects than the model's inputs can need (counted
            before parsing), is not valid JSON, or does not pass :func:`check_inference_request`.
    """
    if header_length is not None and not 0 < header_length <= len(body):
        raise RequestError(
            400, f"Inference-Header-Content-Length {header_length} is outside the body's {len(body)} bytes"
        )
    text = body if header_length is None else body[:header_length]
    containers = spec.json_container_limit()
    if containers is not None:
        found = text.count(b"[") + text.count(b"{")  # before parsing: see ModelSpec.json_container_limit
        if found > containers:
            raise RequestError(
                400,
                f"the request's JSON holds {found} lists and objects; model '{spec.name}' needs at most {containers}",
            )
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise RequestError(400, f"the request's JSON cannot be parsed: {str(err)[:200]}") from None
    check_inference_request(spec, header, None if header_length is None else len(body) - header_length)


@dataclass(frozen=True)
class FrontLimits:
    """Bounds on what one connection or request may cost the front.

    Args:
        header_bytes: the largest request head (request line and headers), and response head from Triton.
        idle_timeout: seconds a connection may take to send a request head (and stay idle between requests).
        body_timeout: seconds a request body may take to arrive.
        upstream_timeout: seconds Triton may take to answer.
        send_timeout: seconds a write may wait for the peer (a client or Triton) to take the bytes.
        body_bytes: the largest inference request body (smaller for models whose inputs are all fixed-size).
        other_body_bytes: the largest body of any other request.
        buffered_bytes: request bodies held at once, all connections together; beyond it, 503.
        connections: open connections; beyond it, 503.
        json_checks: JSON bodies decoded at once (the rest wait their turn).
    """

    header_bytes: int = 64 * 1024
    idle_timeout: float = 60.0
    body_timeout: float = 120.0
    upstream_timeout: float = 300.0
    send_timeout: float = 60.0
    body_bytes: int = 256 * 1024 * 1024
    other_body_bytes: int = 1024 * 1024
    buffered_bytes: int = 512 * 1024 * 1024
    connections: int = 1024
    json_checks: int = 2


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes | bytearray = b""
    body_read: bool = False
    reserved: int = 0
    names: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        values = self.names.get(name, [])
        if len(values) > 1:
            raise RequestError(400, f"header {name} is given more than once")
        return values[0] if values else None

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for v in self.names.get("connection", []) for t in v.split(",")}
        return "close" not in tokens if self.version == "HTTP/1.1" else "keep-alive" in tokens


def _response(status: int, message: str, close: bool) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The first line and the headers of an HTTP message head (without its final blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise RequestError(400, "unreadable head") from None
    lines = text.split("\r\n")
    if any(c in line for line in lines for c in "\r\n\x00"):  # bare CR or LF would split lines differently
        raise RequestError(400, "bare CR, LF or NUL in the head")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise RequestError(400, f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    if len(headers) > 100:
        raise RequestError(431, "more than 100 headers")
    return lines[0], headers


class HttpFront:
    """Serve ``listen`` (plain HTTP, or TLS with ``context``) and relay to Triton's HTTP server at ``target``,
    checking inference requests first (see the module's description).

    Args:
        listen: ``(host, port)`` to serve.
        target: ``(host, port)`` of Triton's HTTP server (on loopback).
        inference_key: the value of :data:`FRONT_KEY_HEADER` that Triton requires for inference.
        context: a server TLS context (see :func:`server_context`); ``None`` serves plain HTTP.
        limits: bounds on connections and requests.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        inference_key: str,
        context: ssl.SSLContext | None = None,
        limits: FrontLimits | None = None,
    ) -> None:
        self.listen, self.target, self.context = listen, target, context
        self.inference_key = inference_key
        self.limits = limits or FrontLimits()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-front", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._checks = ThreadPoolExecutor(self.limits.json_checks, thread_name_prefix="http-front-check")
        self._check_slots: asyncio.Semaphore | None = None
        self._specs: dict[tuple[str, str | None], ModelSpec] = {}
        self._buffered = 0
        self._connections = 0
        #: Set when the server is about to stop (``braintumor serve`` on SIGTERM): readiness requests are
        #: answered 503 here, so that balancers and Kubernetes take the server out while it still serves.
        self.draining = False

    # -- connections -------------------------------------------------------------------------------------

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """Wait until ``writer`` has sent its buffer, at most :attr:`FrontLimits.send_timeout` seconds (raises
        ``TimeoutError``: a peer that reads nothing must not hold a connection and its buffers forever)."""
        await asyncio.wait_for(writer.drain(), self.limits.send_timeout)

    def _release(self, request: _Request) -> None:
        """Give back the request body's share of :attr:`FrontLimits.buffered_bytes` and drop the body."""
        self._buffered -= request.reserved
        request.reserved = 0
        request.body = b""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > self.limits.connections:
                writer.write(_response(503, "too many connections; retry later", close=True))
                await self._drain(writer)
                return
            while await self._serve_one(reader, writer):
                pass
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except asyncio.CancelledError:  # the front is stopping: end quietly (asyncio logs cancelled handlers)
            pass
        except Exception:  # a bug here must cost one connection, never the front
            log.exception("HTTP front: unexpected error on a connection")
        finally:
            self._connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; returns whether the connection stays open for another."""
        try:
            request = await asyncio.wait_for(self._read_head(reader), self.limits.idle_timeout)
        except RequestError as err:
            await self._refuse_and_close(reader, writer, err)
            return False
        if request is None:
            return False
        try:
            keep = request.keep_alive
            path = request.target.partition("?")[0]
            match = INFER_PATH.fullmatch(path)
            if match:
                await self._check_inference(request, match, reader, writer)
            else:
                if (request.get("content-encoding") or "identity").lower() != "identity":
                    raise RequestError(415, "only inference requests may be compressed")
                await self._read_body(request, reader, writer, self.limits.other_body_bytes)
                if self.draining and READY_PATH.fullmatch(path):
                    raise RequestError(503, "the server is stopping")
            return await self._forward(request, writer, with_key=match is not None, keep=keep)
        except RequestError as err:
            if request.body_read and request.keep_alive:
                writer.write(_response(err.status, err.message, close=False))
                await self._drain(writer)
                return True
            await self._refuse_and_close(reader, writer, err)
            return False
        finally:
            self._release(request)

    async def _refuse_and_close(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, err: RequestError
    ) -> None:
        """Answer with the error, then read and drop what the client still sends for a moment before closing:
        closing with unread bytes would reset the connection and could destroy the answer in flight."""
        writer.write(_response(err.status, err.message, close=True))
        await self._drain(writer)
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(2.0):
                drained = 0
                while drained < 4 * 1024 * 1024 and (data := await reader.read(65536)):
                    drained += len(data)

    async def _read_head(self, reader: asyncio.StreamReader) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as err:
            if err.partial.strip():
                raise RequestError(400, "the connection closed in the middle of a request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise RequestError(431, f"the request head exceeds {self.limits.header_bytes} bytes") from None
        first, headers = _parse_head(head.lstrip(b"\r\n")[:-4])
        parts = first.split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise RequestError(400, f"malformed request line {first[:80]!r}")
        if not parts[1].startswith("/") or any(ord(c) <= 32 or ord(c) >= 127 for c in parts[1]):
            raise RequestError(400, "the request target must be an absolute path")
        request = _Request(parts[0], parts[1], parts[2], headers)
        for name, value in headers:
            request.names.setdefault(name.lower(), []).append(value)
        return request

    async def _read_body(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int
    ) -> None:
        """Read the body (Content-Length or chunked), refusing one above ``limit`` before reading it."""
        length_text = request.get("content-length")
        encoding = request.get("transfer-encoding")
        if encoding is not None and length_text is not None:
            raise RequestError(400, "Content-Length and Transfer-Encoding together")
        if encoding is not None and encoding.lower() != "chunked":
            raise RequestError(501, f"Transfer-Encoding {encoding!r} is not supported")
        if length_text is not None and not _LENGTH.fullmatch(length_text):
            raise RequestError(400, f"bad Content-Length {length_text[:40]!r}")
        length = int(length_text) if length_text is not None else 0
        if length > limit:
            raise RequestError(413, f"the body ({length} bytes) exceeds this request's limit of {limit} bytes")
        self._reserve(request, length)
        if (request.get("expect") or "").lower() == "100-continue" and (length or encoding):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self._drain(writer)
        if encoding is None:
            request.body = await asyncio.wait_for(reader.readexactly(length), self.limits.body_timeout)
        else:
            request.body = await asyncio.wait_for(self._read_chunks(request, reader, limit), self.limits.body_timeout)
        request.body_read = True

    async def _read_chunks(self, request: _Request, reader: asyncio.StreamReader, limit: int) -> bytearray:
        body = bytearray()  # one buffer: a list of many small chunks would cost ~40 bytes of overhead each
        while True:
            line = (await reader.readuntil(b"\r\n"))[:-2].split(b";")[0].strip()
            if not line or not all(c in b"0123456789abcdefABCDEF" for c in line) or len(line) > 16:
                raise RequestError(400, "malformed chunked body")
            size = int(line, 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers: read and dropped
                    pass
                return body
            if len(body) + size > limit:
                raise RequestError(413, f"the body exceeds this request's limit of {limit} bytes")
            self._reserve(request, size)
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise RequestError(400, "malformed chunked body")

    def _reserve(self, request: _Request, size: int) -> None:
        if self._buffered + size > self.limits.buffered_bytes:
            raise RequestError(503, "the server is holding too many request bodies; retry later")
        self._buffered += size
        request.reserved += size

    # -- inference -----------------------------------------------------------------------------------------

    async def _check_inference(
        self, request: _Request, match: re.Match[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        model, version, kind = match.groups()
        if kind != "infer":
            raise RequestError(404, f"the {kind} extension is not served; use POST .../infer")
        if request.method != "POST":
            raise RequestError(405, "inference takes POST")
        spec = await self._spec(model, version)
        header_text = request.get("inference-header-content-length")
        if header_text is not None and not _LENGTH.fullmatch(header_text):
            raise RequestError(400, f"bad Inference-Header-Content-Length {header_text[:40]!r}")
        header_length = int(header_text) if header_text is not None else None
        limit = spec.body_limit(header_length is not None, self.limits.body_bytes)
        await self._read_body(request, reader, writer, limit)
        coding = (request.get("content-encoding") or "identity").lower()
        if coding in ("gzip", "deflate"):
            request.body = self._decompress(request, limit)
        elif coding != "identity":
            raise RequestError(415, f"Content-Encoding {coding!r} is not supported (gzip, deflate)")
        if self._check_slots is None:
            self._check_slots = asyncio.Semaphore(self.limits.json_checks)
        async with self._check_slots:
            await self._loop.run_in_executor(self._checks, parse_inference_body, spec, request.body, header_length)

    def _decompress(self, request: _Request, limit: int) -> bytes:
        inflater = zlib.decompressobj(wbits=47)  # zlib or gzip framing, detected from the header
        try:
            data = inflater.decompress(request.body, limit + 1)
        except zlib.error as err:
            raise RequestError(400, f"the compressed body cannot be decompressed: {err}") from None
        if len(data) > limit or inflater.unconsumed_tail:
            raise RequestError(413, f"the decompressed body exceeds this request's limit of {limit} bytes")
        if not inflater.eof:
            raise RequestError(400, "the compressed body cannot be decompressed: it is incomplete")
        self._reserve(request, len(data))
        request.names.pop("content-encoding", None)
        request.headers = [(k, v) for k, v in request.headers if k.lower() != "content-encoding"]
        return data

    async def _spec(self, model: str, version: str | None) -> ModelSpec:
        """The model's configuration from Triton, read once per model and version (model control is off).

        The version must be 1 to 18 ASCII digits, and is kept as its number (``01`` and ``1`` are one entry);
        at most :data:`SPEC_CACHE` configurations are kept (the oldest goes first).
        """
        if version is not None:
            if not _VERSION.fullmatch(version):
                raise RequestError(400, f"the model version must be a number of 1 to 18 digits, not {version[:40]!r}")
            version = str(int(version))
        key = (model, version)
        if key not in self._specs:
            path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/config"
            status, body = await self._get(path)
            if status != 200:
                try:
                    message = str(json.loads(body)["error"])
                except (ValueError, KeyError, TypeError):
                    message = f"the model server answered {status}"
                raise RequestError(status if 400 <= status < 500 else 502, message)
            try:
                spec = ModelSpec.from_config(json.loads(body))
            except (ValueError, KeyError, TypeError) as err:
                raise RequestError(502, f"the model's configuration cannot be read: {err}") from None
            while len(self._specs) >= SPEC_CACHE:
                del self._specs[next(iter(self._specs))]
            self._specs[key] = spec
        return self._specs[key]

    async def _get(self, path: str) -> tuple[int, bytes]:
        try:
            reader, writer = await asyncio.open_connection(*self.target, limit=self.limits.header_bytes)
        except OSError:
            raise RequestError(502, "the model server is not reachable") from None
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: triton\r\nConnection: close\r\n\r\n".encode("latin-1"))
            await self._drain(writer)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.limits.upstream_timeout)
            first, headers = _parse_head(head[:-4])
            length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
            body = await reader.readexactly(min(length, self.limits.other_body_bytes))
            return int(first.split(" ")[1]), body
        except (OSError, ValueError, IndexError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise RequestError(502, "the model server gave no readable answer") from None
        finally:
            writer.close()

    # -- relaying --------------------------------------------------------------------------------------------

    async def _forward(self, request: _Request, writer: asyncio.StreamWriter, with_key: bool, keep: bool) -> bool:
        """Send the request to Triton on a fresh loopback connection and relay its answer; returns ``keep``."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target, limit=self.limits.header_bytes)
        except OSError:
            raise RequestError(502, "the model server is not reachable") from None
        try:
            headers = [
                (k, v)
                for k, v in request.headers
                if k.lower() not in _HOP_BY_HOP and k.lower() not in ("content-length", FRONT_KEY_HEADER)
            ]
            if request.body or request.method in ("POST", "PUT", "PATCH"):
                headers.append(("Content-Length", str(len(request.body))))
            if with_key:
                headers.append((FRONT_KEY_HEADER, self.inference_key))
            headers.append(("Connection", "close"))
            head = f"{request.method} {request.target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
            try:
                up_writer.write(head.encode("latin-1") + b"\r\n")
                up_writer.write(request.body)  # a separate write: no copy of a body of up to hundreds of MB
                await self._drain(up_writer)
                self._release(request)  # sent: the body no longer counts against the limit
                response_head = await asyncio.wait_for(up_reader.readuntil(b"\r\n\r\n"), self.limits.upstream_timeout)
                first, response_headers = _parse_head(response_head[:-4])
                status = int(first.split(" ")[1])
            except (OSError, ValueError, IndexError, TimeoutError, asyncio.IncompleteReadError):
                raise RequestError(502, "the model server gave no answer") from None
            except (RequestError, asyncio.LimitOverrunError):
                raise RequestError(502, "the model server's answer cannot be read") from None
            names = {k.lower(): v for k, v in response_headers}
            chunked = names.get("transfer-encoding", "").lower() == "chunked"
            length = names.get("content-length")
            bodiless = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
            if not bodiless and not chunked and (length is None or not _LENGTH.fullmatch(length)):
                keep = False  # the answer ends when Triton closes: so must this connection
            out = [(k, v) for k, v in response_headers if k.lower() not in ("connection", "keep-alive")]
            out.append(("Connection", "keep-alive" if keep else "close"))
            writer.write((first + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in out) + "\r\n").encode("latin-1"))
            if bodiless:
                pass
            elif chunked:
                await self._relay_chunks(up_reader, writer)
            elif length is not None and _LENGTH.fullmatch(length):
                await self._relay(up_reader, writer, int(length))
            else:
                await self._relay(up_reader, writer, None)
            await self._drain(writer)
            return keep
        finally:
            up_writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int | None) -> None:
        remaining = length
        while remaining is None or remaining > 0:
            data = await asyncio.wait_for(
                reader.read(65536 if remaining is None else min(65536, remaining)), self.limits.upstream_timeout
            )
            if not data:
                if remaining:
                    raise ConnectionError("the model server closed in the middle of an answer")
                return
            writer.write(data)
            await self._drain(writer)
            if remaining is not None:
                remaining -= len(data)

    async def _relay_chunks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self.limits.upstream_timeout)
            writer.write(line)
            try:
                size = int(line[:-2].split(b";")[0].strip() or b"0", 16)
            except ValueError:
                raise ConnectionError("the model server sent a malformed chunked answer") from None
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    writer.write(trailer)
                writer.write(b"\r\n")
                return
            await self._relay(reader, writer, size + 2)

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> HttpFront:
        """Bind and start serving (raises ``OSError`` when the address is taken)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, *self.listen, ssl=self.context, limit=self.limits.header_bytes),
            self._loop,
        )
        try:
            self._server = future.result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop accepting, end the open connections and the loop."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
        self._checks.shutdown(wait=False, cancel_futures=True)


def new_key() -> str:
    """A random key for :data:`FRONT_KEY_HEADER`."""
    return secrets.token_urlsafe(24)
