"""Shared by the balancer and rollout tests: certificates, replicas of ``braintumor serve`` on 127.0.0.1 and
127.0.0.2, nginx on 127.0.0.3, and a load of plain ``tritonclient`` gRPC and ``curl`` requests through
nginx whose every request ends in the ledger."""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from helpers import free_ports

from braintumor.config import INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from braintumor_serving.balancer import Balancer, BalancerConfig, Replica
from braintumor_serving.rollout import ServeReplica

REPLICA_HOSTS = ("127.0.0.1", "127.0.0.2")
BALANCER_HOST = "127.0.0.3"
NOBODY = (65534, 65534)


def make_certificates(folder: Path) -> Path:
    """A CA and a server certificate for ``BALANCER_HOST``, made with openssl into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=braintumor test CA")  # fmt: skip
    (folder / "server.ext").write_text(f"subjectAltName=IP:{BALANCER_HOST}\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=lb")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "server.ext",
    )  # fmt: skip
    return folder


def start_replicas(repository: Path, logs: Path, admin_key: str) -> list[ServeReplica]:
    """Start one ``braintumor serve`` per host of :data:`REPLICA_HOSTS` and wait until each is ready.

    One after the other: a ``serve`` that starts removes the shared-memory regions of this project that no
    live process holds yet, which can be those of a server starting at the same moment.
    """
    replicas: list[ServeReplica] = []
    try:
        for k, host in enumerate(REPLICA_HOSTS):
            http, grpc, metrics = free_ports(3, host)
            replica = ServeReplica(host, http, grpc, metrics, repository, admin_key, log_file=logs / f"replica{k}.log")
            replicas.append(replica.start())
            replica.wait_ready(300)
    except BaseException:
        for r in replicas:
            r.kill()
        raise
    return replicas


def start_balancer(replicas: list[ServeReplica], prefix: Path, pki: Path) -> Balancer:
    """nginx on :data:`BALANCER_HOST` with TLS, in front of ``replicas``; as ``nobody`` when run by root."""
    http, grpc = free_ports(2, BALANCER_HOST)
    config = BalancerConfig(
        replicas=tuple(Replica(r.host, r.http_port, r.grpc_port) for r in replicas),
        host=BALANCER_HOST,
        http_port=http,
        grpc_port=grpc,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
    )
    run_as = None
    if os.geteuid() == 0:  # nginx runs as a non-root user: its prefix and key are that user's
        run_as = NOBODY
        for path in [prefix, *prefix.rglob("*")]:
            os.chown(path, *NOBODY)
    return Balancer(config, prefix, run_as=run_as).start()


def private_folder(name: str) -> Path:
    """A fresh folder in the system's temporary directory (pytest's own are closed to other users)."""
    folder = Path(tempfile.mkdtemp(prefix=f"braintumor-{name}-"))
    folder.chmod(0o755)
    return folder


def infer_direct(replica: ServeReplica, pixels: np.ndarray, version: int) -> np.ndarray:
    """Probabilities of ``version`` on ``replica`` for each image of ``pixels``, one request each, directly."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"{replica.host}:{replica.grpc_port}")
    rows = []
    for k in range(len(pixels)):
        tensor = grpcclient.InferInput(INPUT_NAME, [1, *pixels.shape[1:]], "UINT8")
        tensor.set_data_from_numpy(pixels[k : k + 1])
        result = client.infer(MODEL_NAME, [tensor], model_version=str(version))
        rows.append(result.as_numpy(OUTPUT_NAME)[0])
    client.close()
    return np.array(rows)


@dataclass
class Record:
    """One request: when it ended, how, from which version."""

    client: str
    done: float
    outcome: str  # answered | wrong | errored
    version: int | None = None
    error: str = ""


@dataclass
class Load:
    """Closed-loop load through nginx: gRPC threads (plain ``tritonclient.grpc``, TLS) and ``curl`` workers
    (HTTPS, the binary-data extension); each request's outcome is checked against ``expected[version][k]``.

    Args:
        balancer: nginx.
        pixels: the images (preprocessed), one per request in turn.
        expected: probabilities per version, per image.
        allowed: client name to the versions it may be answered by.
        grpc_clients: client name to (model version it sends, threads).
        curl_clients: client name to (model version it sends, workers).
        ca: the CA file of nginx's certificate.
        folder: where curl's request bodies go.
    """

    balancer: Balancer
    pixels: np.ndarray
    expected: dict[int, np.ndarray]
    allowed: dict[str, set[int]]
    grpc_clients: dict[str, tuple[str, int]]
    curl_clients: dict[str, tuple[str, int]]
    ca: Path
    folder: Path
    records: list[Record] = field(default_factory=list)
    sent: Counter = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _check(self, client: str, k: int, version: int, probabilities: np.ndarray) -> Record:
        expected = self.expected.get(version)
        good = (
            version in self.allowed[client]
            and expected is not None
            and probabilities.shape == expected[k].shape
            and float(np.abs(probabilities - expected[k]).max()) <= 1e-5
        )
        return Record(client, time.monotonic(), "answered" if good else "wrong", version)

    def _add(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def _grpc(self, name: str, version: str, seed: int) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        config = self.balancer.config
        client = grpcclient.InferenceServerClient(
            f"{config.host}:{config.grpc_port}", ssl=True, root_certificates=str(self.ca)
        )
        k = seed
        while not self._stop.is_set():
            k = (k + 1) % len(self.pixels)
            tensor = grpcclient.InferInput(INPUT_NAME, [1, *self.pixels.shape[1:]], "UINT8")
            tensor.set_data_from_numpy(self.pixels[k : k + 1])
            with self._lock:
                self.sent[name] += 1
            try:
                result = client.infer(MODEL_NAME, [tensor], model_version=version, client_timeout=20)
                got = int(result.get_response().model_version)
                self._add(self._check(name, k, got, result.as_numpy(OUTPUT_NAME)[0]))
            except InferenceServerException as err:
                self._add(Record(name, time.monotonic(), "errored", error=f"{err.status()}: {err.message()[:100]}"))
        client.close()

    def _curl_bodies(self) -> list[tuple[Path, int]]:
        bodies = []
        for k in range(len(self.pixels)):
            raw = self.pixels[k : k + 1].tobytes()
            header = json.dumps(
                {
                    "inputs": [
                        {
                            "name": INPUT_NAME,
                            "shape": [1, *self.pixels.shape[1:]],
                            "datatype": "UINT8",
                            "parameters": {"binary_data_size": len(raw)},
                        }
                    ],
                    "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": False}}],
                }
            ).encode()
            path = self.folder / f"body{k}.bin"
            path.write_bytes(header + raw)
            bodies.append((path, len(header)))
        return bodies

    def _curl(self, name: str, version: str, seed: int, bodies: list[tuple[Path, int]]) -> None:
        config = self.balancer.config
        path = f"/v2/models/{MODEL_NAME}" + (f"/versions/{version}" if version else "") + "/infer"
        k = seed
        while not self._stop.is_set():
            k = (k + 1) % len(self.pixels)
            body, header_length = bodies[k]
            with self._lock:
                self.sent[name] += 1
            result = subprocess.run(
                [
                    shutil.which("curl") or "curl", "-sS", "--max-time", "20", "--cacert", str(self.ca),
                    "-H", f"Inference-Header-Content-Length: {header_length}",
                    "-H", "Content-Type: application/octet-stream",
                    "--data-binary", f"@{body}", "-w", "\n%{http_code}",
                    f"https://{config.host}:{config.http_port}{path}",
                ],
                capture_output=True,
                text=True,
                check=False,
            )  # fmt: skip
            text, _, status = result.stdout.rpartition("\n")
            if result.returncode != 0 or status != "200":
                self._add(
                    Record(name, time.monotonic(), "errored", error=f"{status} {text[:100]}{result.stderr[:100]}")
                )
                continue
            answer = json.loads(text)
            data = np.array(answer["outputs"][0]["data"], dtype=np.float32)
            self._add(self._check(name, k, int(answer["model_version"]), data))

    def start(self) -> Load:
        """Start every client."""
        bodies = self._curl_bodies() if self.curl_clients else []
        for name, (version, n) in self.grpc_clients.items():
            for t in range(n):
                self._threads.append(threading.Thread(target=self._grpc, args=(name, version, t), daemon=True))
        for name, (version, n) in self.curl_clients.items():
            for t in range(n):
                self._threads.append(threading.Thread(target=self._curl, args=(name, version, t, bodies), daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop sending and wait for the requests in flight."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def ledger(self) -> dict[str, dict[str, int]]:
        """Per client: sent, answered, wrong, errored, lost (sent and never ended)."""
        with self._lock:
            out = {}
            for name in [*self.grpc_clients, *self.curl_clients]:
                outcomes = Counter(r.outcome for r in self.records if r.client == name)
                ended = sum(outcomes.values())
                out[name] = {"sent": self.sent[name], **outcomes, "lost": self.sent[name] - ended}
            return out

    def answered_since(self, since: float) -> int:
        """Requests answered correctly since ``since`` (:func:`time.monotonic`)."""
        with self._lock:
            return sum(1 for r in self.records if r.outcome == "answered" and r.done >= since)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest stretch within [start, end] without a correct answer."""
        with self._lock:
            times = sorted(r.done for r in self.records if r.outcome == "answered" and start <= r.done <= end)
        edges = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(edges))


def access_log(balancer: Balancer) -> list[tuple[float, str, str]]:
    """(time, request line, last replica tried) of each line of nginx's access log."""
    rows = []
    for line in balancer.access_log.read_text().splitlines():
        upstream = re.search(r" upstream=(.*?) upstream_status=", line)
        request = line.split('"')[1] if '"' in line else ""
        last = upstream.group(1).split(",")[-1].strip() if upstream else ""
        rows.append((float(line.split()[0]), request, last))
    return rows


def new_admin_key() -> str:
    """A random admin key shared by the replicas."""
    return secrets.token_urlsafe(16)
