"""Replicas of ``braintumor serve`` behind the nginx balancer, and a rolling update of their model versions.

A replica moves to a new model repository (version N+1 published beside N) by a drain and a restart:

1. only when every other replica is ready, nginx takes it out of the rotation (a graceful reload: the old
   workers finish the requests they have in flight, so none of nginx's requests is left on it);
2. the replica's own in-flight requests (from clients that reach it directly) finish: Triton's metrics show
   nothing pending and no request completing for a quiet moment;
3. ``braintumor serve`` stops gracefully (SIGTERM) and starts again on the new repository;
4. it is put back only once ready (every served version loaded and warmed up), and the next one follows.

With the repository's version policy (the latest two), moving from {N-1, N} to {N, N+1} keeps version N on
every replica throughout, so clients pinned to N (the SDK pins the version it resolved at connect) keep it;
clients pinned to N-1 keep it while a replica serves it (over HTTP nginx sends their 404 on to a replica
that still does). Kubernetes does the same with ``maxUnavailable: 0``, readiness probes and the
``preStop`` drain of :mod:`.drain` (``deploy/k8s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from braintumor.config import MODEL_NAME
from braintumor_serving.balancer import BalancerError
from braintumor_serving.drain import wait_idle
from braintumor_serving.triton import http_ready, terminate


class Rotation(Protocol):
    """What sends traffic to the replicas and can leave one out: :class:`.balancer.Balancer` (nginx), or a
    client-side balancer's list of endpoints. ``set_down`` returns once no request of its own is in flight
    on a replica it left out."""

    def set_down(self, index: int, down: bool = True) -> float:
        """Leave replica ``index`` out (``down``) or put it back; returns the seconds it took."""
        ...

    def is_down(self, index: int) -> bool:
        """Whether replica ``index`` is out."""
        ...

    def __len__(self) -> int:
        """How many replicas it knows."""
        ...


class RolloutError(RuntimeError):
    """A rollout cannot go on: no other replica is ready, or a restarted one does not become ready."""


@dataclass
class ServeReplica:
    """One ``braintumor serve`` process (a replica), restartable on another repository.

    Args:
        host: the address it binds.
        http_port: its HTTP port (the checking front).
        grpc_port: its gRPC port.
        metrics_port: its metrics port.
        repository: the model repository it serves.
        admin_key: the admin key (the same on every replica, so one key administers them all).
        log_file: where ``serve``'s own output goes (appended across restarts).
    """

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path
    admin_key: str = field(repr=False)
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def metrics_url(self) -> str:
        """Its Prometheus metrics."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self) -> ServeReplica:
        """Start ``braintumor serve`` (without waiting for readiness)."""
        command = [
            str(Path(sys.executable).parent / "braintumor"),
            "serve",
            f"--host={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--repository={self.repository}",
            "--admin-key-env=BRAINTUMOR_ADMIN_KEY",
        ]
        env = dict(os.environ, BRAINTUMOR_ADMIN_KEY=self.admin_key)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        finally:
            if self.log_file:
                out.close()
        return self

    def get(self, path: str, admin: bool = False) -> dict:
        """GET ``path`` from its HTTP port as JSON (with the admin key when ``admin``).

        Args:
            path: e.g. ``/v2/models/braintumor``.
            admin: send the admin key (restricted APIs such as statistics).
        """
        headers = {"admin-key": self.admin_key} if admin else {}
        request = urllib.request.Request(f"http://{self.host}:{self.http_port}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"{}")

    def is_ready(self) -> bool:
        """Whether the server answers ready (every served version loaded and warmed up)."""
        return http_ready(f"{self.host}:{self.http_port}")

    def versions(self) -> list[int]:
        """The versions of the model it serves now."""
        return sorted(int(v) for v in self.get(f"/v2/models/{MODEL_NAME}")["versions"])

    def inference_count(self) -> int:
        """Inferences it has answered successfully (Triton's statistics, all versions; needs the admin key)."""
        stats = self.get(f"/v2/models/{MODEL_NAME}/stats", admin=True)
        return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait until it is ready.

        Args:
            timeout: seconds.

        Raises:
            RolloutError: when ``serve`` exits first or ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RolloutError(f"replica {self.host}:{self.grpc_port} exited (status {code}) before it was ready")
            if time.monotonic() > deadline:
                raise RolloutError(f"replica {self.host}:{self.grpc_port} was not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Stop it gracefully (SIGTERM: Triton finishes in-flight requests), SIGKILL after ``timeout``.

        Args:
            timeout: seconds for the graceful stop.
        """
        if self.process is None:
            return None
        return terminate(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL ``serve``: its ``tritonserver`` dies with it (parent-death signal), as a crashed pod."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class Step:
    """What one replica's move took.

    Args:
        replica: its position.
        versions: the versions it serves afterwards.
        left_at: when it began to leave the rotation (:func:`time.monotonic`).
        back_at: when it was back in the rotation, ready on the new repository.
        drain_s: seconds to take it out of nginx and let its requests finish.
        restart_s: seconds from the stop until it was ready again.
    """

    replica: int
    versions: tuple[int, ...]
    left_at: float
    back_at: float
    drain_s: float
    restart_s: float


def rolling_update(
    balancer: Rotation,
    replicas: list[ServeReplica],
    repository: Path,
    ready_timeout: float = 180.0,
    min_ready: float = 0.0,
    on_step: Callable[[Step], None] | None = None,
) -> list[Step]:
    """Move every replica, one by one, to ``repository``, draining each behind ``balancer`` first.

    Args:
        balancer: what sends them traffic (nginx's :class:`.balancer.Balancer`); ``replicas[i]`` is its
            replica ``i``.
        replicas: the replicas.
        repository: the model repository they serve afterwards (e.g. with version N+1 published).
        ready_timeout: seconds a restarted replica may take to be ready.
        min_ready: seconds a replica back in the rotation must stay ready before the next one moves
            (Kubernetes' ``minReadySeconds``).
        on_step: called after each replica is back in the rotation.

    Returns:
        One :class:`Step` per replica.

    Raises:
        RolloutError: when no other replica is ready to take the load, or a replica does not come back (it
            stays out of the rotation; the others keep serving).
    """
    if len(replicas) != len(balancer):
        raise RolloutError(f"{len(replicas)} replicas given, the balancer has {len(balancer)}")
    steps = []
    for i, replica in enumerate(replicas):
        others = [r for k, r in enumerate(replicas) if k != i and not balancer.is_down(k)]
        if not any(r.is_ready() for r in others):
            raise RolloutError(f"no other replica is ready to take the load of replica {i}; nothing was stopped")
        started = time.monotonic()
        try:
            balancer.set_down(i)
        except BalancerError as err:
            raise RolloutError(f"cannot take replica {i} out of nginx: {err}") from err
        wait_idle(replica.metrics_url)
        drained = time.monotonic()
        replica.stop()
        replica.repository = Path(repository)
        replica.start()
        replica.wait_ready(ready_timeout)
        ready = time.monotonic()
        balancer.set_down(i, down=False)
        back = time.monotonic()
        time.sleep(min_ready)
        if not replica.is_ready():
            raise RolloutError(f"replica {i} did not stay ready for {min_ready:g} s after its restart")
        step = Step(i, tuple(replica.versions()), started, back, drained - started, ready - drained)
        steps.append(step)
        if on_step is not None:
            on_step(step)
    return steps
