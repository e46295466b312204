"""``braintumor serve`` stops gracefully on SIGTERM without an external drain (issue 18).

On SIGTERM ``serve`` answers 503 on the readiness paths of its HTTP front, waits (at most ``--drain-timeout``)
until no request is in flight, then stops Triton: SIGTERM, and once Triton says every request in flight has
finished, SIGKILL instead of letting it unload the models for about 4 s while answering ``NOT_FOUND ... has no
available versions``. The SDK sends a request that a stopping server refused (``UNAVAILABLE ... Server is
stopping``, or that ``NOT_FOUND``) again, to the next server, when its target names several servers; with one
server it does not (there is no other to answer).

The slow tests run real ``braintumor serve`` processes on 127.0.0.1 and 127.0.0.2: one SDK client with both as
its target, under load, while one is stopped with SIGTERM (a ledger of every request: none failed or lost);
then the other alone, stopped while batches of 32 are in flight: every request sent before the signal is
answered.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import free_ports
from tritonclient.utils import InferenceServerException

from braintumor._core import STOPPING_RETRY_DELAY, Attempt
from braintumor.classifier import TumorClassifier
from braintumor.errors import ModelNotReadyError, ServerUnavailableError, server_stopping

STOPPING = InferenceServerException(
    "[request id: <id_unknown>] Server is stopping, scheduler for model has stopped accepting new inference requests",
    status="StatusCode.UNAVAILABLE",
)
UNLOADING = InferenceServerException(
    "Request for unknown model: 'braintumor' has no available versions", status="StatusCode.NOT_FOUND"
)
UNLOADING_VERSION = InferenceServerException(
    "Request for unknown model: 'braintumor' version 4 is not at ready state", status="StatusCode.UNAVAILABLE"
)
UNKNOWN = InferenceServerException("Request for unknown model: 'nothing' is not found", status="StatusCode.NOT_FOUND")


def test_a_stopping_servers_answers_are_recognised():
    assert server_stopping(STOPPING) and server_stopping(UNLOADING) and server_stopping(UNLOADING_VERSION)
    assert not server_stopping(UNKNOWN) and not server_stopping(None)
    assert not server_stopping(InferenceServerException("Server is stopping", status="StatusCode.INTERNAL"))


class Flaky:
    """A call that raises ``errors`` in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "answer"


def _call(client: TumorClassifier, fn: Flaky) -> str:
    return client._call(fn, "testing", balanced=True)


def test_a_balanced_client_sends_a_stopping_servers_refusal_again_without_spending_retries():
    client = TumorClassifier("127.0.0.1:1,127.0.0.2:1", retries=0, timeout=5, check=False)
    try:
        fn = Flaky(*[STOPPING, UNLOADING, UNLOADING_VERSION] * 4)
        started = time.monotonic()
        assert _call(client, fn) == "answer" and fn.calls == 13
        assert time.monotonic() - started >= 12 * STOPPING_RETRY_DELAY
        with pytest.raises(ModelNotReadyError, match="is not found"):  # other NOT_FOUNDs: as before
            _call(client, Flaky(UNKNOWN))
        # metadata reads go to one server alone: not moved
        with pytest.raises(ModelNotReadyError, match="no available versions"):
            client._call(Flaky(UNLOADING), "reading")
    finally:
        client.close()
    # not beyond the call's timeout
    client = TumorClassifier("127.0.0.1:1,127.0.0.2:1", retries=0, timeout=0.3, check=False)
    try:
        fn = Flaky(*[UNLOADING] * 100)
        with pytest.raises(ModelNotReadyError, match="no available versions"):
            _call(client, fn)
        assert 3 <= fn.calls <= 7
    finally:
        client.close()


def test_one_server_is_not_asked_again_when_it_unloads():
    client = TumorClassifier("127.0.0.1:1", retries=2, backoff=0.01, check=False)
    try:
        fn = Flaky(UNLOADING)
        with pytest.raises(ModelNotReadyError):
            _call(client, fn)
        assert fn.calls == 1
        fn = Flaky(STOPPING, STOPPING, STOPPING)  # UNAVAILABLE: the ordinary retries, then the error
        with pytest.raises(ServerUnavailableError, match="Server is stopping"):
            _call(client, fn)
        assert fn.calls == 3
    finally:
        client.close()
    attempt = Attempt(0, "x", 0, 0.1, moving_until=None)
    with pytest.raises(ModelNotReadyError), attempt:
        raise UNLOADING


def test_a_draining_front_answers_not_ready_itself():
    from braintumor_serving.front import HttpFront

    listen, nothing = free_ports(2)
    front = HttpFront(("127.0.0.1", listen), ("127.0.0.1", nothing), "key").start()
    try:
        assert _status(f"127.0.0.1:{listen}", "/v2/health/ready") == 502  # relayed: nothing behind it here
        front.draining = True
        for path in ("/v2/health/ready", "/v2/models/braintumor/ready", "/v2/models/braintumor/versions/3/ready"):
            assert _status(f"127.0.0.1:{listen}", path) == 503
        assert _status(f"127.0.0.1:{listen}", "/v2/health/live") == 502  # everything else still relayed
    finally:
        front.stop()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bad_drain_timeouts_are_refused(value, capsys):
    from braintumor.cli import main as cli

    with pytest.raises(SystemExit) as raised:
        cli(["serve", "--drain-timeout", value])
    assert raised.value.code == 2
    assert "expected seconds, 0 or more" in capsys.readouterr().err


def _status(host_port: str, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{host_port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0


# -- real servers ------------------------------------------------------------------------------------------------
class Ledger:
    """Every request of a load: when it was sent and ended, and how (answered, errored)."""

    def __init__(self) -> None:
        self.records: list[tuple[float, float, str, str]] = []
        self.sent = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self, client: TumorClassifier, pixels: np.ndarray, batch: int = 1) -> None:
        for k in itertools.count():
            if self.stop.is_set():
                return
            with self.lock:
                self.sent += 1
            started = time.monotonic()
            try:
                predictions = client.predict_pixels(pixels[:batch] if batch > 1 else pixels[k % len(pixels)][None])
                outcome, error = ("answered" if len(predictions) == batch else "wrong"), ""
            except Exception as err:
                outcome, error = "errored", f"{type(err).__name__}: {str(err)[:160]}"
            with self.lock:
                self.records.append((started, time.monotonic(), outcome, error))

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"sent": self.sent, **Counter(r[2] for r in self.records), "lost": self.sent - len(self.records)}

    def errors(self) -> list[str]:
        with self.lock:
            return sorted({r[3] for r in self.records if r[2] != "answered"})[:3]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two ``braintumor serve`` replicas (127.0.0.1, 127.0.0.2), each with the default ``--drain-timeout``."""
    pytest.importorskip("pytriton")
    from balancing import new_admin_key, start_replicas
    from helpers import copy_repository

    folder = tmp_path_factory.mktemp("graceful")
    repository = copy_repository(folder / "model_repository", keep=(-1,))
    started = start_replicas(repository, folder, new_admin_key())
    yield started
    for replica in started:
        replica.kill()


def _pixels(n: int) -> np.ndarray:
    from braintumor.preprocessing import preprocess_batch
    from synthetic import random_slice

    rng = np.random.default_rng(18)
    return preprocess_batch([random_slice(rng, 224, k % 4) for k in range(n)])


#: Seconds before ``serve`` stops Triton that a request must have been sent to count as reaching it first.
MARGIN = 0.3


def _watch_log(path: Path, text: str, until: threading.Event, seen: list[float]) -> None:
    """Put the moment ``text`` appears in ``path`` (a replica's output) into ``seen``."""
    offset = path.stat().st_size
    while not until.is_set() and not seen:
        if text in path.read_text(errors="replace")[offset:]:
            seen.append(time.monotonic())
        time.sleep(0.01)


def _watch_readiness(host_port: str, until: threading.Event, seen: list[int]) -> None:
    while not until.is_set():
        status = _status(host_port, "/v2/health/ready")
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_to_one_of_two_replicas_under_load_fails_no_request(replicas, capsys):
    stopped, survivor = replicas
    url = ",".join(f"{r.host}:{r.grpc_port}" for r in replicas)
    pixels = _pixels(6)
    client = TumorClassifier(url)
    ledger = Ledger()
    threads = [threading.Thread(target=ledger.run, args=(client, pixels), daemon=True) for _ in range(12)]
    for thread in threads:
        thread.start()
    readiness: list[int] = []
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_readiness, args=(f"{stopped.host}:{stopped.http_port}", done, readiness), daemon=True
    )
    try:
        time.sleep(3)
        before = [r.inference_count() for r in replicas]
        assert min(before) > 0, before
        watcher.start()
        signalled = time.monotonic()
        stopped.process.send_signal(signal.SIGTERM)
        code = stopped.process.wait(30)
        stop_s = time.monotonic() - signalled
        time.sleep(2)  # the survivor alone
    finally:
        ledger.stop.set()
        done.set()
        for thread in threads:
            thread.join(30)
        client.close()
    counts = ledger.counts()
    log = Path(stopped.log_file).read_text()
    with capsys.disabled():
        print(
            f"\nSIGTERM to one of two replicas under load: ledger {counts}; serve exited {code} after {stop_s:.1f} s; "
            f"its readiness {readiness}; errors {ledger.errors()}"
        )
    assert code == 0, log
    assert "Draining: readiness answers 503" in log and "Triton ended before unloading the models" in log, log
    assert 503 in readiness, readiness
    assert counts.get("errored", 0) == 0 and counts.get("wrong", 0) == 0 and counts["lost"] == 0, counts
    assert survivor.is_ready()


@pytest.mark.slow
def test_sigterm_to_a_single_server_lets_its_requests_in_flight_finish(replicas, capsys):
    _, server = replicas
    assert server.process.poll() is None
    pixels = _pixels(32)
    client = TumorClassifier(f"{server.host}:{server.grpc_port}", retries=0)
    ledger = Ledger()
    threads = [threading.Thread(target=ledger.run, args=(client, pixels, 32), daemon=True) for _ in range(6)]
    stopping: list[float] = []  # when serve, its drain over, stopped Triton
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_log, args=(Path(server.log_file), "Stopping Triton", done, stopping), daemon=True
    )
    try:
        for thread in threads:
            thread.start()
        time.sleep(2)
        watcher.start()
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(30)
        stop_s = time.monotonic() - signalled
    finally:
        ledger.stop.set()
        done.set()
        for thread in threads:
            thread.join(30)
        client.close()
    assert stopping, "serve never said it was stopping Triton"
    # sent well before Triton was told to stop (a 2.4 MB request may take a while to leave a busy client): each
    # one answered, however long it took, and some of them only after Triton's SIGTERM
    with ledger.lock:
        before = [r for r in ledger.records if r[0] < stopping[0] - MARGIN]
        drained = [r for r in ledger.records if signalled <= r[0] < stopping[0] - MARGIN]
        refused = Counter(r[3].split(": ")[-1][:60] for r in ledger.records if r[2] == "errored")
    log = Path(server.log_file).read_text()
    with capsys.disabled():
        print(
            f"\nSIGTERM to a single server with batches of 32 in flight: {len(before)} requests sent before it "
            f"stopped Triton ({stopping[0] - signalled:.1f} s after the signal), "
            f"{sum(r[2] == 'answered' for r in before)} answered, the last "
            f"{max(r[1] for r in before) - stopping[0]:.2f} s after; {len(drained)} of them sent during the drain; "
            f"later ones refused: {dict(refused)}; serve exited {code} after {stop_s:.1f} s"
        )
    assert code == 0, log
    assert before and all(r[2] == "answered" for r in before), [r for r in before if r[2] != "answered"][:3]
    assert drained, "nothing was sent and served during the drain"
    assert max(r[1] for r in before) > stopping[0], "no request was in flight when Triton was told to stop"
    assert stop_s < 5.0 + 10.0, log  # --drain-timeout (default 5 s) and the stop itself
