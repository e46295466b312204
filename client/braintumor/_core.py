"""The core shared by the synchronous and the asynchronous client: everything but the waiting.

:class:`TumorClassifier` (threads) and :class:`AsyncTumorClassifier` (asyncio) are thin twins over
:class:`ClientCore`, as tritonclient's are over one request builder. The core holds the settings, builds
every request (metadata, readiness, inference), checks the served model's metadata against what this SDK
sends and reads, resolves the version requests go to (and whether to follow a new latest one), decodes
responses into :class:`~braintumor.prediction.Prediction`, runs the retry policy, and plans and assembles
batches. The twins only make the calls, block or await, and sleep.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import ModuleType, TracebackType
from typing import Any, Literal, TypedDict

import numpy as np
from tritonclient.utils import InferenceServerException

from braintumor.config import (
    ANSWERED_BY_OUTPUT,
    CHANNELS,
    DEFAULT_URL,
    HEATMAP_NAME,
    INPUT_NAME,
    LABELS,
    MODEL_NAME,
    OUTPUT_NAME,
)
from braintumor.errors import (
    BrainTumorError,
    InvalidTargetError,
    ModelMismatchError,
    ModelNotReadyError,
    ServerUnavailableError,
    from_triton,
    retry_delay,
    server_stopping,
)
from braintumor.model_repository import PREPROCESSING_PARAMETER
from braintumor.prediction import Prediction
from braintumor.preprocessing import ImageSource, Preprocessing

#: How ``predict_batch`` sends: ``packed`` requests of up to the model's max batch size, one after the other,
#: or ``concurrent`` batch-1 requests that Triton's dynamic batcher groups.
Strategy = Literal["packed", "concurrent"]
#: The images of one ``predict_batch`` call.
Images = Sequence[ImageSource]
STRATEGIES: tuple[str, ...] = ("packed", "concurrent")
#: Seconds between two readiness checks of ``wait_until_ready``.
READY_POLL_INTERVAL = 0.2
#: Deadline of one readiness check, in seconds (or the client's ``timeout`` when shorter).
READY_POLL_TIMEOUT = 2.0
#: Seconds before a request that a stopping server refused is sent again, to another server of a balanced target
#: (the first time; it doubles at each further resend of the same call, up to :data:`STOPPING_RETRY_MAX_DELAY`).
STOPPING_RETRY_DELAY = 0.05
#: The longest wait before such a resend, in seconds.
STOPPING_RETRY_MAX_DELAY = 0.5
#: One call sends a stopping server's refusal again at most this many times per server of its target.
STOPPING_RESENDS_PER_SERVER = 2


#: The channel's service configuration when a target names several servers: round-robin over the servers whose
#: connection is ready, so that a server that goes away (its connection closes or cannot be made) is skipped
#: until gRPC reconnects to it. No ``healthCheckConfig``: Triton 2.51 does not implement ``grpc.health.v1``
#: (its ``Watch`` answers UNIMPLEMENTED, which gRPC logs as an error for every channel, then ignores).
BALANCED_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
DNS_PREFIX = "dns:///"


def _host_port(entry: str, url: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` split, or :class:`InvalidTargetError` naming the whole ``url``."""
    host, sep, port = entry.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and "[" not in entry):
        raise InvalidTargetError(f"server address {entry!r} in {url!r} is not host:port (IPv6: [address]:port)")
    return host, int(port)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(host: str, port: int, url: str) -> list[str]:
    """Every address of ``host`` as ``address:port`` (an IP literal stays itself), or
    :class:`ServerUnavailableError`."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ServerUnavailableError(f"cannot resolve {host!r} of {url!r}: {err}") from err
    addresses = dict.fromkeys(_address(str(info[4][0]), port) for info in found)
    if not addresses:
        raise ServerUnavailableError(f"{host!r} of {url!r} has no address")
    return list(addresses)


@dataclass(frozen=True)
class Target:
    """Where a client sends: one server (``host:port``), several (``host:port,host:port``; names resolved at
    once, each to its first address) or a DNS name with several addresses (``dns:///name:port``, resolved by
    gRPC and again at each ``connect``).

    Args:
        url: what the user gave.
        channel: the gRPC target of the client's channel.
        servers: each server's ``address:port`` (empty for ``dns:///``: see :meth:`addresses`).
        dns: ``(name, port)`` of a ``dns:///`` target.
        tls_name: the name a server's TLS certificate must carry when the target names several servers: the
            DNS name, or the first host of the list as written (gRPC checks one name for a whole channel; the
            authority of a list is the list itself); ``None`` for one server (its own host, as always).
    """

    url: str
    channel: str
    servers: tuple[str, ...]
    dns: tuple[str, int] | None = None
    tls_name: str | None = None

    @property
    def balanced(self) -> bool:
        """Whether requests are spread over several servers (a list or a DNS name)."""
        return self.dns is not None or len(self.servers) > 1

    def addresses(self) -> list[str]:
        """The servers now: the list's, or the DNS name's current addresses.

        Raises:
            ServerUnavailableError: the name cannot be resolved.
        """
        return list(self.servers) if self.dns is None else _resolve(*self.dns, self.url)


def parse_target(url: str) -> Target:
    """Read a client's server address: ``host:port`` (used as it is, as always), a comma list
    ``host:port,host:port`` (an ``ipv4:``/``ipv6:`` target that gRPC balances round-robin), or
    ``dns:///name:port`` (gRPC's DNS resolver, every address of the name).

    Raises:
        InvalidTargetError: an empty list or entry, an entry that is not ``host:port``, IPv4 and IPv6 mixed.
        ServerUnavailableError: a name in the list cannot be resolved.
    """
    text = url.strip()
    if text.startswith("dns:"):
        rest = text.removeprefix(DNS_PREFIX) if text.startswith(DNS_PREFIX) else text.removeprefix("dns:")
        if "/" in rest or "," in rest:
            raise InvalidTargetError(f"{url!r}: write a DNS target as dns:///name:port (one name, no authority)")
        host, port = _host_port(rest, url)
        return Target(url, f"{DNS_PREFIX}{_address(host, port)}", (), (host, port), host)
    if "," not in text:
        if not text:
            raise InvalidTargetError("the server address is empty: give host:port, or several separated by commas")
        return Target(url, url, (url,))
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise InvalidTargetError(f"the server list {url!r} is empty")
    if not all(entries):
        raise InvalidTargetError(f"the server list {url!r} has an empty entry")
    servers, hosts = [], []
    for entry in entries:
        host, port = _host_port(entry, url)
        hosts.append(host)
        servers.append(_resolve(host, port, url)[0])
    servers = list(dict.fromkeys(servers))
    families = {ipaddress.ip_address(s.rpartition(":")[0].strip("[]")).version for s in servers}
    if len(families) > 1:
        raise InvalidTargetError(f"the server list {url!r} mixes IPv4 and IPv6 addresses: use one family")
    scheme = "ipv6" if families == {6} else "ipv4"
    return Target(url, f"{scheme}:{','.join(servers)}", tuple(servers), tls_name=hosts[0])


def channel_args(balanced: bool = True, tls_name: str | None = None) -> list[tuple[str, Any]]:
    """tritonclient's own channel arguments (message sizes, keepalive), plus round-robin balancing and the name
    that TLS checks in every server's certificate (and sends as SNI).

    Args:
        balanced: spread requests round-robin over the channel's servers.
        tls_name: the name to check (``grpc.ssl_target_name_override``), or ``None`` for the target's own.
    """
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keepalive = KeepAliveOptions()
    args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
    ]
    if balanced:
        args += [("grpc.service_config", BALANCED_SERVICE_CONFIG), ("grpc.lb_policy_name", "round_robin")]
    if tls_name:
        args.append(("grpc.ssl_target_name_override", tls_name))
    return args


@dataclass(frozen=True)
class ServedModel:
    """What the SDK learned about the served model on connect.

    Args:
        name: model name.
        versions: versions the metadata lists.
        image_size: side of the square input the model takes.
        max_batch_size: largest batch per request.
        heatmap_size: side of the Grad-CAM grid the model returns, or 0 when it returns none.
        version: the version requests go to: the one pinned, else the latest served at connect time.
        preprocessing: the preprocessing that version was trained with (from the model configuration's
            ``preprocessing/<version>`` parameter; a plain resize when the configuration has none at all).
        by_version: the preprocessing of every version the configuration lists.
        answered_by: whether the model serves the ``answered_by`` output (a canary: the version that answered).
    """

    name: str
    versions: tuple[str, ...]
    image_size: int
    max_batch_size: int
    heatmap_size: int = 0
    version: str = ""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    by_version: dict[str, Preprocessing] = field(default_factory=dict)
    answered_by: bool = False

    def preprocessing_of(self, version: str) -> Preprocessing:
        """The preprocessing of ``version`` (e.g. a prediction's ``model_version``), as the configuration says."""
        if version in self.by_version:
            return self.by_version[version]
        return self.preprocessing if version == self.version else Preprocessing(self.image_size)


def _preprocessings(config: dict[str, Any], image_size: int) -> dict[str, Preprocessing]:
    found = {}
    for key, parameter in config.get("parameters", {}).items():
        if not key.startswith(PREPROCESSING_PARAMETER):
            continue
        version = key.removeprefix(PREPROCESSING_PARAMETER)
        try:
            preprocessing = Preprocessing.from_json(parameter.get("string_value", ""))
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise ModelMismatchError(f"version {version}'s preprocessing parameter cannot be used: {err}") from err
        if preprocessing.size != image_size:
            raise ModelMismatchError(
                f"version {version}'s preprocessing makes {preprocessing.size}-pixel images, the model takes "
                f"{image_size}"
            )
        found[version] = preprocessing
    return found


def _preprocessing(by_version: dict[str, Preprocessing], version: str, image_size: int) -> Preprocessing:
    if version in by_version:
        return by_version[version]
    if by_version:  # other versions declare theirs: guessing this one's could feed it the wrong tensors
        raise ModelMismatchError(
            f"the model configuration declares no preprocessing for version {version} (it does for "
            f"{', '.join(sorted(by_version))}): re-render it with the repository tools"
        )
    return Preprocessing(image_size)  # a configuration from before per-version preprocessing


def check_model(metadata: dict[str, Any], config: dict[str, Any], version: str = "") -> ServedModel:
    """Validate model metadata and configuration (as JSON dictionaries from tritonclient).

    Args:
        metadata: the model metadata.
        config: the model configuration.
        version: the version pinned by the client; ``""`` resolves to the latest version the metadata lists
            (the one Triton answers unversioned requests with), so that the SDK knows which version's
            preprocessing to apply, and sends to that version.

    Raises:
        ModelMismatchError: naming exactly what differs.
    """
    name = metadata.get("name", "?")
    inputs = {i["name"]: i for i in metadata.get("inputs", [])}
    outputs = {o["name"]: o for o in metadata.get("outputs", [])}
    problems = []
    image = inputs.get(INPUT_NAME)
    if image is None:
        problems.append(f"no input named {INPUT_NAME!r} (inputs: {sorted(inputs)})")
    else:
        shape = [int(d) for d in image["shape"]]
        if image["datatype"] != "UINT8":
            problems.append(f"input {INPUT_NAME!r} is {image['datatype']}, the SDK sends UINT8")
        if len(shape) != 4 or shape[3] != CHANNELS or shape[1] != shape[2] or shape[1] <= 0:
            problems.append(f"input {INPUT_NAME!r} has shape {shape}, the SDK sends [batch, N, N, {CHANNELS}]")
    probabilities = outputs.get(OUTPUT_NAME)
    if probabilities is None:
        problems.append(f"no output named {OUTPUT_NAME!r} (outputs: {sorted(outputs)})")
    elif probabilities["datatype"] != "FP32" or [int(d) for d in probabilities["shape"]][-1] != len(LABELS):
        problems.append(
            f"output {OUTPUT_NAME!r} is {probabilities['datatype']} {probabilities['shape']}, the SDK reads FP32 "
            f"[batch, {len(LABELS)}]"
        )
    heatmap = outputs.get(HEATMAP_NAME)
    heatmap_size = 0
    if heatmap is not None:
        dims = [int(d) for d in heatmap["shape"]]
        if heatmap["datatype"] != "FP32" or len(dims) != 4 or dims[1] != len(LABELS) or dims[2] != dims[3]:
            problems.append(
                f"output {HEATMAP_NAME!r} is {heatmap['datatype']} {dims}, the SDK reads FP32 "
                f"[batch, {len(LABELS)}, N, N]"
            )
        else:
            heatmap_size = dims[2]
    if problems:
        raise ModelMismatchError(f"model {name} does not match this SDK: " + "; ".join(problems))
    listed = tuple(metadata.get("versions", []))
    numeric = [v for v in listed if v.isdigit()]
    resolved = version or (max(numeric, key=int) if numeric else "")
    image_size = int(image["shape"][1])
    by_version = _preprocessings(config, image_size)
    return ServedModel(
        name=name,
        versions=listed,
        image_size=image_size,
        max_batch_size=int(config.get("max_batch_size", 1)) or 1,
        heatmap_size=heatmap_size,
        version=resolved,
        preprocessing=_preprocessing(by_version, resolved, image_size),
        by_version=by_version,
        answered_by=outputs.get(ANSWERED_BY_OUTPUT, {}).get("datatype") == "INT32",
    )


def requested_outputs(model: ServedModel, explain: bool, explain_label: str | None) -> list[str]:
    """The outputs to ask for (``answered_by`` too where the model serves it); checks that an explanation can be
    served.

    Raises:
        ModelMismatchError: when ``explain`` is set and the model serves no heatmap.
        ValueError: when ``explain_label`` is not a known label.
    """
    if explain_label is not None and explain_label not in LABELS:
        raise ValueError(f"explain_label must be one of {', '.join(LABELS)}, got {explain_label!r}")
    extra = [ANSWERED_BY_OUTPUT] if model.answered_by else []
    if not explain:
        return [OUTPUT_NAME, *extra]
    if not model.heatmap_size:
        raise ModelMismatchError(f"model {model.name} serves no {HEATMAP_NAME!r} output: it cannot explain")
    return [OUTPUT_NAME, HEATMAP_NAME, *extra]


def to_predictions(result: Any, latency_ms: float, explain: bool, explain_label: str | None) -> list[Prediction]:
    """Turn a tritonclient (sync or aio) result into one :class:`Prediction` per image.

    Each prediction's ``model_version`` is the version that answered: the ``answered_by`` output where the
    result has it (a canary's routing version), else the response's model version.

    Args:
        result: the ``InferResult``.
        latency_ms: the request's latency, for each prediction.
        explain: whether the result holds heatmaps.
        explain_label: the label whose heatmap to keep, or ``None`` for the predicted one.
    """
    response = result.get_response()
    probabilities = result.as_numpy(OUTPUT_NAME)
    heatmaps = result.as_numpy(HEATMAP_NAME) if explain else None
    answered_by = result.as_numpy(ANSWERED_BY_OUTPUT)
    return [
        Prediction.from_probabilities(
            row,
            response.model_name,
            response.model_version if answered_by is None else str(int(answered_by[i][0])),
            latency_ms,
            heatmaps=None if heatmaps is None else np.asarray(heatmaps[i]),
            explain_label=explain_label,
        )
        for i, row in enumerate(probabilities)
    ]


class Attempt:
    """One try of a call under the SDK's retry policy (:func:`braintumor.errors.retry_delay`).

    A context manager around the call: a tritonclient failure becomes :attr:`delay`, the wait before the next
    try, or raises the translated SDK error when it is not retryable or the retries are spent.

    A request that a stopping server refused (:func:`braintumor.errors.server_stopping`) on a channel balanced
    over several servers is sent again (round-robin takes it to the next server) without spending a retry, after
    :data:`STOPPING_RETRY_DELAY` doubling at each resend (at most :data:`STOPPING_RETRY_MAX_DELAY`), at most
    ``max_moves`` times, and only while the wait ends before ``moving_until``; such a try sets :attr:`moved`. A
    balanced call never runs past ``moving_until`` (its deadline): a retry that would wait past it raises the
    error instead, and each try after the first gets the time left as its own deadline (:attr:`timeout`).

    Args:
        number: the try, from 0.
        during: what the SDK is doing, for error messages.
        retries: further tries after the first.
        backoff: the first wait, in seconds (doubles each time).
        moving_until: :func:`time.monotonic` until which a stopping server's refusal is sent again (the call's
            deadline); ``None`` when the call does not go through a balanced channel.
        moves: resends of this call so far.
        max_moves: the most resends of one call.
    """

    def __init__(
        self,
        number: int,
        during: str,
        retries: int,
        backoff: float,
        moving_until: float | None = None,
        moves: int = 0,
        max_moves: int = 2 * STOPPING_RESENDS_PER_SERVER,
    ) -> None:
        self.number, self.during, self.retries, self.backoff = number, during, retries, backoff
        self.moving_until, self.moves, self.max_moves = moving_until, moves, max_moves
        self.delay = 0.0
        self.moved = False
        #: The deadline of this try's request (``client_timeout``), or ``None`` for the call's own timeout.
        self.timeout: float | None = None
        if moving_until is not None and (number or moves):
            self.timeout = max(0.001, moving_until - time.monotonic())

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> bool:
        if not isinstance(error, InferenceServerException):
            return False
        if self.moving_until is not None and server_stopping(error) and self.moves < self.max_moves:
            delay = min(STOPPING_RETRY_DELAY * 2**self.moves, STOPPING_RETRY_MAX_DELAY)
            if time.monotonic() + delay < self.moving_until:
                self.delay, self.moved = delay, True
                return True
        delay = retry_delay(error, during=self.during, attempt=self.number, retries=self.retries, backoff=self.backoff)
        if self.moving_until is not None and time.monotonic() + delay >= self.moving_until:
            raise from_triton(error, during=self.during) from error  # the call's deadline comes first
        self.delay = delay
        return True


class Poll:
    """One readiness check of ``wait_until_ready``: a context manager that keeps a tritonclient failure as
    :attr:`last` (translated), so that waiting goes on and the final error can say what went wrong."""

    def __init__(self, during: str) -> None:
        self.during = during
        self.last: BrainTumorError | None = None

    def __enter__(self) -> Poll:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> bool:
        if not isinstance(error, InferenceServerException):
            return False
        self.last = from_triton(error, during=self.during)
        return True


class BatchOptions(TypedDict, total=False):
    """The keyword options of ``predict_batch`` (both clients); see :class:`Batch`."""

    frame: int | None
    explain: bool
    explain_label: str | None
    return_errors: bool


@dataclass(frozen=True)
class Batch:
    """What ``predict_batch`` was asked (see :meth:`braintumor.classifier.TumorClassifier.predict_batch`).

    Args:
        images: the images, in order.
        strategy: ``packed`` or ``concurrent``.
        workers: threads that preprocess, and requests in flight for ``concurrent``.
        frame: the frame of multi-frame images.
        explain: also fetch each image's Grad-CAM map.
        explain_label: the class to explain instead of the predicted one.
        return_errors: put each failed image's :class:`BrainTumorError` in its place instead of raising it.
    """

    images: Sequence[ImageSource]
    strategy: Strategy = "concurrent"
    workers: int = 8
    frame: int | None = None
    explain: bool = False
    explain_label: str | None = None
    return_errors: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'packed' or 'concurrent', got {self.strategy!r}")

    @property
    def in_flight(self) -> int:
        """Requests sent at once: one at a time when packed, ``workers`` when concurrent."""
        return 1 if self.strategy == "packed" else max(1, self.workers)

    def preprocess(self, served: ServedModel) -> list[np.ndarray | BrainTumorError]:
        """Each image's tensor for ``served``'s version, preprocessed by ``workers`` threads (decoding and
        cropping release the GIL); a failed image's error in its place when ``return_errors``.

        Raises:
            InvalidImageError: the first image that cannot be used, unless ``return_errors``.
        """

        def one(image: ImageSource) -> np.ndarray | BrainTumorError:
            try:
                return served.preprocessing(image, self.frame)
            except BrainTumorError as err:
                if not self.return_errors:
                    raise
                return err

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(one, self.images))

    def requests(self, served: ServedModel, tensors: list[Any]) -> list[tuple[list[int], np.ndarray]]:
        """The requests to send: the indices of the images each carries, and their stacked pixels."""
        usable = [i for i, tensor in enumerate(tensors) if isinstance(tensor, np.ndarray)]
        step = served.max_batch_size if self.strategy == "packed" else 1
        chunks = [usable[k : k + step] for k in range(0, len(usable), step)]
        return [(chunk, np.stack([tensors[i] for i in chunk])) for chunk in chunks]

    def assemble(
        self, tensors: list[Any], requests: list[tuple[list[int], np.ndarray]], outcomes: Sequence[Any], follow: bool
    ) -> list[Prediction | BrainTumorError]:
        """One result per image, in input order, from each request's predictions or exception.

        Args:
            tensors: :meth:`preprocess`'s output.
            requests: :meth:`requests`' output.
            outcomes: per request, its predictions or the exception it raised.
            follow: raise a :class:`ModelNotReadyError` even when ``return_errors``, so that the client can
                follow a new latest version and send again.

        Raises:
            BrainTumorError: the first failure in input order, unless ``return_errors``.
        """
        results: list[Any] = list(tensors)
        for (indices, _), outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, BrainTumorError):
                raise outcome
            for n, i in enumerate(indices):
                results[i] = outcome if isinstance(outcome, BrainTumorError) else outcome[n]
        for result in results:
            if isinstance(result, BrainTumorError) and (
                not self.return_errors or (follow and isinstance(result, ModelNotReadyError))
            ):
                raise result
        return results


class ClientCore:
    """Settings, requests, checks and decoding shared by :class:`~braintumor.classifier.TumorClassifier` and
    :class:`~braintumor.aio.AsyncTumorClassifier`.

    Args:
        url: the server's gRPC ``host:port``; or several, ``host:port,host:port``, or ``dns:///name:port`` for
            every address of a name: requests then go round-robin to the servers that are up, and ``connect``
            checks each server alone (see :func:`parse_target`, :meth:`_connected_servers`).
        model_name: the served model.
        model_version: a version to pin, or ``None`` for the latest version the server serves when the
            client connects (requests then go to that version, whose preprocessing the client applies;
            when the server stops serving it, the client reconnects to the new latest once and sends again).
        timeout: deadline of each call, in seconds.
        retries: further attempts after a retryable failure.
        backoff: first wait between attempts, in seconds (doubles each time).
        ssl: use TLS; ``root_certificates``, ``private_key`` and ``certificate_chain`` are PEM file paths
            (server CA, client key and certificate for mutual TLS).
        tls_server_name: with TLS, the name every server's certificate must carry. gRPC checks one name for a
            whole channel, so for several servers the default is the DNS name, or the first host of the list
            (a certificate shared by the servers, or a wildcard one, carries it); ``connect`` checks each server
            against it, so a server whose certificate lacks it fails there, not silently later. One server:
            its own host, unless given.
        check: check the served model's metadata before the first request: the synchronous client does it in
            its constructor, the asynchronous one on entering ``async with`` (see ``connect``).
    """

    #: The tritonclient gRPC module the twin talks through (``tritonclient.grpc`` or its ``aio``).
    transport: ModuleType
    #: Whether the constructor itself checks the served model (only a blocking client can).
    connects_on_init = False
    #: Seconds between two readiness checks.
    _poll_interval = READY_POLL_INTERVAL

    def __init__(
        self,
        url: str = DEFAULT_URL,
        model_name: str = MODEL_NAME,
        model_version: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.2,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        check: bool = True,
        tls_server_name: str | None = None,
    ) -> None:
        self.url, self.model_name, self.model_version = url, model_name, model_version
        self.timeout, self.retries, self.backoff, self.check = timeout, retries, backoff, check
        self.target = parse_target(url)
        self._tls: dict[str, Any] = {
            "ssl": ssl,
            "root_certificates": root_certificates,
            "private_key": private_key,
            "certificate_chain": certificate_chain,
        }
        #: The name TLS checks in every certificate (``None``: each channel's own target), see ``tls_server_name``.
        self.tls_name = (tls_server_name or self.target.tls_name) if ssl else None
        options = {}
        if self.target.balanced or self.tls_name:
            options = {"channel_args": channel_args(self.target.balanced, self.tls_name)}
        self._client = self.transport.InferenceServerClient(self.target.channel, **self._tls, **options)
        self.model: ServedModel | None = None
        if check and self.connects_on_init:
            self.connect()

    def connect(self) -> Any:  # pragma: no cover - each twin defines it
        """Read and check the served model's metadata (each twin's own)."""
        raise NotImplementedError

    # -- retry policy and readiness ---------------------------------------------------------------------
    def _attempts(self, during: str, balanced: bool = False) -> Iterator[Attempt]:
        """The tries of one call; the last one raises instead of asking for another.

        Args:
            during: what the call is for, for error messages.
            balanced: the call goes through the client's own channel, which may spread requests over several
                servers: a stopping server's refusal is then sent again (to the next server) without spending a
                retry, at most :data:`STOPPING_RESENDS_PER_SERVER` times per server, and the whole call ends by its
                ``timeout`` (see :class:`Attempt`).
        """
        moving_until = time.monotonic() + self.timeout if balanced and self.target.balanced else None
        max_moves = STOPPING_RESENDS_PER_SERVER * max(2, len(self.target.servers))
        number = moves = 0
        while number <= self.retries:
            attempt = Attempt(number, during, self.retries, self.backoff, moving_until, moves, max_moves)
            yield attempt
            if attempt.moved:
                moves += 1
            else:
                number += 1

    def _polls(self, timeout: float) -> Iterator[Poll]:
        """Readiness checks until ``timeout`` seconds have passed; then raise :class:`ModelNotReadyError`."""
        deadline = time.monotonic() + timeout
        poll = Poll(f"waiting for {self.model_name} at {self.url}")
        while time.monotonic() < deadline:
            yield poll
        reason = f" (last error: {poll.last})" if poll.last else ""
        raise ModelNotReadyError(f"{self.model_name} at {self.url} was not ready within {timeout:.0f} s{reason}")

    # -- request building -------------------------------------------------------------------------------
    @property
    def _version(self) -> str:
        return self.model_version or ""

    @property
    def _follows_latest(self) -> bool:
        """Whether a failure of the version requests went to may be met by following the new latest one."""
        return not self.model_version and self.model is not None

    def _metadata_request(self, server: str | None = None) -> tuple[dict[str, Any], str]:
        """The arguments of ``get_model_metadata`` and ``get_model_config``, and what they are for (reading
        from ``server``, one of several, or from the client's target)."""
        request = {"model_name": self.model_name, "model_version": self._version, "as_json": True}
        where = f"{server} (of {self.url})" if server else self.url
        return {**request, "client_timeout": self.timeout}, f"reading the metadata of {self.model_name} at {where}"

    def _server_client(self, server: str) -> Any:
        """A client of one of the target's servers alone (its own channel, checking the same TLS name as the
        balanced one), for the check on connect."""
        options = {"channel_args": channel_args(False, self.tls_name)} if self.tls_name else {}
        return self.transport.InferenceServerClient(server, **self._tls, **options)

    def _connected_servers(self, read: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> ServedModel:
        """Check what ``connect`` read from each of several servers: each matches this SDK, all serve the same
        interface and preprocessing, and requests go to one version every server serves (the pinned one, or
        the latest they all list); keep it (:attr:`model`).

        Args:
            read: per server that answered, its model metadata and configuration.

        Raises:
            ServerUnavailableError: no server answered.
            ModelMismatchError: a server does not match the SDK, or two servers differ.
        """
        if not read:
            raise ServerUnavailableError(f"no server of {self.url} answered")
        version = self._version
        if not version:
            listed = [{v for v in metadata.get("versions", []) if v.isdigit()} for metadata, _ in read.values()]
            common = set.intersection(*listed)
            if not common and any(listed):
                raise ModelMismatchError(f"the servers of {self.url} serve no version of {self.model_name} in common")
            version = max(common, key=int) if common else ""
        models = {}
        for server, (metadata, config) in read.items():
            try:
                models[server] = check_model(metadata, config["config"], version)
            except ModelMismatchError as err:
                raise ModelMismatchError(f"{server} (of {self.url}): {err}") from err
        (first, model), *others = models.items()
        # answered_by (a canary's): asked for only when every server serves it, as a plain one refuses the request
        model = replace(model, answered_by=all(m.answered_by for m in models.values()))
        for server, other in others:
            for what in ("name", "image_size", "max_batch_size", "heatmap_size", "preprocessing"):
                if getattr(model, what) != getattr(other, what):
                    raise ModelMismatchError(
                        f"the servers of {self.url} serve different models: {what} is {getattr(model, what)} at "
                        f"{first}, {getattr(other, what)} at {server}"
                    )
        self.model = model
        return model

    def _without_answered_by(self, served: ServedModel, error: BrainTumorError) -> ServedModel | None:
        """When ``error`` is a server's refusal of the ``answered_by`` output (``INVALID_ARGUMENT`` naming it: a
        server that is no canary, the request never ran), ``served`` without it, also kept as :attr:`model`;
        else ``None``.

        Args:
            served: what the request was built for.
            error: what the request raised.
        """
        if not served.answered_by or error.status != "INVALID_ARGUMENT" or ANSWERED_BY_OUTPUT not in str(error):
            return None
        plain = replace(served, answered_by=False)
        if self.model is not None and self.model.version == served.version:
            self.model = replace(self.model, answered_by=False)
        return plain

    def _ready_request(self) -> dict[str, Any]:
        """The arguments of one readiness check."""
        timeout = min(self.timeout, READY_POLL_TIMEOUT)
        return {"model_name": self.model_name, "model_version": self._version, "client_timeout": timeout}

    def _connected(self, metadata: dict[str, Any], config: dict[str, Any]) -> ServedModel:
        """Check what ``connect`` read, and keep it (:attr:`model`)."""
        self.model = check_model(metadata, config["config"], self._version)
        return self.model

    def _infer_request(
        self, served: ServedModel, pixels: np.ndarray, explain: bool, explain_label: str | None
    ) -> tuple[dict[str, Any], str]:
        """The arguments of ``infer`` for ``pixels``, sent to exactly the version ``served`` names (the one
        whose preprocessing made them, even when another thread or task reconnects meanwhile)."""
        names = requested_outputs(served, explain, explain_label)
        image = self.transport.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
        image.set_data_from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8))
        request = {
            "model_name": self.model_name,
            "inputs": [image],
            "model_version": served.version,
            "outputs": [self.transport.InferRequestedOutput(name) for name in names],
            "client_timeout": self.timeout,
        }
        return request, f"classifying with {self.model_name} at {self.url}"
