"""nginx as an L7 balancer in front of several replicas, for clients that cannot balance themselves.

gRPC keeps one HTTP/2 connection per client, so behind a plain Kubernetes Service every request of a client
reaches the one pod it first reached. nginx ends each client's connection and spreads its requests, gRPC
and HTTP, over the replicas (round robin), terminates TLS, takes a failing replica out for a while (passive
health: ``max_fails``, ``fail_timeout``) and retries a request on the next replica when a connection is
refused or reset (a killed replica loses no request). The configuration is
``deploy/nginx/nginx.conf.template``, rendered by :func:`render`; :class:`Balancer` runs Debian's ``nginx``
from a prefix folder as the current user, and reloads it gracefully to take a replica out or back in
(:meth:`Balancer.set_down`), which is how :mod:`.rollout` drains one.

    python -m braintumor_serving.balancer --replica 10.0.0.5:8000:8001 --replica 10.0.0.6:8000:8001 \\
        --tls-cert server.pem --tls-key server.key > nginx.conf
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from braintumor.config import CHANNELS, IMAGE_SIZE, INPUT_NAME, MAX_BATCH_SIZE, MODEL_NAME, PROJECT_ROOT
from braintumor_serving.front import FrontLimits, ModelSpec, TensorSpec

TEMPLATE = PROJECT_ROOT / "deploy" / "nginx" / "nginx.conf.template"
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")
_DURATION = re.compile(r"[0-9]{1,6}(ms|s|m)?")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}( [a-z_][a-z0-9_-]{0,31})?")
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


class BalancerError(RuntimeError):
    """The balancer's configuration is wrong, or nginx cannot start or reload."""


def default_body_bytes() -> int:
    """The largest request body a replica's HTTP front takes for this project's model: a batch of
    :data:`MAX_BATCH_SIZE` images as HTTP JSON (larger than the same batch as binary data or gRPC)."""
    spec = ModelSpec(MODEL_NAME, MAX_BATCH_SIZE, (TensorSpec(INPUT_NAME, "UINT8", (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)),))
    return spec.body_limit(binary=False, cap=FrontLimits().body_bytes)


@dataclass(frozen=True)
class Replica:
    """One replica behind the balancer.

    Args:
        host: its address (name, IPv4, or IPv6 in brackets).
        http_port: its HTTP port (``braintumor serve``'s checking front).
        grpc_port: its gRPC port.
        down: left out of the rotation (nginx's ``down``: a replica being drained or restarted).
    """

    host: str
    http_port: int
    grpc_port: int
    down: bool = False

    def __post_init__(self) -> None:
        if not _HOST.fullmatch(self.host):
            raise BalancerError(f"replica host {self.host!r} is not a host name or address")
        for port in (self.http_port, self.grpc_port):
            if not 0 < port < 65536:
                raise BalancerError(f"replica port {port} is not between 1 and 65535")

    @classmethod
    def parse(cls, text: str) -> Replica:
        """Read ``HOST:HTTP_PORT:GRPC_PORT`` (IPv6 hosts in brackets).

        Args:
            text: what the user wrote.

        Raises:
            BalancerError: when it is not of that form.
        """
        match = re.fullmatch(r"(.+):([0-9]{1,5}):([0-9]{1,5})", text.strip())
        if not match:
            raise BalancerError(f"a replica is HOST:HTTP_PORT:GRPC_PORT (got {text!r})")
        return cls(match.group(1), int(match.group(2)), int(match.group(3)))


@dataclass(frozen=True)
class BalancerConfig:
    """What :func:`render` writes.

    Args:
        replicas: the replicas (at least one).
        host: the address nginx listens on.
        http_port: its HTTP (or HTTPS) port.
        grpc_port: its gRPC port (HTTP/2; over TLS when a certificate is given).
        tls_cert: PEM certificate chain: terminate TLS here (both ports).
        tls_key: PEM key of ``tls_cert``.
        max_fails: failed attempts (connection refused or reset, timeout, 502-504) that take a replica out ...
        fail_timeout: ... for this long (nginx time, e.g. ``"5s"``); then one request tries it again.
        tries: attempts of one request at most, on different replicas.
        connect_timeout: how long a connection to a replica may take (a dead host is skipped after it).
        read_timeout: how long a replica may take to answer.
        next_upstream_timeout: how long one request may spend on all its attempts together.
        body_bytes: the largest request body (default: a batch of 32 as HTTP JSON, the front's limit).
        worker_processes: nginx worker processes.
        worker_shutdown_timeout: how long a reload lets old workers finish their requests.
        user: ``user`` directive for a master started as root (workers drop to it); ignored otherwise.
    """

    replicas: tuple[Replica, ...]
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_fails: int = 1
    fail_timeout: str = "5s"
    tries: int = 3
    connect_timeout: str = "1s"
    read_timeout: str = "30s"
    next_upstream_timeout: str = "15s"
    body_bytes: int = field(default_factory=default_body_bytes)
    worker_processes: int = 1
    worker_shutdown_timeout: str = "30s"
    user: str | None = None

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self.tls_cert else "http"


def _servers(replicas: tuple[Replica, ...], port: str, config: BalancerConfig) -> str:
    lines = []
    for r in replicas:
        state = " down" if r.down else ""
        lines.append(
            f"        server {r.host}:{getattr(r, port)} max_fails={config.max_fails} "
            f"fail_timeout={config.fail_timeout}{state};"
        )
    return "\n".join(lines)


def render(config: BalancerConfig, template: Path = TEMPLATE) -> str:
    """The nginx configuration for ``config``.

    Args:
        config: replicas, listening address, TLS, limits.
        template: the template (``deploy/nginx/nginx.conf.template``).

    Raises:
        BalancerError: on no replica, half a TLS pair, a missing TLS file, or a placeholder the template
            has and this function does not fill.
    """
    if not config.replicas:
        raise BalancerError("the balancer needs at least one replica")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise BalancerError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    for path in (config.tls_cert, config.tls_key):
        if path is not None and not Path(path).is_file():
            raise BalancerError(f"TLS file {path} not found")
    if config.tries < 1 or config.max_fails < 0 or config.body_bytes < 1 or config.worker_processes < 1:
        raise BalancerError("tries and worker_processes must be 1 or more, max_fails 0 or more, body_bytes 1 or more")
    for name in ("fail_timeout", "connect_timeout", "read_timeout", "next_upstream_timeout", "worker_shutdown_timeout"):
        if not _DURATION.fullmatch(getattr(config, name)):
            raise BalancerError(f"{name} must be an nginx time such as 500ms, 5s or 1m (got {getattr(config, name)!r})")
    if config.user is not None and not _USER.fullmatch(config.user):
        raise BalancerError(f"user must be a user name, optionally with a group (got {config.user!r})")
    if not _HOST.fullmatch(config.host):
        raise BalancerError(f"the listening host {config.host!r} is not a host name or address")
    ssl = " ssl" if config.tls_cert else ""
    tls = ""
    if config.tls_cert:
        tls = (
            f"        ssl_certificate {Path(config.tls_cert).resolve()};\n"
            f"        ssl_certificate_key {Path(config.tls_key).resolve()};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
            "        ssl_session_cache shared:braintumor_tls:1m;"
        )
    values = {
        "user": f"user {config.user};" if config.user else "",
        "worker_processes": str(config.worker_processes),
        "worker_shutdown_timeout": config.worker_shutdown_timeout,
        "body_bytes": str(config.body_bytes),
        "http_servers": _servers(config.replicas, "http_port", config),
        "grpc_servers": _servers(config.replicas, "grpc_port", config),
        "grpc_listen": f"{config.host}:{config.grpc_port}{ssl}",
        "http_listen": f"{config.host}:{config.http_port}{ssl}",
        "tls": tls,
        "connect_timeout": config.connect_timeout,
        "read_timeout": config.read_timeout,
        "tries": str(config.tries),
        "next_upstream_timeout": config.next_upstream_timeout,
    }

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise BalancerError(f"the template {template} has a placeholder {match.group(0)} that is not filled")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, Path(template).read_text())


def nginx_binary() -> str:
    """The ``nginx`` executable (Debian's: ``/usr/sbin/nginx``).

    Raises:
        BalancerError: when it is not installed.
    """
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise BalancerError("nginx is not installed (Debian: apt-get install nginx; scripts/setup.sh does it)")
    return found


class Balancer:
    """A running nginx with a rendered configuration in its own prefix folder; a context manager.

    Args:
        config: what to render.
        prefix: the folder for its configuration, logs, temporary files and pid (created).
        run_as: ``(uid, gid)`` to run nginx as, for a caller that is root (the prefix and the TLS files must
            be theirs); by default nginx runs as the caller.
    """

    def __init__(self, config: BalancerConfig, prefix: Path, run_as: tuple[int, int] | None = None) -> None:
        self.config = config
        self.prefix = Path(prefix)
        self.run_as = run_as
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self, *args: str) -> list[str]:
        """``nginx ARGS``, through ``setpriv`` when :attr:`run_as` is set: ``Popen(user=...)`` would fork
        without ``vfork``, and a plain fork of a process with gRPC threads (a test's load) can crash."""
        nginx = [nginx_binary(), *args]
        if self.run_as is None:
            return nginx
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        uid, gid = self.run_as
        return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *nginx]

    @property
    def access_log(self) -> Path:
        """The access log (one line per request, with the replica that answered)."""
        return self.prefix / "logs" / "access.log"

    @property
    def error_log(self) -> Path:
        """nginx's error log."""
        return self.prefix / "logs" / "error.log"

    def _write(self, config: BalancerConfig) -> Path:
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
            if self.run_as is not None:
                os.chown(self.prefix / sub, *self.run_as)
        path = self.prefix / "nginx.conf"
        staged = self.prefix / "nginx.conf.new"
        staged.write_text(render(config))
        check = subprocess.run(
            self._command("-t", "-q", "-p", str(self.prefix), "-c", str(staged), "-g", "daemon off;"),
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise BalancerError(f"nginx refuses the configuration: {check.stderr.strip()}")
        staged.replace(path)
        return path

    def start(self, timeout: float = 10.0) -> Balancer:
        """Write the configuration, check it (``nginx -t``), start nginx in the foreground of a child
        process, and wait until both ports accept connections and its workers run (the master listens
        before it forks them, so an open port alone does not mean a worker takes the connection yet).

        Args:
            timeout: seconds to wait for the ports and the workers.

        Raises:
            BalancerError: when nginx refuses the configuration or exits.
        """
        path = self._write(self.config)
        self.process = subprocess.Popen(
            self._command("-p", str(self.prefix), "-c", str(path), "-g", "daemon off;"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not (all(self._accepts(p) for p in (self.config.http_port, self.config.grpc_port)) and self.workers()):
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise BalancerError(f"nginx exited (status {self.process.returncode}): {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BalancerError(f"nginx did not listen on {self.config.host} with workers within {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.config.host, port), timeout=0.5):
                return True
        except OSError:
            return False

    def workers(self) -> list[int]:
        """The pids of the master's worker processes (old ones still finishing requests included)."""
        from braintumor_serving.triton import child_pids

        return [] if self.process is None else child_pids(self.process.pid)

    def reload(self, config: BalancerConfig, timeout: float = 60.0) -> float:
        """Apply ``config`` gracefully and wait until it alone is in force.

        nginx starts workers with the new configuration; the old ones stop accepting, finish every request
        they have in flight (at most ``worker_shutdown_timeout``) and exit. When this returns, no request
        is in flight under the old configuration: after taking a replica out, nothing of nginx's reaches it.

        Args:
            config: the new configuration.
            timeout: seconds to wait for the old workers.

        Returns:
            Seconds the old workers took to finish.

        Raises:
            BalancerError: when nginx refuses the configuration (the running one stays) or is not running.
        """
        if self.process is None or self.process.poll() is not None:
            raise BalancerError("nginx is not running")
        self._write(config)
        old = set(self.workers())
        started = time.monotonic()
        os.kill(self.process.pid, signal.SIGHUP)
        while time.monotonic() - started < timeout:
            current = set(self.workers())
            if not (current & old) and current:
                self.config = config
                return time.monotonic() - started
            time.sleep(0.02)
        raise BalancerError(f"nginx's old workers were still running {timeout:.0f} s after the reload")

    def set_down(self, index: int, down: bool = True) -> float:
        """Take replica ``index`` out of the rotation (``down``) or put it back, and wait for the reload.

        Args:
            index: position in :attr:`BalancerConfig.replicas`.
            down: out (``True``) or back in (``False``).

        Returns:
            Seconds the reload took (the old workers' in-flight requests).
        """
        replicas = list(self.config.replicas)
        replicas[index] = replace(replicas[index], down=down)
        return self.reload(replace(self.config, replicas=tuple(replicas)))

    def is_down(self, index: int) -> bool:
        """Whether replica ``index`` is out of the rotation.

        Args:
            index: position in :attr:`BalancerConfig.replicas`.
        """
        return self.config.replicas[index].down

    def __len__(self) -> int:
        return len(self.config.replicas)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop nginx: gracefully (SIGQUIT, requests finish), then SIGTERM, then SIGKILL. Safe to repeat.

        Args:
            timeout: seconds for the graceful stop.
        """
        if self.process is None:
            return None
        for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        return self.process.returncode

    def __enter__(self) -> Balancer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Print the nginx configuration for the replicas given (``python -m braintumor_serving.balancer``).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0, or 2 with a one-line error for a bad argument.
    """
    p = argparse.ArgumentParser(prog="python -m braintumor_serving.balancer", description=__doc__.split("\n")[0])
    p.add_argument("--replica", action="append", default=[], metavar="HOST:HTTP:GRPC", help="repeat per replica")
    p.add_argument("--host", default="0.0.0.0", help="address nginx listens on")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=8081)
    p.add_argument("--tls-cert", type=Path, default=None)
    p.add_argument("--tls-key", type=Path, default=None)
    p.add_argument("--user", default=None, help="workers' user when nginx starts as root (e.g. 'nginx')")
    args = p.parse_args(argv)
    try:
        config = BalancerConfig(
            replicas=tuple(Replica.parse(r) for r in args.replica),
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            user=args.user,
        )
        sys.stdout.write(render(config))
    except BalancerError as err:
        print(f"braintumor balancer: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
