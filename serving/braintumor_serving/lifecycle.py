"""Make ``tritonserver`` and its python-backend stubs end with the process that started them.

The python backend runs every model instance in a *stub* process, a child of ``tritonserver``, and talks to
it through POSIX shared-memory regions in ``/dev/shm``. Stubs ignore SIGTERM, and after a SIGKILL of
``tritonserver`` under load they can survive as orphans holding their regions; a SIGKILL of the launcher
used to leave ``tritonserver`` itself running on its ports. Four layers keep nothing behind:

1. Every server gets its own region prefix, :func:`new_prefix` (``braintumor_triton_<owner pid>_<random>_``),
   passed to the python backend (``--backend-config=python,shm-region-prefix-name=...``). It appears in
   ``tritonserver``'s command line, in every stub's (its region's name) and in every region's file name,
   so what belongs to one server is found without guessing, and never another program's processes:
   processes of this user whose arguments carry that server's prefix (a stub on its way to ``exec``, still
   a ``bash -c "exec ..."``, carries it too), except this project's own watchdog. Stale cleanup, which
   has no one server's prefix to go by, takes only processes named ``tritonserver`` or
   ``triton_python_backend_stub`` carrying the project prefix.
2. ``tritonserver`` gets the parent-death signal SIGKILL (:func:`parent_death_signal`): the kernel ends
   it as soon as the process that started it ends, however that ends.
3. A small watchdog process (:class:`Watchdog`, ``python -m braintumor_serving.lifecycle``), in its own
   session, waits for either the end of the launcher (the write end of a pipe that only the launcher holds
   closes, whatever killed it) or the end of ``tritonserver`` (a pidfd), then kills what is left of that
   server (its stubs) and removes its regions (:func:`cleanup`).
4. At start, :func:`clean_stale` removes what an earlier server of this project left when all of the above
   was itself killed: this user's processes carrying the project prefix whose owner is gone (a
   ``tritonserver`` whose parent is no longer the launcher named in its prefix, a stub whose parent is no
   longer its live server) and regions with the project prefix that no live process carries or maps.

This module imports only the standard library: the watchdog starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: The start of every shared-memory region and server prefix of this project.
PROJECT_PREFIX = "braintumor_triton_"
#: One server's prefix: the project prefix, the pid of the process that started it, and a random token.
PREFIX_PATTERN = re.compile(r"braintumor_triton_(\d+)_([0-9a-f]{8})_")
SERVER_NAME = "tritonserver"
STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
#: The start of the name of a launcher's temporary folder (backend copies, log).
WORKDIR_PREFIX = "braintumor-triton-"
#: The watchdog's module: a process running it carries a server's prefix but is never that server's.
WATCHDOG_MODULE = "braintumor_serving.lifecycle"
_PR_SET_PDEATHSIG = 1


def new_prefix(owner: int | None = None) -> str:
    """A fresh region prefix for one server.

    Args:
        owner: pid of the process that starts the server (default: this one); stale cleanup uses it.

    Returns:
        ``braintumor_triton_<owner>_<8 hex digits>_``.
    """
    return f"{PROJECT_PREFIX}{os.getpid() if owner is None else owner}_{secrets.token_hex(4)}_"


def backend_config(prefix: str) -> str:
    """The ``tritonserver`` argument that gives the python backend's regions ``prefix``.

    Args:
        prefix: a prefix from :func:`new_prefix`.
    """
    return f"--backend-config=python,shm-region-prefix-name={prefix}"


# -- processes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """One process as ``/proc`` shows it.

    Args:
        pid: its id.
        ppid: its parent's id.
        state: the one-letter state (``Z`` for a zombie: it has ended and holds nothing but its entry).
        start_ticks: when it started, in clock ticks after boot (tells a reused pid from the original).
        args: its command line.
        uid: the user it runs as (-1 when unknown).
    """

    pid: int
    ppid: int
    state: str
    start_ticks: int
    args: tuple[str, ...]
    uid: int = -1

    @property
    def name(self) -> str:
        """The file name of the program (the first argument's last part)."""
        return self.args[0].rsplit("/", 1)[-1] if self.args else ""

    @property
    def alive(self) -> bool:
        """Whether it still runs (not a zombie)."""
        return self.state not in ("Z", "X")

    @property
    def is_mine(self) -> bool:
        """Whether it runs as this process's user (nothing here touches another user's processes)."""
        return self.uid == os.geteuid()

    @property
    def is_watchdog(self) -> bool:
        """Whether it is a :class:`Watchdog` (``python -m braintumor_serving.lifecycle``)."""
        return WATCHDOG_MODULE in self.args

    @property
    def is_triton(self) -> bool:
        """Whether it is a ``tritonserver`` or a python-backend stub (including a stub forked but not yet
        executed, which still shows ``tritonserver``'s command line)."""
        return self.name in (SERVER_NAME, STUB_NAME)

    def carries(self, prefix: str) -> bool:
        """Whether one of its arguments contains ``prefix``.

        Args:
            prefix: a server prefix (or the project prefix).
        """
        return any(prefix in arg for arg in self.args)

    def prefixes(self) -> set[str]:
        """The server prefixes its arguments carry."""
        return {m.group(0) for arg in self.args for m in PREFIX_PATTERN.finditer(arg)}


def read_process(pid: int) -> Process | None:
    """The process ``pid``, or ``None`` when it is gone or cannot be read.

    Args:
        pid: a process id.
    """
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces and ')'
    args = tuple(a.decode(errors="replace") for a in cmdline.split(b"\0") if a)
    return Process(pid=pid, ppid=int(fields[1]), state=fields[0], start_ticks=int(fields[19]), args=args, uid=uid)


def processes() -> list[Process]:
    """Every process this user can see."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (process := read_process(int(entry.name))) is not None:
            found.append(process)
    return found


def server_processes(prefix: str, among: Iterable[Process] | None = None) -> list[Process]:
    """The live processes of the server with ``prefix``: this user's processes whose arguments carry it
    (``tritonserver``, its stubs, and a stub still in its ``bash -c "exec <stub> ..."`` stage), except the
    watchdog and this process. For the project prefix (every server), only processes named
    ``tritonserver`` or ``triton_python_backend_stub``.

    Args:
        prefix: the server's prefix (a project prefix matches every server of the project).
        among: the processes to look at (default: all of them, now).
    """
    one_server = PREFIX_PATTERN.fullmatch(prefix) is not None
    return [
        p
        for p in (processes() if among is None else among)
        if p.alive
        and p.is_mine
        and p.carries(prefix)
        and (p.is_triton or (one_server and not p.is_watchdog and p.pid != os.getpid()))
    ]


def kill_process(process: Process) -> bool:
    """Send SIGKILL to ``process`` if it is still the same process (same pid and start time).

    A pidfd makes the check and the signal refer to one process, so a pid reused in between is never hit.

    Args:
        process: what :func:`read_process` returned for it.

    Returns:
        Whether the signal was sent (``False`` when the process is gone or is another one now).

    Raises:
        PermissionError: when the process belongs to another user.
    """
    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # gone (checked below), or no pidfd on this system
        fd = None
    try:
        now = read_process(process.pid)
        if now is None or now.start_ticks != process.start_ticks or not now.alive:
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            os.kill(process.pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def kill_all(select_processes: Callable[[], list[Process]], timeout: float = 5.0) -> list[int]:
    """SIGKILL what ``select_processes`` returns until it returns nothing (stubs ignore SIGTERM).

    Args:
        select_processes: called again after each round; a process forked meanwhile is found next round.
        timeout: seconds before giving up on processes that do not end (the rest is returned anyway).

    Returns:
        The pids signalled.
    """
    killed: list[int] = []
    refused: set[int] = set()  # another user's: not ours to end
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in select_processes() if p.pid not in refused]
        if not left:
            break
        for process in left:
            if process.pid in killed:
                continue
            try:
                if kill_process(process):
                    killed.append(process.pid)
            except PermissionError:
                refused.add(process.pid)
        time.sleep(0.05)
    return killed


# -- shared memory ---------------------------------------------------------------------------------------------


def region_files(prefix: str, directory: Path = SHM_DIR) -> list[Path]:
    """The shared-memory regions whose names start with ``prefix``.

    Args:
        prefix: a server prefix or the project prefix.
        directory: where POSIX shared memory lives.
    """
    try:
        return sorted(p for p in directory.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def remove_regions(prefix: str, directory: Path = SHM_DIR) -> list[str]:
    """Remove the regions of ``prefix``; returns the names removed.

    Args:
        prefix: a server prefix.
        directory: where POSIX shared memory lives.
    """
    removed = []
    for path in region_files(prefix, directory):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def regions_in_use(among: Iterable[Process], directory: Path = SHM_DIR) -> set[str]:
    """Names of the project's regions that a live process has mapped or open.

    Args:
        among: the processes to look at.
        directory: where POSIX shared memory lives.
    """
    marker = f"{directory}/{PROJECT_PREFIX}"
    used: set[str] = set()
    for process in among:
        if not process.alive:
            continue
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{process.pid}/maps").read_text().splitlines():
                if marker in line:
                    used.add(line.rsplit("/", 1)[-1].removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{process.pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith(marker):
                        used.add(target.rsplit("/", 1)[-1].removesuffix(" (deleted)"))
    return used


# -- cleaning up -----------------------------------------------------------------------------------------------


@dataclass
class Cleanup:
    """What a cleanup removed.

    Args:
        killed: pids of the processes killed.
        regions: names of the shared-memory regions removed.
    """

    killed: list[int] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.killed or self.regions)

    def describe(self) -> str:
        """``"2 processes and 4 shared-memory regions"`` (what was removed, in words)."""
        p, r = len(self.killed), len(self.regions)
        return f"{p} process{'es' if p != 1 else ''} and {r} shared-memory region{'s' if r != 1 else ''}"


def cleanup(prefix: str, timeout: float = 5.0, directory: Path = SHM_DIR) -> Cleanup:
    """Kill every process of the server with ``prefix`` (``tritonserver``, stubs) and remove its regions.

    Args:
        prefix: the server's prefix.
        timeout: seconds to wait for the processes to end.
        directory: where POSIX shared memory lives.
    """
    killed = kill_all(lambda: server_processes(prefix), timeout)
    return Cleanup(killed=killed, regions=remove_regions(prefix, directory))


def stale_processes(among: list[Process]) -> list[Process]:
    """The project's ``tritonserver`` and stub processes whose owner is gone.

    A ``tritonserver`` is stale when its parent is no longer the process named in its prefix (that process
    ended; the kernel gave its children to pid 1 or a subreaper). A stub is stale when its parent is not a
    live, non-stale ``tritonserver`` carrying the same prefix (its server ended under it). A process whose
    parent is such a live server is never stale: a stub just forked, not yet executed, still shows
    ``tritonserver``'s name and command line. Other users' processes, and other programs', never match:
    only this user's processes named so and carrying this project's prefix are looked at.

    Args:
        among: every process (from :func:`processes`).
    """
    by_pid = {p.pid: p for p in among}
    ours = [p for p in among if p.alive and p.is_mine and p.is_triton and p.prefixes()]
    servers_ok: set[int] = set()
    for p in ours:
        if p.name != SERVER_NAME:
            continue
        owners = {int(PREFIX_PATTERN.match(x).group(1)) for x in p.prefixes()}  # type: ignore[union-attr]
        if p.ppid in owners:
            servers_ok.add(p.pid)
    stale: list[Process] = []
    for p in ours:
        if p.pid in servers_ok:
            continue
        parent = by_pid.get(p.ppid)
        if parent is None or parent.pid not in servers_ok or not (p.prefixes() & parent.prefixes()):
            stale.append(p)  # a server whose launcher is gone, or a stub (or fork) whose server is gone
    return stale


def stale_regions(among: list[Process] | None = None, directory: Path = SHM_DIR) -> list[Path]:
    """The project's regions that no live process carries the prefix of, maps or holds open.

    The regions are listed before the processes are read, so that a server starting meanwhile is never
    mistaken for a dead one: a region that exists before the snapshot was made by a process that, if it
    still lives, is in the snapshot (listing the other way round loses a region created in between).

    Args:
        among: every process, read after the regions were listed (default: read now, after listing).
        directory: where POSIX shared memory lives.
    """
    candidates = region_files(PROJECT_PREFIX, directory)
    if among is None:
        among = processes()
    live_prefixes = {x for p in among if p.alive for x in p.prefixes()}
    used = regions_in_use(among, directory)
    stale = []
    for path in candidates:
        match = PREFIX_PATTERN.match(path.name)
        if match is None or match.group(0) in live_prefixes or path.name in used:
            continue
        with contextlib.suppress(OSError):
            if path.stat().st_uid == os.geteuid():
                stale.append(path)
    return stale


def clean_stale(timeout: float = 5.0, directory: Path = SHM_DIR) -> Cleanup:
    """Remove what earlier servers of this project left behind: stale processes, then stale regions.

    Args:
        timeout: seconds to wait for the stale processes to end.
        directory: where POSIX shared memory lives.
    """
    killed = kill_all(lambda: stale_processes(processes()), timeout)
    removed = []
    for path in stale_regions(directory=directory):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return Cleanup(killed=killed, regions=removed)


# -- the parent-death signal and the watchdog ------------------------------------------------------------------


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child the parent-death signal ``sig`` (Linux ``PR_SET_PDEATHSIG``).

    The kernel sends it when the *thread* that forked the child ends, so this is only offered to the main
    thread (which lives as long as the process); elsewhere, and off Linux, it returns ``None`` and the
    :class:`Watchdog` alone ends the server.

    Args:
        sig: the signal the child gets.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: nothing that imports or locks
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the line above: end now
            os.kill(os.getpid(), sig)

    return preexec


class Watchdog:
    """A process that cleans up one server when its ``tritonserver`` ends, and again when its launcher ends.

    Args:
        prefix: the server's prefix.
        server_pid: the ``tritonserver`` to watch (a pidfd to it is passed, so a reused pid cannot confuse
            the watchdog); ``None`` watches only the launcher.
        workdir: a temporary folder of the launcher's to remove when the launcher ends.
    """

    def __init__(self, prefix: str, server_pid: int | None = None, workdir: Path | None = None) -> None:
        self.prefix = prefix
        read, self._write = os.pipe()  # the write end stays here only (not inheritable)
        fds = [read]
        pidfd = None
        if server_pid is not None:
            with contextlib.suppress(AttributeError, OSError):
                pidfd = os.pidfd_open(server_pid)
                fds.append(pidfd)
        command = [sys.executable, "-m", "braintumor_serving.lifecycle", "--prefix", prefix, "--pipe", str(read)]
        if pidfd is not None:
            command += ["--pidfd", str(pidfd)]
        if workdir is not None:
            command += ["--workdir", str(workdir)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), env.get("PYTHONPATH")]))
        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=fds,
                start_new_session=True,  # Ctrl+C in a terminal reaches the launcher, not the watchdog
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            for fd in fds:
                os.close(fd)

    def close(self, timeout: float = 10.0) -> None:
        """Tell the watchdog that the launcher is done (it cleans what is left and exits) and reap it.

        Args:
            timeout: seconds to wait for it.
        """
        if self._write >= 0:
            os.close(self._write)
            self._write = -1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)


def watch(prefix: str, pipe: int, pidfd: int | None = None, workdir: Path | None = None) -> None:
    """The watchdog's body: when ``pidfd`` is readable (``tritonserver`` ended), clean up the server with
    ``prefix``; when ``pipe`` closes (the launcher ended, however), clean up again, remove ``workdir`` and
    return.

    Args:
        prefix: the server's prefix.
        pipe: the read end of the launcher's pipe.
        pidfd: a pidfd of ``tritonserver`` or ``None``.
        workdir: the launcher's temporary folder, or ``None``.
    """
    poller = select.poll()
    poller.register(pipe, select.POLLIN | select.POLLHUP)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        cleanup(prefix)
        if any(fd == pipe for fd, _ in events):
            break
        poller.unregister(pidfd)  # the server ended: only the launcher is left to wait for
    if workdir is not None and workdir.name.startswith(WORKDIR_PREFIX):
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the watchdog process.

    Args:
        argv: its arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description="braintumor serve's watchdog: ends one Triton server's leftovers")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--pipe", type=int, required=True)
    parser.add_argument("--pidfd", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not PREFIX_PATTERN.fullmatch(args.prefix):
        parser.error(f"not a server prefix: {args.prefix!r}")
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watch(args.prefix, args.pipe, args.pidfd, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
