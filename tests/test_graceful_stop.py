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

import http.server
import itertools
import os
import re
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
        # two resends per server at most, waiting 50 ms, then 100, 200, 400 ms
        fn = Flaky(STOPPING, UNLOADING, UNLOADING_VERSION, STOPPING)
        started = time.monotonic()
        assert _call(client, fn) == "answer" and fn.calls == 5
        assert time.monotonic() - started >= 15 * STOPPING_RETRY_DELAY
        fn = Flaky(*[STOPPING] * 5)
        with pytest.raises(ServerUnavailableError, match="Server is stopping"):  # the fifth: no more resends
            _call(client, fn)
        assert fn.calls == 5
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
        assert 2 <= fn.calls <= 3  # resent after 50 and 100 ms (unless stalled); a wait of 200 ms would pass it
    finally:
        client.close()


class Refusing:
    """Every server refuses (a stopping server's answer) after ``seconds``; records each try's deadline."""

    def __init__(self, request: dict, seconds: float, error: Exception = STOPPING) -> None:
        self.request, self.seconds, self.error = request, seconds, error
        self.deadlines: list[float] = []

    def __call__(self) -> str:
        self.deadlines.append(self.request["client_timeout"])
        time.sleep(min(self.seconds, self.request["client_timeout"]))
        raise self.error


@pytest.mark.parametrize(("error", "raised"), [(STOPPING, ServerUnavailableError), (UNLOADING, ModelNotReadyError)])
def test_a_call_whose_servers_all_refuse_ends_by_its_timeout(error, raised):
    client = TumorClassifier("127.0.0.1:1,127.0.0.2:1,127.0.0.3:1", retries=2, backoff=0.2, timeout=1.5, check=False)
    try:
        request = {"client_timeout": client.timeout}
        fn = Refusing(request, 0.25, error)
        started = time.monotonic()
        with pytest.raises(raised, match=str(error.message())[-20:]):
            client._call(fn, "testing", balanced=True, request=request)
        took = time.monotonic() - started
    finally:
        client.close()
    assert took <= client.timeout + 0.5, (took, fn.deadlines)  # scheduling on two shared cores, not a resend
    assert len(fn.deadlines) <= 2 * 3 + 2 + 1  # resends capped at two per server, then the ordinary retries
    assert fn.deadlines[0] == client.timeout and all(d < client.timeout for d in fn.deadlines[1:]), fn.deadlines
    assert fn.deadlines == sorted(fn.deadlines, reverse=True)  # each resend: the time left of the call


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


#: A stand-in for ``tritonserver`` on SIGTERM: the two lines Triton 2.51 logs (as in a real log), then it unloads
#: for a while and exits by itself.
FAKE_TRITON = """
import signal, sys, time
log = sys.argv[1]
def stop(*_):
    with open(log, "a") as f:
        f.write('I1129 19:35:49.880537 5231 server.cc:336] "All models are stopped, unloading models"\\n')
        f.flush()
        time.sleep(0.05)
        f.write('I1129 19:35:49.880545 5231 server.cc:345] "Timeout 30: Found 1 live models and '
                + sys.argv[2] + ' in-flight non-inference requests"\\n')
    time.sleep(1.5)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[3], "w").close()
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize(("in_flight", "killed"), [("0", True), ("2", False)])
def test_triton_is_killed_after_the_models_stop_only_when_nothing_else_is_in_flight(in_flight, killed, tmp_path):
    import subprocess
    import sys

    from braintumor_serving.triton import ServerConfig, TritonServer

    server = TritonServer(ServerConfig(repository=tmp_path))
    server.log_file = tmp_path / "triton.log"
    server.log_file.write_text("I1129 started\n")
    started = tmp_path / "started"
    script = tmp_path / "fake_triton.py"
    script.write_text(FAKE_TRITON)
    server.process = subprocess.Popen([sys.executable, str(script), str(server.log_file), in_flight, str(started)])
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and server.process.poll() is None
        time.sleep(0.02)
    begun = time.monotonic()
    code = server._terminate(10)
    took = time.monotonic() - begun
    assert server.unload_skipped is killed
    if killed:
        assert code == -signal.SIGKILL and took < 1.2, (code, took)
    else:  # non-inference calls still in flight: Triton finishes them and exits by itself
        assert code == 0 and took >= 1.4, (code, took)


class _Busy(http.server.BaseHTTPRequestHandler):
    """Triton's metrics with one request pending, for ever."""

    def do_GET(self) -> None:
        body = b'nv_inference_pending_request_count{model="braintumor",version="3"} 1\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve_with_a_fake_triton(monkeypatch, drain_timeout: float, metrics_port: int, signals: tuple[float, ...]):
    """Run ``triton.serve`` over a stand-in server (ready at once, its drain the real one, reading metrics from
    ``metrics_port``), sending SIGTERM to this process after each of ``signals`` seconds; returns the stand-in and
    the seconds serve took."""
    from braintumor_serving import triton

    class Front:
        draining = False

    class Process:
        returncode = None

        def poll(self) -> int | None:
            return self.returncode

    class Fake(triton.TritonServer):
        def start(self) -> Fake:
            self.process, self._front, self.shm_prefix = Process(), Front(), "braintumor-fake-"  # type: ignore[assignment]
            return self

        def is_ready(self) -> bool:
            return True

        def stop(self, timeout: float = 30.0) -> int | None:
            if self.process is not None:
                self.process.returncode = 0
            return 0

    made: list[Fake] = []

    def fake(config):
        made.append(Fake(config))
        return made[-1]

    config = triton.ServerConfig(metrics_port=metrics_port, drain_timeout=drain_timeout, host="127.0.0.1")
    timers = [threading.Timer(t, os.kill, (os.getpid(), signal.SIGTERM)) for t in signals]
    with monkeypatch.context() as patched:
        patched.setattr(triton, "TritonServer", fake)
        patched.setattr(triton, "_print_ready", lambda server: print("Triton is ready", flush=True))
        for timer in timers:
            timer.start()
        started = time.monotonic()
        try:
            assert triton.serve(config) == 0
        finally:
            for timer in timers:
                timer.join()
    return made[0], time.monotonic() - started


def test_serve_reports_a_drain_that_cannot_read_the_metrics_and_a_busy_one_apart(monkeypatch, capsys):
    (closed,) = free_ports(1)
    server, _ = _serve_with_a_fake_triton(monkeypatch, 5.0, closed, (0.3,))
    out = capsys.readouterr().out
    assert server._front.draining and "Cannot read Triton's metrics" in out and "Still busy" not in out, out
    busy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    try:
        server, took = _serve_with_a_fake_triton(monkeypatch, 1.0, busy.server_address[1], (0.3,))
        out = capsys.readouterr().out
        assert "Still busy after 1 s" in out and "Cannot read" not in out, out
        # a second signal cuts a long drain short
        server, took = _serve_with_a_fake_triton(monkeypatch, 30.0, busy.server_address[1], (0.3, 1.0))
        out = capsys.readouterr().out
        assert "Drain cut short by a second signal" in out and took < 10, (out, took)
    finally:
        busy.shutdown()


def test_serve_without_a_drain_still_answers_not_ready(monkeypatch, capsys):
    (closed,) = free_ports(1)
    server, _ = _serve_with_a_fake_triton(monkeypatch, 0.0, closed, (0.3,))
    out = capsys.readouterr().out
    assert server._front.draining and "--drain-timeout 0" in out and "Draining" not in out, out


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


def _assert_nothing_left(log: str) -> None:
    """No process (``tritonserver``, a stub) and no shared-memory region of the server whose ``serve`` output is
    ``log`` is left."""
    from braintumor_serving.lifecycle import region_files, server_processes

    prefixes = re.findall(r"shared memory: /dev/shm/(\S+)\*", log)
    assert prefixes, log
    for prefix in prefixes:
        assert server_processes(prefix) == [], (prefix, server_processes(prefix))
        assert region_files(prefix) == [], (prefix, region_files(prefix))


#: Seconds before ``serve`` stops Triton that a request must have been sent to count as reaching it first
#: (a 2.4 MB request may take a while to leave a busy client, and the log watcher shares the GIL with the load).
MARGIN = 1.0
#: How a request that reached a stopping server may end: the SDK's errors for Triton's refusals while it stops
#: (``Server is stopping``, a version not at ready state) and for no server at all (refused or closed
#: connections, whatever gRPC's wording), never another error.
STOPPING_ERRORS = ("ServerUnavailableError: ", "ModelNotReadyError: ")


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
    _assert_nothing_left(log)
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
    _assert_nothing_left(log)
    assert before and all(r[2] == "answered" for r in before), [r for r in before if r[2] != "answered"][:3]
    assert drained, "nothing was sent and served during the drain"
    with ledger.lock:
        finished_after = [r for r in ledger.records if r[2] == "answered" and r[1] > stopping[0]]
        unexpected = [r for r in ledger.records if r[2] != "answered" and not r[3].startswith(STOPPING_ERRORS)]
    assert finished_after, "no request in flight when Triton was told to stop finished after it"
    assert not unexpected, unexpected[:3]  # nothing wrong, nothing but a stopping server's clear refusals
    assert stop_s < 5.0 + 10.0, log  # --drain-timeout (default 5 s) and the stop itself
