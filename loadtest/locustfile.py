"""Locust load test of the served brain-tumor model over gRPC, built on the client SDK.

Each simulated user holds its own :class:`braintumor.classifier.TumorClassifier` and sends batch-1
requests of real MRI slices, preprocessed once at start so that the load measures serving, not JPEG
decoding. Every call is reported to Locust (latency, failures) and to the load generator's own
Prometheus metrics (``--metrics-port``). When the run ends, the service-level thresholds are checked:
a failure ratio above ``--max-fail-ratio`` or a p95 latency above ``--p95-ms`` makes Locust exit 1.

    locust -f loadtest/locustfile.py --headless --host 127.0.0.1:8001 -u 16 -r 4 -t 20s --stop-timeout 10 \\
        --csv runs/loadtest/stats --html runs/loadtest/report.html --p95-ms 500

``--stop-timeout`` lets each user finish its request in flight when the time is up, so that every request
the server answered is counted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # gRPC's blocking calls must yield to gevent, Locust's scheduler

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402
from prometheus_client import Counter, Histogram, start_http_server  # noqa: E402

from braintumor.classifier import TumorClassifier  # noqa: E402
from braintumor.config import DEFAULT_DATA_DIR, DEFAULT_URL, IMAGE_SIZE, IMAGE_SUFFIXES  # noqa: E402
from braintumor.errors import BrainTumorError  # noqa: E402
from braintumor.preprocessing import Preprocessing, preprocess_batch  # noqa: E402

log = logging.getLogger("braintumor.loadtest")

REQUESTS = Counter("braintumor_loadtest_requests", "Inference requests the load generator completed", ["outcome"])
LATENCY = Histogram(
    "braintumor_loadtest_request_duration_seconds",
    "Latency of inference requests seen by the load generator",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
)
for _outcome in ("success", "failure"):
    REQUESTS.labels(_outcome)

#: Where the images come from (set from the options at init), and their pixels per preprocessing.
IMAGES: tuple[Path, int] = (DEFAULT_DATA_DIR / "Testing", 64)
_PIXELS: dict[Preprocessing, np.ndarray] = {}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("braintumor")
    group.add_argument("--images", default=str(DEFAULT_DATA_DIR / "Testing"), help="folder of MRI images to send")
    group.add_argument("--max-images", type=int, default=64, help="images preprocessed and cycled through")
    group.add_argument("--model-version", default="", help="pin a model version (default: latest)")
    group.add_argument("--p95-ms", type=float, default=500.0, help="service level: p95 latency bound (ms)")
    group.add_argument("--max-fail-ratio", type=float, default=0.0, help="service level: highest failure ratio")
    group.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    group.add_argument("--metrics-linger", type=float, default=0.0, help="seconds to keep metrics up after the run")


def load_pixels(folder: Path, limit: int, preprocessing: Preprocessing | None = None) -> np.ndarray:
    """Preprocess up to ``limit`` images from ``folder`` (spread over its classes), or random pixels.

    ``preprocessing`` is the one of the version the users send to (default: a plain resize).
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        log.warning("no images under %s: sending random pixels", folder)
        size = preprocessing.size if preprocessing else IMAGE_SIZE
        return np.random.default_rng(0).integers(0, 256, (limit, size, size, 3), dtype=np.uint8)
    return preprocess_batch(files[:: max(1, len(files) // limit)][:limit], preprocessing=preprocessing)


def pixels_for(preprocessing: Preprocessing) -> np.ndarray:
    """The images preprocessed for the version the users send to, made once per preprocessing."""
    if preprocessing not in _PIXELS:
        _PIXELS[preprocessing] = load_pixels(*IMAGES, preprocessing)
    return _PIXELS[preprocessing]


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs) -> None:
    global IMAGES
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, MasterRunner):
        return
    IMAGES = (Path(options.images), options.max_images)
    if options.metrics_port:
        start_http_server(options.metrics_port, addr="127.0.0.1")


class TritonGrpcUser(User):
    """A client that sends one preprocessed slice per request, back to back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.classifier = TumorClassifier(
            self.host or DEFAULT_URL,
            model_version=(options.model_version if options else "") or None,
            timeout=30.0,
            retries=0,  # every request counts once: the load measures the server, retries would hide errors
        )
        # Connecting told the client the version it sends to, and so that version's preprocessing.
        self.pixels = pixels_for(self.classifier.model.preprocessing)
        self.next = id(self) % max(1, len(self.pixels))

    @task
    def infer(self) -> None:
        batch = self.pixels[self.next % len(self.pixels)][None]
        self.next += 1
        start = time.perf_counter()
        error: Exception | None = None
        try:
            self.classifier.predict_pixels(batch)
        except BrainTumorError as err:
            error = err
        elapsed = time.perf_counter() - start
        REQUESTS.labels("failure" if error else "success").inc()
        LATENCY.observe(elapsed)
        self.environment.events.request.fire(
            request_type="grpc",
            name="braintumor/infer",
            response_time=elapsed * 1000.0,
            response_length=batch.nbytes,
            exception=error,
            context={},
        )

    def on_stop(self) -> None:
        self.classifier.close()


@events.quitting.add_listener
def _check_service_levels(environment: Environment, **_kwargs) -> None:
    options = environment.parsed_options
    total = environment.stats.total
    if options is None:
        return
    problems = []
    if total.num_requests == 0:
        problems.append("no request was sent")
    if total.fail_ratio > options.max_fail_ratio:
        problems.append(f"failure ratio {total.fail_ratio:.4f} > {options.max_fail_ratio}")
    p95 = total.get_response_time_percentile(0.95) or 0.0
    if p95 > options.p95_ms:
        problems.append(f"p95 latency {p95:.1f} ms > {options.p95_ms} ms")
    if problems:
        log.error("service level not met: %s", "; ".join(problems))
        environment.process_exit_code = 1
    else:
        log.info(
            "service level met: %d requests, failure ratio %.4f, p95 %.1f ms", total.num_requests, total.fail_ratio, p95
        )
    if options.metrics_linger:
        gevent.sleep(options.metrics_linger)  # let Prometheus scrape the final counts
