"""``braintumor serve`` takes Triton and its python-backend stubs with it, however it ends (issue 17).

Real ``python -m braintumor.cli serve`` processes on free loopback ports: for each way of ending (Ctrl+C,
SIGTERM, SIGKILL of the launcher, SIGKILL of ``tritonserver``), within 10 s no process of that server is
left (``tritonserver``, stubs, watchdog), no shared-memory region of it is left in ``/dev/shm``, and its
ports are free. ``--restart on-failure`` restarts a killed ``tritonserver`` and honours its limit; bad
``--restart`` values are refused before anything starts. Stale cleanup at start removes only what carries
this project's prefix and has lost its owner; the tests fabricate such leftovers (files, and stand-in
processes named like Triton's) beside decoys that must be left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_repository, free_ports

pytest.importorskip("pytriton")

from braintumor.cli import main as cli_main
from braintumor.config import IMAGE_SIZE, INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from braintumor_serving import lifecycle
from braintumor_serving.lifecycle import PROJECT_PREFIX, SERVER_NAME, STUB_NAME, clean_stale, new_prefix
from braintumor_serving.triton import RestartPolicy, restart_policy

#: How long a server may take to disappear after it is told or made to end.
GONE_WITHIN = 10.0


# -- helpers ---------------------------------------------------------------------------------------------------


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound (as ``serve`` checks it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Launch:
    """A ``python -m braintumor.cli serve`` subprocess on free ports, in its own process group (a terminal's
    Ctrl+C reaches the whole foreground group: :meth:`ctrl_c` does the same).

    Args:
        tmp_path: where its output goes.
        repository: the model repository to serve.
        extra: further ``serve`` arguments.
    """

    def __init__(self, tmp_path: Path, repository: Path, *extra: str) -> None:
        self.ports = free_ports(3)
        self.out = tmp_path / f"serve-{uuid.uuid4().hex[:6]}.out"
        http, grpc, metrics = self.ports
        command = [sys.executable, "-m", "braintumor.cli", "serve", "--repository", str(repository)]
        command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra]
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        #: Every server this launcher starts carries this in its prefix (the launcher's pid).
        self.stem = f"{PROJECT_PREFIX}{self.process.pid}_"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of its gRPC endpoint."""
        return f"127.0.0.1:{self.ports[1]}"

    def output(self) -> str:
        """What it printed so far."""
        return self.out.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 240.0, count: int = 1) -> None:
        """Wait until it has printed ``text`` ``count`` times; fail with its output if it exits or times out.

        Args:
            text: what to wait for.
            timeout: seconds.
            count: how many occurrences.
        """
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if self.process.poll() is not None:
                pytest.fail(f"serve exited ({self.process.returncode}) before {text!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} from serve after {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.2)

    def tritonserver(self) -> lifecycle.Process:
        """Its live ``tritonserver``."""
        servers = [p for p in lifecycle.server_processes(self.stem) if p.name == SERVER_NAME]
        assert len(servers) == 1, servers
        return servers[0]

    def wait_exit(self, timeout: float, after: str) -> int:
        """Its exit status; fail with the test's message and its output if it runs past ``timeout``.

        Args:
            timeout: seconds.
            after: what should have ended it (for the message).
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still ran {timeout:.0f} s after {after}:\n{self.output()}")

    def ctrl_c(self) -> None:
        """SIGINT to its process group, as a terminal's Ctrl+C."""
        os.killpg(self.process.pid, signal.SIGINT)

    def remains(self) -> list[str]:
        """What is left of its servers: live processes carrying its prefix (Triton, stubs, watchdog), its
        shared-memory regions, and its ports still bound."""
        left = [
            f"pid {p.pid} {p.name}"
            for p in lifecycle.processes()
            if p.alive and p.pid != os.getpid() and p.carries(self.stem)
        ]
        left += [f"/dev/shm/{path.name}" for path in lifecycle.region_files(self.stem)]
        left += [f"port {port}" for port in self.ports if not port_free(port)]
        return left

    def assert_gone(self, since: float) -> float:
        """Wait until nothing of it is left; fail if anything is after :data:`GONE_WITHIN` s from ``since``.

        Args:
            since: ``time.monotonic()`` when it was told or made to end.

        Returns:
            The seconds it took.
        """
        while (left := self.remains()) and time.monotonic() - since < GONE_WITHIN:
            time.sleep(0.1)
        elapsed = time.monotonic() - since
        assert not left, f"left after {elapsed:.1f} s: {left}\n{self.output()}"
        return elapsed

    def close(self) -> None:
        """Make sure nothing of it outlives the test (even a failing one)."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # the cleanup below runs whatever happens
            self.process.wait(30)
        lifecycle.cleanup(self.stem)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return copy_repository(tmp_path_factory.mktemp("lifecycle") / "model_repository")


@pytest.fixture
def launch(tmp_path, repository):
    """Start ``serve`` subprocesses; whatever the test does, none of them outlives it."""
    launched: list[Launch] = []

    def start(*extra: str) -> Launch:
        launched.append(Launch(tmp_path, repository, *extra))
        return launched[-1]

    yield start
    for one in launched:
        one.close()


def infer_once(url: str) -> np.ndarray:
    """One gRPC inference of a batch of 2 through the SDK's plain client; returns the probabilities."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(url)
    pixels = np.random.default_rng(0).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    inp = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    try:
        return client.infer(MODEL_NAME, [inp]).as_numpy(OUTPUT_NAME)
    finally:
        client.close()


def dead_pid() -> int:
    """A pid that no process has now (the owner in a prefix of a server whose launcher is gone)."""
    return next(pid for pid in range(30000, 2, -1) if not Path(f"/proc/{pid}").exists())


def fake_region(name: str) -> Path:
    """A file in /dev/shm named ``name`` (what the python backend's region looks like to cleanup)."""
    path = lifecycle.SHM_DIR / name
    path.write_bytes(b"\0" * 4096)
    return path


# -- every way of ending leaves nothing ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill-launcher", "sigkill-tritonserver"])
def test_every_way_of_ending_leaves_no_process_region_or_port(launch, how, capsys):
    # Something an earlier server of this project left (its owner is long gone), and a region of someone else.
    stale = fake_region(f"{new_prefix(owner=dead_pid())}{uuid.uuid4()}")
    foreign = fake_region(f"braintumor-test-not-ours_{uuid.uuid4()}")
    try:
        served = launch()
        served.wait_for("Press Ctrl+C to stop.")
        assert not stale.exists() and foreign.exists()
        assert "left by an earlier server" in served.output()
        assert infer_once(served.grpc_url).shape == (2, 4)
        triton = served.tritonserver()
        stubs = [p for p in lifecycle.server_processes(served.stem) if p.name == STUB_NAME]
        assert stubs and all(p.ppid == triton.pid for p in stubs)
        assert lifecycle.region_files(served.stem)
        since = time.monotonic()
        if how == "ctrl-c":
            served.ctrl_c()
        elif how == "sigterm":
            served.process.send_signal(signal.SIGTERM)
        elif how == "sigkill-launcher":
            served.process.kill()
        else:
            os.kill(triton.pid, signal.SIGKILL)
        code = served.wait_exit(GONE_WITHIN, how)
        elapsed = served.assert_gone(since)
    finally:
        foreign.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)
    expected = {"ctrl-c": 0, "sigterm": 0, "sigkill-launcher": -signal.SIGKILL, "sigkill-tritonserver": 1}[how]
    assert code == expected, served.output()
    if how == "sigkill-tritonserver":
        died = [line for line in served.output().splitlines() if "tritonserver died" in line]
        assert died == [
            "braintumor serve: tritonserver died (killed by SIGKILL); its stubs and shared-memory regions are removed"
        ], served.output()
    with capsys.disabled():
        print(f"\n{how}: nothing left after {elapsed:.1f} s (serve exit status {code})")


@pytest.mark.slow
def test_a_failed_start_leaves_nothing_running_and_the_config_unchanged(repository, monkeypatch):
    """When the start fails after tritonserver is launched (here: the front cannot bind), start() stops what
    it started: no process or region of that server is left, its ports are free, and the caller's
    configuration still says 0 for the internal port."""
    from braintumor_serving import triton

    def refuse(_front: object) -> None:
        raise OSError("address already in use (simulated)")

    monkeypatch.setattr(triton.HttpFront, "start", refuse)
    http, grpc, metrics = free_ports(3)
    config = triton.ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    server = triton.TritonServer(config)
    with pytest.raises(triton.ServeError, match="simulated"):
        server.start()
    assert config.internal_http_port == 0 and server.internal_http_port
    assert server.process is not None and server.process.poll() is not None
    assert not lifecycle.server_processes(server.shm_prefix) and not lifecycle.region_files(server.shm_prefix)
    assert all(port_free(port) for port in (http, grpc, metrics, server.internal_http_port))


# -- --restart -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_restart_on_failure_serves_again_and_honours_its_limit(launch, capsys):
    served = launch("--restart", "on-failure", "--restart-limit", "1")
    served.wait_for("Press Ctrl+C to stop.")
    first = served.tritonserver()
    os.kill(first.pid, signal.SIGKILL)
    started = time.monotonic()
    served.wait_for("tritonserver is serving again (restart 1)")
    back_after = time.monotonic() - started
    second = served.tritonserver()
    assert second.pid != first.pid
    (first_prefix,) = first.prefixes()
    assert not lifecycle.server_processes(first_prefix) and not lifecycle.region_files(first_prefix)
    probabilities = infer_once(served.grpc_url)
    assert probabilities.shape == (2, 4) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    os.kill(second.pid, signal.SIGKILL)  # the limit (1) is reached: serve gives up
    since = time.monotonic()
    code = served.wait_exit(GONE_WITHIN, "the second SIGKILL of tritonserver, past the restart limit")
    served.assert_gone(since)
    out = served.output()
    assert code == 1, out
    assert out.count("tritonserver died (killed by SIGKILL)") == 2, out
    assert "restarting tritonserver in 1 s (restart 1 of at most 1)" in out
    assert "giving up after 1 restart (restart limit 1)" in out
    with capsys.disabled():
        print(f"\nrestart: serving again {back_after:.1f} s after the SIGKILL")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--restart", "on-failure:-1"], "the restart limit must be a whole number, 0 or more (got '-1')"),
        (["--restart", "on-failure:five"], "the restart limit must be a whole number, 0 or more (got 'five')"),
        (["--restart", "on-failure", "--restart-limit", "-3"], "the restart limit must be a whole number"),
        (["--restart", "on-failure", "--restart-limit", "2.5"], "the restart limit must be a whole number"),
        (["--restart", "on-failure:\u00b2"], "the restart limit must be a whole number, 0 or more (got '\u00b2')"),
        (["--restart", "on-failure", "--restart-limit", "\u0663"], "the restart limit must be a whole number"),
        (["--restart", "always"], "--restart takes 'no', 'on-failure' or 'on-failure:N' (got 'always')"),
        (["--restart-limit", "3"], "a restart limit needs --restart on-failure"),
        (["--restart", "on-failure:2", "--restart-limit", "3"], "give the restart limit once"),
    ],
)
def test_bad_restart_values_are_refused_before_anything_starts(arguments, message, monkeypatch, capsys):
    import braintumor_serving.triton as triton

    def must_not_run(*_args: object, **_kwargs: object) -> int:
        raise AssertionError("serve started despite a bad --restart")

    monkeypatch.setattr(triton, "serve", must_not_run)
    assert cli_main(["serve", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_restart_policy_parses_the_accepted_forms():
    assert restart_policy("no") == RestartPolicy()
    assert restart_policy("on-failure") == RestartPolicy(on_failure=True, limit=5)
    assert restart_policy("on-failure:0") == RestartPolicy(on_failure=True, limit=0)
    assert restart_policy("on-failure", "7") == RestartPolicy(on_failure=True, limit=7)
    policy = RestartPolicy(on_failure=True, backoff=1.0, max_backoff=30.0)
    assert [policy.delay(k) for k in (1, 2, 3, 5, 6, 9)] == [1, 2, 4, 16, 30, 30]


# -- stale cleanup ---------------------------------------------------------------------------------------------


def _stand_in(name: str, *args: str, orphan: bool = False) -> int:
    """A harmless process (Python sleeping) whose command line shows program ``name`` and ``args``.

    Args:
        name: the program name it shows (``argv[0]``).
        args: further arguments it shows.
        orphan: detach it from this process (its parent becomes pid 1 or a subreaper), as a stub whose
            server died.

    Returns:
        Its pid.
    """
    sleeper = [name, "-c", "import time; time.sleep(60)", *args]
    if not orphan:
        return subprocess.Popen(sleeper, executable=sys.executable, start_new_session=True).pid
    spawn = (
        "import subprocess, sys; p = subprocess.Popen(sys.argv[1:], executable=sys.executable, "
        "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
    )
    out = subprocess.run([sys.executable, "-c", spawn, *sleeper], capture_output=True, text=True, check=True)
    return int(out.stdout)


def _server_with_fork(prefix: str) -> tuple[int, int]:
    """A stand-in ``tritonserver`` of this test (the owner in ``prefix``) and its child, a stub just forked
    and not yet executed: named ``tritonserver`` too, with the same prefix. Returns both pids."""
    args = [f"--backend-config=python,shm-region-prefix-name={prefix}"]
    code = (
        "import subprocess, sys, time; c = subprocess.Popen(sys.argv[2:], executable=sys.argv[1], "
        "stdout=subprocess.DEVNULL); print(c.pid, flush=True); time.sleep(60)"
    )  # named tritonserver, it cannot find its own executable: it is given
    child = [sys.executable, SERVER_NAME, "-c", "import time; time.sleep(60)", *args]
    server = subprocess.Popen(
        [SERVER_NAME, "-c", code, *child],
        executable=sys.executable,
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    fork = int(server.stdout.readline())
    return server.pid, fork


def _alive(pid: int) -> bool:
    process = lifecycle.read_process(pid)
    return process is not None and process.alive


def test_stale_cleanup_removes_only_this_projects_orphans(tmp_path):
    gone = dead_pid()  # the launcher named in the stale prefixes has ended
    stale_prefix, live_prefix, mapped_prefix, mention_prefix = (
        new_prefix(gone),
        new_prefix(),
        new_prefix(gone),
        new_prefix(gone),
    )
    stale_file = fake_region(f"{stale_prefix}{uuid.uuid4()}")
    foreign_file = fake_region(f"triton_python_backend_shm_region_braintumor-test-{uuid.uuid4()}")
    unmatched_file = fake_region(f"{PROJECT_PREFIX}not-a-server-prefix-{uuid.uuid4()}")
    live_file = fake_region(f"{live_prefix}{uuid.uuid4()}")
    mapped_file = fake_region(f"{mapped_prefix}{uuid.uuid4()}")
    pids: dict[str, int] = {}
    held = open(mapped_file, "rb")  # noqa: SIM115 - this test holds it open (as a stub maps its region)
    try:
        # Killed: a stub of ours whose server is gone (parent pid 1), a tritonserver of ours whose owner is gone.
        pids["orphan stub"] = _stand_in(STUB_NAME, f"{stale_prefix}{uuid.uuid4()}", orphan=True)
        pids["orphan server"] = _stand_in(
            SERVER_NAME, f"--backend-config=python,shm-region-prefix-name={stale_prefix}", orphan=True
        )
        # Never touched: another program's stub (no prefix of ours), a program that merely mentions our
        # prefix, and a "server" of ours whose owner (this test) is alive and is its parent.
        pids["foreign stub"] = _stand_in(STUB_NAME, "triton_python_backend_shm_region_x", orphan=True)
        pids["mentions the prefix"] = _stand_in("tail", f"/dev/shm/{mention_prefix}x", orphan=True)
        pids["live server"], pids["live server's fresh fork"] = _server_with_fork(live_prefix)
        time.sleep(0.5)  # the orphans' parents have exited and been reaped
        assert lifecycle.read_process(pids["orphan stub"]).ppid != os.getpid()
        removed = clean_stale()
        assert set(removed.killed) >= {pids["orphan stub"], pids["orphan server"]}
        assert stale_file.name in removed.regions
        deadline = time.monotonic() + 5
        while (_alive(pids["orphan stub"]) or _alive(pids["orphan server"])) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pids["orphan stub"]) and not _alive(pids["orphan server"])
        for what in ("foreign stub", "mentions the prefix", "live server", "live server's fresh fork"):
            assert _alive(pids[what]), f"{what} was touched"
            assert pids[what] not in removed.killed
        assert not stale_file.exists()
        for kept in (foreign_file, unmatched_file, live_file, mapped_file):
            assert kept.exists(), f"{kept.name} was removed"
    finally:
        held.close()
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for path in (stale_file, foreign_file, unmatched_file, live_file, mapped_file):
            path.unlink(missing_ok=True)


def test_a_region_made_while_the_stale_check_runs_is_kept(monkeypatch):
    """Two servers starting at once: the second's first region appears just after the first's start-up check
    read the processes. Regions are listed before the processes are read, so it is never taken for stale."""
    made: list[Path] = []
    read_processes = lifecycle.processes

    def snapshot_then_a_server_starts() -> list:
        seen = read_processes()
        made.append(fake_region(f"{new_prefix()}{uuid.uuid4()}"))  # its server is not in `seen`
        return seen

    monkeypatch.setattr(lifecycle, "processes", snapshot_then_a_server_starts)
    try:
        stale = lifecycle.stale_regions()
        assert len(made) == 1 and made[0].exists()
        assert made[0] not in stale
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def test_cleanup_takes_a_stub_still_in_its_bash_stage_but_never_the_watchdog():
    """A stub on its way to ``exec`` is a ``bash -c "exec <stub> ..."`` carrying the server's prefix: it is
    the server's and is killed; the watchdog carries the prefix too and is left to end by itself."""
    prefix = new_prefix()
    stub = f"/x/{STUB_NAME} {prefix}region"
    pids = {
        "bash stage": _stand_in("bash", "-c", f"exec {stub}"),
        "watchdog": _stand_in("python3", "-m", lifecycle.WATCHDOG_MODULE, "--prefix", prefix),
        "other server's": _stand_in("bash", "-c", f"exec /x/{STUB_NAME} {new_prefix()}region"),
    }
    try:
        assert {p.pid for p in lifecycle.server_processes(prefix)} == {pids["bash stage"]}
        removed = lifecycle.cleanup(prefix)
        assert removed.killed == [pids["bash stage"]]
        deadline = time.monotonic() + 5
        while _alive(pids["bash stage"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pids["bash stage"])
        assert _alive(pids["watchdog"]) and _alive(pids["other server's"])
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_prefixes_are_unique_and_carry_their_owner():
    a, b = new_prefix(), new_prefix()
    assert a != b
    match = re.fullmatch(lifecycle.PREFIX_PATTERN, a)
    assert match and int(match.group(1)) == os.getpid()
    assert lifecycle.backend_config(a) == f"--backend-config=python,shm-region-prefix-name={a}"
