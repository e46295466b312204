"""Start, check and stop the embedded Triton server (the ``tritonserver`` in the nvidia-pytriton wheel).

Triton's own HTTP server listens on a loopback port, its inference API restricted to a key; the public HTTP
port is served by the front in :mod:`.front`, which checks inference requests before relaying them (Triton
2.51 aborts on some malformed ones) and terminates TLS.

The wheel ships the server binary, the python backend and one backend *stub* per Python version. This
module assembles a backend directory from them (the stub for the running Python, plus this project's
``onnxruntime_python`` backend), and starts the server with this virtual environment first on ``PATH``:
the stub's embedded Python ignores ``PYTHONPATH`` but finds its ``sys.prefix`` from the first ``python3``
on ``PATH``, so it runs in this environment, with its numpy 1.x and onnxruntime.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from braintumor.config import DEFAULT_MODEL_REPOSITORY
from braintumor.model_repository import CONFIG_FILE, CPU_CONFIG_NAME, versions
from braintumor_serving.front import FRONT_KEY_HEADER, HttpFront, new_key, server_context
from braintumor_serving.lifecycle import (
    WORKDIR_PREFIX,
    Cleanup,
    Watchdog,
    backend_config,
    clean_stale,
    cleanup,
    new_prefix,
    parent_death_signal,
    region_files,
    server_processes,
)

BACKEND_NAME = "onnxruntime_python"
#: Triton APIs that only callers sending the admin key may use (everything but health, metadata,
#: model configuration and inference).
RESTRICTED_APIS = "model-repository,shared-memory,statistics,trace,logging"
#: The header (HTTP) or metadata key (gRPC) carrying the admin key.
ADMIN_KEY_HEADER = "admin-key"
BACKEND_SOURCE = Path(__file__).parent / "backends" / BACKEND_NAME / "model.py"
#: Seconds ``braintumor serve`` waits at most, on SIGTERM or SIGINT, for the requests in flight to finish before
#: it stops Triton (``--drain-timeout``).
DRAIN_TIMEOUT = 5.0
#: Seconds without a request pending or completing that count as idle while draining.
DRAIN_QUIET = 1.0
#: What Triton 2.51 logs on SIGTERM once the inference requests in flight have finished and it has stopped every
#: model's scheduler: it then unloads the models (about 4 s for the python backend's stubs) and answers
#: ``NOT_FOUND ... has no available versions`` to every request until its endpoints close.
MODELS_STOPPED = "All models are stopped, unloading models"
#: The line Triton 2.51 logs right after :data:`MODELS_STOPPED` (then once a second while unloading), e.g.
#: ``Timeout 30: Found 1 live models and 0 in-flight non-inference requests``: the SIGKILL comes only when it says 0
#: (a metadata, readiness or repository call still in flight would otherwise be cut off).
IN_FLIGHT = re.compile(r"Found (\d+) live models and (\d+) in-flight non-inference requests")
#: Seconds between :data:`MODELS_STOPPED` and the SIGKILL: the gRPC endpoint sends the last answers it holds.
FLUSH_GRACE = 0.2


class ServeError(RuntimeError):
    """The server cannot start: a port is taken, the repository or the Python environment is wrong."""


@dataclass(frozen=True)
class TritonBundle:
    """Where the nvidia-pytriton wheel keeps the server.

    Args:
        binary: the ``tritonserver`` executable.
        python_backend: the folder with ``libtriton_python.so`` and ``triton_python_backend_utils.py``.
        stub: the python backend stub built for this Python version.
        libraries: the wheel's shared libraries (for ``LD_LIBRARY_PATH``).
    """

    binary: Path
    python_backend: Path
    stub: Path
    libraries: Path


def find_bundle() -> TritonBundle:
    """Locate the server in the installed nvidia-pytriton wheel.

    Raises:
        ServeError: when the wheel, or its stub for this Python, is missing.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("nvidia-pytriton is not installed: pip install -e '.[serve]'")
    root = Path(next(iter(spec.submodule_search_locations)))
    server = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = TritonBundle(
        binary=server / "bin" / "tritonserver",
        python_backend=server / "backends" / "python",
        stub=server / "python_backend_stubs" / version / "triton_python_backend_stub",
        libraries=root.parent / "nvidia_pytriton.libs",
    )
    for path in (bundle.binary, bundle.python_backend / "libtriton_python.so", bundle.stub, bundle.libraries):
        if not path.exists():
            raise ServeError(f"the nvidia-pytriton bundle is incomplete: {path} not found (Python {version})")
    return bundle


def prepare_backend_directory(bundle: TritonBundle, destination: Path) -> Path:
    """Assemble a Triton backend directory: the python backend with its stub, and ``onnxruntime_python``.

    Files are copied, not linked: Triton refuses a backend library whose real path leaves the directory.
    """
    python = destination / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(bundle.python_backend / name, python / name)
    shutil.copy2(bundle.stub, python / bundle.stub.name)
    ours = destination / BACKEND_NAME
    ours.mkdir(exist_ok=True)
    shutil.copy2(BACKEND_SOURCE, ours / "model.py")
    return destination


def check_python_environment(bin_dir: Path) -> str:
    """Check the Python that the backend stub will embed: ``bin_dir/python3`` must have numpy 1.x and
    onnxruntime (the stub is built against numpy 1.x and silently corrupts tensors with numpy 2).

    Returns:
        The numpy version found.

    Raises:
        ServeError: with what is wrong and how to fix it.
    """
    python = bin_dir / "python3"
    if not python.exists():
        raise ServeError(f"{python} not found: run braintumor from the project's virtual environment")

    def run(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)

    def last_line(text: str) -> str:
        return text.strip().splitlines()[-1] if text.strip() else "unknown error"

    probe = run("import numpy; print(numpy.__version__)")
    if probe.returncode != 0:
        raise ServeError(f"the server's Python environment ({python}) has no numpy: {last_line(probe.stderr)}")
    numpy_version = probe.stdout.strip()
    if int(numpy_version.split(".")[0]) >= 2:
        raise ServeError(
            f"the server's Python environment ({python}) has numpy {numpy_version}; Triton's python backend "
            "stub is built against numpy 1.x and would corrupt tensors. Install numpy<2 there."
        )
    probe = run("import onnxruntime")
    if probe.returncode != 0:
        raise ServeError(f"the server's Python environment ({python}) lacks onnxruntime: {last_line(probe.stderr)}")
    return numpy_version


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise :class:`ServeError` when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServeError(
                f"{what} port {port} on {host} is already in use ({err.strerror}); stop the other server or "
                f"choose another port (--{what.lower()}-port)"
            ) from err


def child_pids(pid: int) -> list[int]:
    """The living children of a process (Linux ``/proc``; empty when it is gone): ``tritonserver``'s are the
    python backend's stubs, nginx's master's its workers.

    Args:
        pid: the parent process.
    """
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that are free on ``host`` right now (for servers started on spare ports)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def terminate(process: subprocess.Popen, timeout: float) -> int | None:
    """Stop a child gracefully with SIGTERM, SIGKILL it after ``timeout``; returns its exit status.

    Args:
        process: the child (already ended is fine).
        timeout: seconds to wait for the graceful exit.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def http_ready(http_url: str, timeout: float = 1.0) -> bool:
    """Whether a Triton HTTP endpoint answers ``/v2/health/ready`` with 200 (every model loaded and warmed up).

    Args:
        http_url: ``host:port`` of the HTTP endpoint.
        timeout: seconds to wait for the answer.
    """
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def read_metric(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of the samples of one Prometheus metric (those matching ``labels``) read from ``metrics_url``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name  # the parser names counter samples <name>_total
        for sample in family.samples
        if all(sample.labels.get(k) == v for k, v in labels.items())
    )


def check_tls(config: ServerConfig) -> None:
    """Raise :class:`ServeError` unless the TLS options are complete and their files readable."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ServeError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    if config.tls_client_ca and config.tls_cert is None:
        raise ServeError("mutual TLS (--tls-client-ca) needs --tls-cert and --tls-key too")
    for path in (config.tls_cert, config.tls_key, config.tls_client_ca):
        if path is not None and not Path(path).is_file():
            raise ServeError(f"TLS file {path} not found")


def check_repository(repository: Path, config_name: str | None) -> dict[str, list[int]]:
    """Check the model repository's layout; returns the published versions of each model.

    Raises:
        ServeError: when the folder is missing, holds no model, or a model lacks its configuration or versions.
    """
    if not repository.is_dir():
        raise ServeError(f"model repository {repository} not found")
    models: dict[str, list[int]] = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        configs = [model_dir / CONFIG_FILE]
        if config_name:
            configs.insert(0, model_dir / "configs" / f"{config_name}.pbtxt")
        if not any(c.exists() for c in configs):
            raise ServeError(f"model {model_dir.name} has no configuration ({' or '.join(map(str, configs))})")
        published = versions(model_dir)
        if not published:
            raise ServeError(f"model {model_dir.name} in {repository} has no numbered version folder")
        models[model_dir.name] = published
    if not models:
        raise ServeError(f"model repository {repository} holds no model")
    return models


@dataclass
class ServerConfig:
    """How to run the embedded server.

    Args:
        repository: the model repository.
        host: address every endpoint binds to (loopback by default).
        http_port, grpc_port, metrics_port: the three endpoints' ports.
        model_config_name: the ``configs/<name>.pbtxt`` to use (``cpu`` for this server's backend).
        log_file: where the server's own log goes (default: a file in its temporary folder).
        internal_http_port: the loopback port of Triton's own HTTP server, behind the front (:mod:`.front`)
            that serves ``host:http_port``; 0 picks a free one at every start (the port in use is
            :attr:`TritonServer.internal_http_port`; the configuration is never changed).
        tls_cert, tls_key: PEM files: serve gRPC (natively) and HTTP (the front) over TLS.
        tls_client_ca: PEM file of the CA that signs client certificates: mutual TLS (needs the above).
        admin_key: the key that unlocks the administrative APIs (:data:`RESTRICTED_APIS`); by default a
            random key made at start, so they are closed to network clients.
        inference_key: the key that Triton's HTTP inference API requires; random, given only to the front,
            which adds it to the inference requests it has checked.

    Both keys reach ``tritonserver`` as command-line arguments (it takes them no other way), so any local
    user of the host can read them (``ps``, ``/proc/<pid>/cmdline``) and, with them, reach the
    administrative APIs and Triton's unchecked HTTP inference port on loopback. Local users of the host are
    trusted; in Kubernetes the container isolates the process from other users.
        extra_args: further ``tritonserver`` arguments.
        drain_timeout: seconds ``serve`` waits at most, on SIGTERM or SIGINT, for the requests in flight to
            finish (readiness answering 503 meanwhile) before it stops Triton; 0 stops it at once.
    """

    repository: Path = DEFAULT_MODEL_REPOSITORY
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_config_name: str | None = CPU_CONFIG_NAME
    log_file: Path | None = None
    internal_http_port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    inference_key: str = field(default_factory=new_key, repr=False)
    extra_args: list[str] = field(default_factory=list)
    drain_timeout: float = DRAIN_TIMEOUT

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint."""
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics endpoint."""
        return f"http://{self.host}:{self.metrics_port}/metrics"


class TritonServer:
    """A running embedded Triton server; a context manager that stops it on exit.

    Args:
        config: how to run it.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.models: dict[str, list[int]] = {}
        self._workdir: Path | None = None
        self._front: HttpFront | None = None
        self._watchdog: Watchdog | None = None
        self.log_file: Path | None = None
        #: The loopback port of Triton's own HTTP server, behind the front (chosen at start when the
        #: configuration says 0).
        self.internal_http_port = config.internal_http_port
        #: This server's shared-memory region prefix (new at every start; see :mod:`.lifecycle`).
        self.shm_prefix = ""
        #: What the start removed that earlier servers of this project had left behind.
        self.stale = Cleanup()
        #: What :meth:`stop` had to kill or remove after ``tritonserver`` ended (stubs, regions).
        self.leftovers = Cleanup()
        #: Whether the last :meth:`stop` ended ``tritonserver`` once its in-flight requests had finished, without
        #: waiting for it to unload the models.
        self.unload_skipped = False

    @property
    def local_http_url(self) -> str:
        """``host:port`` of Triton's own, plain HTTP endpoint, on loopback behind the front."""
        return f"127.0.0.1:{self.internal_http_port}"

    @property
    def local_metrics_url(self) -> str:
        """Triton's metrics as this host reaches them (loopback when the server binds every address)."""
        c = self.config
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(c.host, c.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{c.metrics_port}/metrics"

    def command(self, backend_directory: Path) -> list[str]:
        """The ``tritonserver`` command line."""
        c = self.config
        args = [
            f"--model-repository={c.repository.resolve()}",
            f"--backend-directory={backend_directory}",
            "--http-address=127.0.0.1",
            f"--http-port={self.internal_http_port}",
            f"--grpc-address={c.host}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}",
            f"--metrics-port={c.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            "--model-control-mode=none",
            f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_KEY_HEADER}={c.admin_key}",
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_KEY_HEADER}={c.admin_key}",
            f"--http-restricted-api=inference:{FRONT_KEY_HEADER}={c.inference_key}",
        ]
        if self.shm_prefix:
            args.append(backend_config(self.shm_prefix))
        if c.model_config_name:
            args.append(f"--model-config-name={c.model_config_name}")
        if c.tls_cert is not None:
            args += [f"--grpc-server-cert={c.tls_cert}", f"--grpc-server-key={c.tls_key}"]
            if c.tls_client_ca:
                args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={c.tls_client_ca}"]
            else:
                args.append("--grpc-use-ssl=true")
        return [str(find_bundle().binary), *args, *c.extra_args]

    def start(self) -> TritonServer:
        """Check everything, remove what earlier servers of this project left behind (:attr:`stale`), then
        start the server (without waiting for it to be ready).

        ``tritonserver`` ends when this process ends (parent-death signal), and a watchdog process removes
        its stubs and shared memory when either ends (see :mod:`.lifecycle`).

        Raises:
            ServeError: when a check fails.
        """
        c = self.config
        bundle = find_bundle()
        check_tls(c)
        self.models = check_repository(c.repository, c.model_config_name)
        bin_dir = Path(sys.executable).parent
        check_python_environment(bin_dir)
        self.stale = clean_stale()  # before the port checks: a stale server may hold the ports
        for what, port in (("HTTP", c.http_port), ("gRPC", c.grpc_port), ("metrics", c.metrics_port)):
            check_port_free(c.host, port, what)
        try:  # whatever fails from here on, nothing started is left running (front, tritonserver, watchdog)
            self._start(bundle, bin_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, bundle: TritonBundle, bin_dir: Path) -> None:
        c = self.config
        self.internal_http_port = c.internal_http_port or free_ports(1)[0]
        scheme = "HTTPS" if c.tls_cert is not None else "HTTP"
        try:
            context = None if c.tls_cert is None else server_context(c.tls_cert, c.tls_key, c.tls_client_ca)
        except (OSError, ssl.SSLError) as err:
            raise ServeError(f"cannot serve {scheme} on {c.host}:{c.http_port}: {err}") from err
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        backends = prepare_backend_directory(bundle, self._workdir / "backends")
        self.log_file = c.log_file or self._workdir / "tritonserver.log"
        env = dict(os.environ)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(bundle.libraries), env.get("LD_LIBRARY_PATH")]))
        self.shm_prefix = new_prefix()
        # tritonserver first, then the front's threads: its preexec_fn runs between fork and exec, which is
        # only safe while this process has no other threads of its own
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                self.command(backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl+C reaches serve, which stops Triton gracefully
                preexec_fn=parent_death_signal(),
            )
        self._watchdog = Watchdog(self.shm_prefix, self.process.pid, self._workdir if c.log_file is None else None)
        try:
            self._front = HttpFront(
                (c.host, c.http_port), ("127.0.0.1", self.internal_http_port), c.inference_key, context
            ).start()
        except OSError as err:
            raise ServeError(f"cannot serve {scheme} on {c.host}:{c.http_port}: {err}") from err

    def is_ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200 (every model loaded and warmed up)."""
        return http_ready(self.local_http_url)

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Wait for readiness.

        Raises:
            ServeError: when the server exits first (with the errors from its log) or ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServeError(f"tritonserver exited (status {code}) before it was ready:\n{self.errors()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServeError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.errors()}")

    def errors(self) -> str:
        """The error lines of the server's log (model load failures, bad configuration, …)."""
        if not self.log_file or not self.log_file.exists():
            return ""
        lines = self.log_file.read_text(errors="replace").splitlines()
        keep = [
            line
            for line in lines
            if ("UNAVAILABLE" in line or "rror" in line) and "NVML" not in line and "DCGM" not in line
        ]
        return "\n".join(keep[-20:] or lines[-20:])

    def last_error(self) -> str:
        """The last error line of the server's log, or ``""``."""
        if not self.log_file or not self.log_file.exists():
            return ""
        lines = self.log_file.read_text(errors="replace").splitlines()
        errors = [line for line in lines if ("UNAVAILABLE" in line or "rror" in line) and "NVML" not in line]
        return errors[-1].strip() if errors else ""

    def start_draining(self) -> None:
        """Answer 503 on readiness (``/v2/health/ready`` and each model's) from now on, so that balancers and
        Kubernetes take the server out, while every request is still served."""
        if self._front is not None:
            self._front.draining = True

    def drain(self, timeout: float, quiet: float = DRAIN_QUIET, interrupted: Callable[[], bool] | None = None) -> str:
        """Prepare a graceful stop: :meth:`start_draining`, then wait until no request is in flight (Triton's
        metrics: nothing pending, nothing completing for ``quiet`` seconds).

        Triton's own gRPC readiness cannot be changed: gRPC clients keep sending until :meth:`stop`.

        Args:
            timeout: seconds to wait at most.
            quiet: seconds without activity that count as idle.
            interrupted: ends the wait at once when it returns ``True`` (a second signal).

        Returns:
            How the wait ended (:func:`braintumor_serving.drain.wait_for_idle`): ``"idle"`` (also when the
            server is not running), ``"busy"`` at the timeout, ``"unreadable"`` when the metrics cannot be read,
            ``"interrupted"``.
        """
        from braintumor_serving.drain import IDLE, wait_for_idle

        self.start_draining()
        if self.process is None or self.process.poll() is not None:
            return IDLE
        return wait_for_idle(self.local_metrics_url, quiet=quiet, timeout=timeout, interrupted=interrupted)

    def _terminate(self, timeout: float) -> int | None:
        """SIGTERM ``tritonserver``; once it logs :data:`MODELS_STOPPED` (every inference request in flight has
        finished) followed by :data:`IN_FLIGHT` saying 0 non-inference requests are in flight, SIGKILL it rather than
        let it unload the models for seconds while answering ``NOT_FOUND``; when that line counts some, let Triton
        finish them and stop by itself. SIGKILL it after ``timeout`` in any case."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        log = self.log_file if self.log_file and self.log_file.exists() else None
        offset = log.stat().st_size if log else 0
        tail = ""
        stopped: bool | None = None  # MODELS_STOPPED not seen yet; then whether to kill once IN_FLIGHT says 0
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if log is not None:
                with open(log, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                text = tail + data.decode(errors="replace")
                if stopped is None and MODELS_STOPPED in text:
                    stopped, text = True, text[text.index(MODELS_STOPPED) + len(MODELS_STOPPED) :]
                if stopped and (found := IN_FLIGHT.search(text)):
                    if int(found.group(2)) == 0:  # nothing else in flight: skip the unload
                        self.unload_skipped = True
                        time.sleep(FLUSH_GRACE)
                        break
                    stopped = False  # calls still in flight: let Triton finish them, unload and exit itself
                keep = 200 if stopped else len(MODELS_STOPPED)
                tail = text[-keep:]  # a line written in two pieces is still found
            time.sleep(0.02)
        if process.poll() is None:
            process.kill()
        process.wait()
        return process.returncode

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server with SIGTERM (graceful: in-flight requests finish), then, once they have, SIGKILL
        (Triton would spend seconds unloading the models, answering ``NOT_FOUND`` to every request meanwhile:
        see :attr:`unload_skipped`), or after ``timeout`` in any case; then kill what is left of it (stubs
        ignore SIGTERM and may outlive a killed server) and remove its shared-memory regions (recorded in
        :attr:`leftovers`). Safe to call more than once.

        Args:
            timeout: seconds to wait for the requests in flight to finish.

        Returns:
            The server's exit status (``-9`` when the unload was skipped).
        """
        code = None
        if self.process is not None:
            code = self._terminate(timeout)
        if self.shm_prefix:
            left = cleanup(self.shm_prefix)
            self.leftovers = Cleanup(self.leftovers.killed + left.killed, self.leftovers.regions + left.regions)
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        if self._front is not None:
            self._front.stop()
            self._front = None
        if self._workdir and self.config.log_file is None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return code

    def __enter__(self) -> TritonServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class RestartPolicy:
    """What ``braintumor serve`` does when ``tritonserver`` dies under it (``--restart``).

    Args:
        on_failure: restart it (``--restart on-failure``); otherwise ``serve`` exits with status 1.
        limit: at most this many restarts in a row (``--restart-limit`` or ``on-failure:N``).
        backoff: seconds before the first restart; doubled before each further one.
        max_backoff: the longest wait between restarts.
        reset_after: a server that served this many seconds resets the count and the backoff.
    """

    on_failure: bool = False
    limit: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    reset_after: float = 600.0

    def delay(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1, 2, ...).

        Args:
            restart: which restart in a row.
        """
        return min(self.max_backoff, self.backoff * 2 ** (restart - 1))


def restart_limit(value: str) -> int:
    """Parse a restart limit: a whole number, 0 or more.

    Args:
        value: what the user wrote.

    Raises:
        ValueError: with a message that says what is accepted.
    """
    text = value.strip()
    if not re.fullmatch(r"[0-9]{1,18}", text):  # ASCII digits: str.isdigit takes '²', which int() refuses
        raise ValueError(f"the restart limit must be a whole number, 0 or more (got {value!r})")
    return int(text)


def restart_policy(restart: str, limit: str | None = None) -> RestartPolicy:
    """The policy of ``--restart no|on-failure|on-failure:N`` and ``--restart-limit N``.

    Args:
        restart: the ``--restart`` value.
        limit: the ``--restart-limit`` value, or ``None``.

    Raises:
        ValueError: on an unknown mode, a negative or non-numeric limit, or a limit given twice.
    """
    mode, colon, inline = restart.strip().partition(":")
    if mode not in ("no", "on-failure"):
        raise ValueError(f"--restart takes 'no', 'on-failure' or 'on-failure:N' (got {restart!r})")
    if mode == "no":
        if colon or limit is not None:
            raise ValueError("a restart limit needs --restart on-failure")
        return RestartPolicy()
    if colon and limit is not None:
        raise ValueError("give the restart limit once: --restart on-failure:N or --restart-limit N")
    chosen = inline if colon else limit
    return RestartPolicy(on_failure=True, limit=RestartPolicy.limit if chosen is None else restart_limit(chosen))


def describe_exit(code: int | None) -> str:
    """``"exit status 1"`` or ``"killed by SIGKILL"`` for a process's return code.

    Args:
        code: :attr:`subprocess.Popen.returncode`.
    """
    if code is None:
        return "status unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def serve(config: ServerConfig, ready_timeout: float = 180.0, restart: RestartPolicy | None = None) -> int:
    """Run the server in the foreground until SIGINT or SIGTERM; returns the exit status for the CLI.

    When ``tritonserver`` dies under it, ``serve`` says so in one line, removes its stubs and shared memory,
    and exits with status 1, or with ``restart.on_failure`` starts it again after a backoff (at most
    ``restart.limit`` times in a row). ``tritonserver`` also ends when this process is killed (see
    :mod:`.lifecycle`).

    Args:
        config: how to run the server.
        ready_timeout: seconds to wait for readiness at each start.
        restart: what to do when ``tritonserver`` dies (default: exit).

    Returns:
        0 after a stop by signal, 1 when ``tritonserver`` died (and was not, or no longer, restarted),
        2 when the first start failed.
    """
    from braintumor_serving.drain import BUSY, INTERRUPTED, UNREADABLE

    policy = restart or RestartPolicy()
    stopping: list[int] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    def _sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _stop(server: TritonServer) -> int:
        server.start_draining()  # readiness answers 503 even without a drain (--drain-timeout 0)
        if config.drain_timeout > 0:
            print(
                f"Draining: readiness answers 503; waiting at most {config.drain_timeout:g} s for the requests in "
                "flight (a second signal cuts it short) ...",
                flush=True,
            )
            outcome = server.drain(config.drain_timeout, interrupted=lambda: len(stopping) > 1)
            if outcome == BUSY:
                print(f"Still busy after {config.drain_timeout:g} s (--drain-timeout).", flush=True)
            elif outcome == UNREADABLE:
                print(
                    f"Cannot read Triton's metrics ({server.local_metrics_url}): the requests in flight are unknown; "
                    "not waiting for them.",
                    flush=True,
                )
            elif outcome == INTERRUPTED:
                print("Drain cut short by a second signal.", flush=True)
        else:
            print("Readiness answers 503; not waiting for the requests in flight (--drain-timeout 0).", flush=True)
        print("Stopping Triton (waiting for in-flight requests) ...", flush=True)
        code = server.stop()
        if server.unload_skipped:
            print("Stopped (in-flight requests finished; Triton ended before unloading the models).", flush=True)
        else:
            print(f"Stopped (tritonserver exit status {code}).", flush=True)
        return 0

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server: TritonServer | None = None
    restarts, served = 0, False
    try:
        while True:
            server = TritonServer(config)  # a fresh one, with a free internal port, at every start
            up_since = time.monotonic()
            try:
                server.start()
                if server.stale:
                    print(f"braintumor serve: removed {server.stale.describe()} left by an earlier server", flush=True)
                print(
                    f"Starting Triton on {config.host} (log: {server.log_file}; shared memory: "
                    f"/dev/shm/{server.shm_prefix}*) ...",
                    flush=True,
                )
                deadline = time.monotonic() + ready_timeout
                while not stopping and not server.is_ready():
                    if server.process is None or server.process.poll() is not None or time.monotonic() > deadline:
                        server.wait_until_ready(0)  # raises with the server's errors
                    time.sleep(0.2)
            except ServeError as err:
                server.stop()
                if not served:
                    print(f"braintumor serve: {err}", file=sys.stderr)
                    return 2
                reason = str(err).splitlines()[0]
                print(f"braintumor serve: the restarted tritonserver failed: {reason}", file=sys.stderr, flush=True)
            else:
                if stopping:
                    return _stop(server)
                if restarts:
                    print(f"braintumor serve: tritonserver is serving again (restart {restarts})", flush=True)
                else:
                    _print_ready(server)
                served, up_since = True, time.monotonic()
                while not stopping and server.process is not None and server.process.poll() is None:
                    time.sleep(0.2)
                if stopping:
                    return _stop(server)
                status = describe_exit(server.process.returncode if server.process else None)
                error = server.last_error()
                server.stop()
                procs, regions = server_processes(server.shm_prefix), region_files(server.shm_prefix)
                left = (
                    f"{len(procs)} of its processes and {len(regions)} of its shared-memory regions are still there"
                    if procs or regions
                    else "its stubs and shared-memory regions are removed"
                )
                print(
                    f"braintumor serve: tritonserver died ({status}); {left}"
                    + (f"; last error in its log: {error}" if error else ""),
                    file=sys.stderr,
                    flush=True,
                )
            if not policy.on_failure:
                return 1
            if time.monotonic() - up_since >= policy.reset_after:
                restarts = 0
            if restarts >= policy.limit:
                print(
                    f"braintumor serve: giving up after {restarts} restart{'s' if restarts != 1 else ''} "
                    f"(restart limit {policy.limit})",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
            restarts += 1
            delay = policy.delay(restarts)
            print(
                f"braintumor serve: restarting tritonserver in {delay:g} s (restart {restarts} of at most "
                f"{policy.limit})",
                file=sys.stderr,
                flush=True,
            )
            _sleep(delay)
            if stopping:
                return 0
    finally:
        if server is not None:
            server.stop()  # whatever happened here (a closed stdout, an error), never leave Triton running
        for s, handler in previous.items():
            signal.signal(s, handler)


def ready_models(http_url: str, admin_key: str) -> dict[str, list[int]]:
    """The model versions the server reports READY (Triton's repository index, a restricted API)."""
    request = urllib.request.Request(
        f"http://{http_url}/v2/repository/index", data=b"{}", method="POST", headers={ADMIN_KEY_HEADER: admin_key}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        index = json.loads(response.read())
    ready: dict[str, list[int]] = {}
    for entry in index:
        if entry.get("state") == "READY":
            ready.setdefault(entry["name"], []).append(int(entry["version"]))
    return {name: sorted(v) for name, v in sorted(ready.items())}


def _print_ready(server: TritonServer) -> None:
    config = server.config
    models = ready_models(server.local_http_url, config.admin_key)
    served = ", ".join(f"{name} (versions {', '.join(map(str, v))})" for name, v in models.items())
    name = next(iter(models), "braintumor")
    print(
        f"Triton is ready: {served}\n"
        f"  gRPC     {config.grpc_url}{' (TLS)' if config.tls_cert else ''}\n"
        f"  HTTP     {'https' if config.tls_cert else 'http'}://{config.http_url}   e.g. curl "
        f"{'https' if config.tls_cert else 'http'}://{config.http_url}/v2/models/{name}\n"
        f"  metrics  {config.metrics_url}\n"
        "Press Ctrl+C to stop.",
        flush=True,
    )
