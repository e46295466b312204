"""A bounded soak of a running server: steady load at a fraction of its measured capacity, checked throughout.

:func:`measure_capacity` finds the request rate the server sustains with a mix of versions, batch sizes and
explanation requests (closed loop, every worker sending back to back). :func:`run_soak` then sends the
same mix open-loop at a fixed rate (``fraction`` of that capacity, evenly spaced) for ``seconds``, and
records every request (its latency from the time it was *scheduled*, so that a slow server cannot hide
its queue by slowing the load; how late the load generator itself put it out; whether it failed; whether
its answer differed from in-process ONNX Runtime on the same tensors) and, every second, the resident
memory and open file descriptors of ``tritonserver`` and its python-backend stubs. :func:`summarize` turns
that into the checks of issue 17:

- memory: the median resident memory of the last comparison window exceeds that of the first window after
  warm-up by at most 5 %;
- file descriptors: after warm-up they vary by at most a few (connections come and go), and do not climb;
- latency: the p99 is taken per 10 s block, and the median of the block p99s of the last window is
  compared with that of the first window (``p99_limit``:
  1.2, the issue's "within 20 %", for the 10-minute soak; the 2-minute CI run uses a generous bound that
  catches only large regressions). When the load generator itself falls behind (p99 of its lag above
  ``lag_limit``, 100 ms), the machine starved the *client* and its latencies say nothing of the server:
  the latency check is then not evaluated (``skipped``, with the reason), never passed silently. The p99 of
  latencies divided by the median of their class (version, batch size, explain) is reported beside it;
- zero errors, and every answer (probabilities, and the heatmap when asked for) within 1e-5 of in-process
  ONNX Runtime.

:func:`write_report` writes ``soak-<seconds>s.json``, ``.md`` and ``.png`` (memory, descriptors and p99 over
time) into a folder (``docs/soak``).
"""

from __future__ import annotations

import json
import os
import platform
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braintumor.config import HEATMAP_NAME, INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from braintumor_serving.lifecycle import processes, server_processes

#: Largest difference from in-process ONNX Runtime that still counts as the same answer.
TOLERANCE = 1e-5


@dataclass(frozen=True)
class Mix:
    """What the load sends: each request draws a version, a batch size and whether to ask for the heatmap.

    Args:
        versions: the served versions, drawn uniformly.
        batch_sizes: ``(batch size, weight)`` pairs.
        explain: the share of requests that also ask for the Grad-CAM heatmap output.
    """

    versions: tuple[int, ...]
    batch_sizes: tuple[tuple[int, float], ...] = ((1, 0.55), (2, 0.2), (4, 0.12), (8, 0.08), (16, 0.05))
    explain: float = 0.3


@dataclass(frozen=True)
class Job:
    """One request of the load.

    Args:
        index: its number (it seeds the draw).
        version: the model version it asks.
        batch: its batch size.
        explain: whether it asks for the heatmap too.
        offset: where its images start in the pool.
    """

    index: int
    version: int
    batch: int
    explain: bool
    offset: int


def draw(mix: Mix, index: int, pool_size: int, seed: int = 17) -> Job:
    """Request number ``index`` of the mix (the same index always gives the same request).

    Args:
        mix: the mix.
        index: the request's number.
        pool_size: how many images the pool holds.
        seed: the load's seed.
    """
    rng = np.random.default_rng([seed, index])
    sizes, weights = zip(*mix.batch_sizes, strict=True)
    batch = int(rng.choice(sizes, p=np.asarray(weights) / sum(weights)))
    return Job(
        index=index,
        version=int(rng.choice(mix.versions)),
        batch=batch,
        explain=bool(rng.random() < mix.explain),
        offset=int(rng.integers(0, pool_size - batch + 1)),
    )


class Reference:
    """Every version's answers for the pool, computed in-process with ONNX Runtime.

    Args:
        repository: the model repository the server serves.
        versions: the versions to compute.
        pixels: the pool of input tensors, ``uint8`` ``(n, size, size, 3)``.
    """

    def __init__(self, repository: Path, versions: tuple[int, ...], pixels: np.ndarray) -> None:
        import onnxruntime as ort

        self.pixels = pixels
        self.answers: dict[int, dict[str, np.ndarray]] = {}
        for version in versions:
            session = ort.InferenceSession(str(repository / MODEL_NAME / str(version) / "model.onnx"))
            probabilities, heatmaps = session.run([OUTPUT_NAME, HEATMAP_NAME], {INPUT_NAME: pixels})
            self.answers[version] = {OUTPUT_NAME: probabilities, HEATMAP_NAME: heatmaps}

    def difference(self, job: Job, outputs: dict[str, np.ndarray]) -> float:
        """The largest absolute difference between the server's outputs for ``job`` and the reference.

        Args:
            job: the request.
            outputs: the outputs the server returned, by name.
        """
        worst = 0.0
        for name, got in outputs.items():
            want = self.answers[job.version][name][job.offset : job.offset + job.batch]
            if got.shape != want.shape:
                return float("inf")
            worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
        return worst


class Sender:
    """One gRPC connection that sends jobs and checks their answers.

    Args:
        url: the server's gRPC ``host:port``.
        reference: the expected answers.
        timeout: seconds before a request counts as failed.
    """

    def __init__(self, url: str, reference: Reference, timeout: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.reference = reference
        self.timeout = timeout

    def send(self, job: Job) -> tuple[float, str, float]:
        """Send ``job``.

        Args:
            job: the request.

        Returns:
            ``(latency in seconds, outcome, difference)``: outcome ``ok``, ``wrong`` (an answer differs by
            more than :data:`TOLERANCE`) or ``error: <message>``.
        """
        grpc = self._grpc
        pixels = self.reference.pixels[job.offset : job.offset + job.batch]
        inp = grpc.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)
        names = [OUTPUT_NAME, HEATMAP_NAME] if job.explain else [OUTPUT_NAME]
        outputs = [grpc.InferRequestedOutput(name) for name in names]
        started = time.perf_counter()
        try:
            result = self.client.infer(
                MODEL_NAME, [inp], model_version=str(job.version), outputs=outputs, client_timeout=self.timeout
            )
        except Exception as err:  # every failure is counted, none may stop the load
            return time.perf_counter() - started, f"error: {str(err)[:160]}", float("nan")
        latency = time.perf_counter() - started
        difference = self.reference.difference(job, {name: result.as_numpy(name) for name in names})
        return latency, "ok" if difference <= TOLERANCE else "wrong", difference

    def close(self) -> None:
        """Close the connection."""
        self.client.close()


@dataclass
class Sample:
    """One reading of the server's processes.

    Args:
        t: seconds since the soak began.
        rss_bytes: resident memory of ``tritonserver`` and its stubs together.
        fds: their open file descriptors together.
        processes: how many there are.
        server_rss_bytes: the part of ``rss_bytes`` that is ``tritonserver``'s own.
        shmem_rss_bytes: the part of ``rss_bytes`` in shared memory.
        cpu_busy_ticks, cpu_total_ticks: the machine's busy and total CPU time so far (``/proc/stat``, clock
            ticks, all CPUs).
        cpu_ours_ticks: the CPU time so far of the server's processes and of this (the load's) process.
    """

    t: float
    rss_bytes: int
    fds: int
    processes: int
    server_rss_bytes: int = 0
    shmem_rss_bytes: int = 0
    cpu_busy_ticks: int = 0
    cpu_total_ticks: int = 0
    cpu_ours_ticks: int = 0


def _machine_ticks() -> tuple[int, int]:
    """The machine's busy and total CPU clock ticks since boot, all CPUs together (``/proc/stat``)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    idle = values[3] + values[4]  # idle and iowait
    return sum(values) - idle, sum(values)


def _process_ticks(pid: int) -> int:
    """User and system CPU clock ticks of process ``pid`` (all its threads), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


def read_usage(prefix: str) -> Sample:
    """The resident memory, open descriptors and count of the processes of the server with ``prefix``
    (``t`` is left 0).

    Resident memory is the sum of each process's ``VmRSS``; ``shmem_rss_bytes`` is the part of it in shared
    memory (``RssShmem``: the python backend's regions, counted once in ``tritonserver`` and once in the
    stub that shares each), ``server_rss_bytes`` the part of ``tritonserver`` itself.

    Args:
        prefix: the server's shared-memory prefix (:attr:`TritonServer.shm_prefix`).
    """
    usage = Sample(t=0.0, rss_bytes=0, fds=0, processes=0)
    usage.cpu_busy_ticks, usage.cpu_total_ticks = _machine_ticks()
    usage.cpu_ours_ticks = _process_ticks(os.getpid())
    for process in server_processes(prefix):
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            open_fds = len(os.listdir(f"/proc/{process.pid}/fd"))
        except OSError:
            continue
        usage.cpu_ours_ticks += _process_ticks(process.pid)
        fields = {k: v.split() for k, _, v in (line.partition(":") for line in status.splitlines())}
        rss = int(fields.get("VmRSS", ["0"])[0]) * 1024
        usage.rss_bytes += rss
        usage.shmem_rss_bytes += int(fields.get("RssShmem", ["0"])[0]) * 1024
        if process.name == "tritonserver":
            usage.server_rss_bytes += rss
        usage.fds += open_fds
        usage.processes += 1
    return usage


@dataclass
class Record:
    """One request as it went.

    Args:
        t: when it was scheduled, in seconds since the soak began.
        latency: seconds from its scheduled time to the answer (open loop: waiting for a free connection
            counts).
        lag: seconds the load generator put it out after its scheduled time (the generator falling behind,
            for want of CPU: not the server's doing).
        version, batch, explain: what it asked.
        outcome: ``ok``, ``wrong`` or ``error: ...``.
        difference: its largest difference from the in-process answer.
        service: seconds from the moment a connection sent it to the answer.
    """

    t: float
    latency: float
    lag: float
    version: int
    batch: int
    explain: bool
    outcome: str
    difference: float
    service: float = float("nan")


@dataclass
class SoakRun:
    """Everything one soak recorded.

    Args:
        seconds: its planned duration.
        rate: the request rate it sent at.
        capacity: the measured capacity (requests per second) the rate is a fraction of.
        warmup: seconds at the start that the checks leave out.
        records: every request.
        samples: the readings of the server's processes.
        environment: the machine and what else ran on it.
        preparation: figures from before the soak (e.g. memory when ready and after :func:`warm_shapes`).
    """

    seconds: float
    rate: float
    capacity: float
    warmup: float
    records: list[Record] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    preparation: dict[str, Any] = field(default_factory=dict)


def _workers(
    url: str, reference: Reference, count: int, take: Callable[[], Job | None], done: Callable[[Job, tuple], None]
) -> list[threading.Thread]:
    def work() -> None:
        sender = Sender(url, reference)
        try:
            while (job := take()) is not None:
                done(job, sender.send(job))
        finally:
            sender.close()

    threads = [threading.Thread(target=work, name=f"soak-{k}", daemon=True) for k in range(count)]
    for thread in threads:
        thread.start()
    return threads


def measure_capacity(
    url: str, reference: Reference, mix: Mix, seconds: float = 10.0, concurrency: int = 8, warmup: float = 3.0
) -> float:
    """Requests per second of ``mix`` that the server completes with ``concurrency`` requests always in flight.

    Args:
        url: the server's gRPC ``host:port``.
        reference: the expected answers (and the pool).
        mix: the request mix.
        seconds: how long to measure (after ``warmup``).
        concurrency: requests in flight.
        warmup: seconds sent before measuring.

    Raises:
        RuntimeError: when a request fails or answers wrongly.
    """
    lock = threading.Lock()
    counter = iter(range(10**9))
    start = time.monotonic()
    stop_at = start + warmup + seconds
    completed: list[float] = []
    failures: list[str] = []

    def take() -> Job | None:
        with lock:
            if time.monotonic() >= stop_at or failures:
                return None
            return draw(mix, 10**8 + next(counter), len(reference.pixels))

    def done(_job: Job, result: tuple) -> None:
        _latency, outcome, _difference = result
        with lock:
            if outcome != "ok":
                failures.append(outcome)
            completed.append(time.monotonic())

    for thread in _workers(url, reference, concurrency, take, done):
        thread.join()
    if failures:
        raise RuntimeError(f"capacity measurement: {len(failures)} failed or wrong answers, first: {failures[0]}")
    measured = [t for t in completed if t >= start + warmup]
    return len(measured) / seconds


def warm_shapes(
    url: str, reference: Reference, versions: tuple[int, ...], max_batch: int = 32, copies: int = 2
) -> None:
    """Run every batch size from ``max_batch`` down to 1 on every version, ``copies`` requests at a time per
    version (so that each of its instances gets them).

    ONNX Runtime keeps memory per input shape it has run (a one-time growth, bounded by the batch sizes:
    about 100 MiB per instance here between seeing batches of 1 and 32 only and seeing all 32 sizes), and the
    dynamic batcher makes any size up to ``max_batch`` from the requests it gathers. Without this step a soak
    sees that growth as it meets new sizes, for minutes, and mistakes it for a leak.

    Args:
        url: the server's gRPC ``host:port``.
        reference: the expected answers (its pool must hold ``max_batch`` images).
        versions: the served versions.
        max_batch: the model's largest batch.
        copies: requests in flight per version (the instances per version).

    Raises:
        RuntimeError: when a request fails or answers wrongly.
    """
    from concurrent.futures import ThreadPoolExecutor

    senders = [Sender(url, reference) for _ in range(len(versions) * copies)]
    try:
        with ThreadPoolExecutor(len(senders)) as pool:
            for batch in range(max_batch, 0, -1):
                jobs = [Job(-1, version, batch, True, 0) for version in versions for _ in range(copies)]
                for job, (_latency, outcome, _difference) in zip(
                    jobs, pool.map(lambda pair: pair[0].send(pair[1]), zip(senders, jobs, strict=True)), strict=True
                ):
                    if outcome != "ok":
                        raise RuntimeError(f"shape warm-up, version {job.version} batch {batch}: {outcome}")
    finally:
        for sender in senders:
            sender.close()


def _environment() -> dict[str, Any]:
    training = [
        " ".join(p.args[1:6]) for p in processes() if p.alive and "braintumor" in " ".join(p.args) and "train" in p.args
    ]
    return {
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "machine": platform.machine(),
        "python": platform.python_version(),
        "training_jobs_running": len(training),
        "training_jobs": training,
    }


def run_soak(
    url: str,
    prefix: str,
    reference: Reference,
    mix: Mix,
    seconds: float,
    rate: float,
    capacity: float,
    warmup: float,
    workers: int = 8,
    sample_every: float = 1.0,
    preparation: dict[str, Any] | None = None,
) -> SoakRun:
    """Send ``mix`` at ``rate`` requests per second for ``seconds``, recording every request and, every
    ``sample_every`` seconds, the memory and descriptors of the server's processes.

    Args:
        url: the server's gRPC ``host:port``.
        prefix: the server's shared-memory prefix (to find its processes).
        reference: the expected answers (and the pool).
        mix: the request mix.
        seconds: how long.
        rate: requests per second, evenly spaced.
        capacity: the capacity the rate derives from (recorded).
        warmup: seconds the checks leave out (recorded).
        workers: connections sending in parallel.
        sample_every: seconds between readings.
        preparation: figures from before the soak, kept in the record.
    """
    run = SoakRun(
        seconds=seconds,
        rate=rate,
        capacity=capacity,
        warmup=warmup,
        environment=_environment(),
        preparation=dict(preparation or {}),
    )
    jobs: queue.Queue[tuple[Job, float, float] | None] = queue.Queue()
    lock = threading.Lock()
    start = time.monotonic()
    finished = threading.Event()

    def take() -> Job | None:
        item = jobs.get()
        if item is None:
            return None
        job, scheduled, lag = item
        with lock:
            pending[job.index] = (scheduled, lag)
        return job

    pending: dict[int, tuple[float, float]] = {}

    def done(job: Job, result: tuple) -> None:
        answered = time.monotonic()
        service, outcome, difference = result
        with lock:
            scheduled, lag = pending.pop(job.index)
            run.records.append(
                Record(
                    t=scheduled - start,
                    latency=answered - scheduled,
                    lag=lag,
                    version=job.version,
                    batch=job.batch,
                    explain=job.explain,
                    outcome=outcome,
                    difference=difference,
                    service=service,
                )
            )

    def sample() -> None:
        while not finished.wait(sample_every):
            usage = read_usage(prefix)
            usage.t = time.monotonic() - start
            run.samples.append(usage)

    sampler = threading.Thread(target=sample, name="soak-sampler", daemon=True)
    sampler.start()
    threads = _workers(url, reference, workers, take, done)
    index = 0
    while (scheduled := start + index / rate) < start + seconds:
        time.sleep(max(0.0, scheduled - time.monotonic()))
        job = draw(mix, index, len(reference.pixels))
        jobs.put((job, scheduled, time.monotonic() - scheduled))
        index += 1
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join()
    finished.set()
    sampler.join()
    run.records.sort(key=lambda r: r.t)
    run.environment["load_average_1m_end"] = os.getloadavg()[0]
    return run


# -- the checks and the report ---------------------------------------------------------------------------------


#: Seconds per latency block: the p99 is taken per block, and the blocks of two windows are compared.
BLOCK = 10.0
#: The p99 of the load generator's lag above which latencies say more about the client than the server.
LAG_LIMIT = 0.1
#: The share of the machine's CPU time that other processes (neither the server nor the load) may take
#: during the soak for its latencies to say something about the server.
FOREIGN_CPU_LIMIT = 0.25


def foreign_cpu_share(run: SoakRun) -> float:
    """The share of the machine's CPU time (all CPUs) after warm-up that went to processes other than the
    server's and the load's own (``nan`` without readings).

    Args:
        run: what :func:`run_soak` recorded.
    """
    steady = [s for s in run.samples if s.t >= run.warmup and s.cpu_total_ticks]
    if len(steady) < 2 or steady[-1].cpu_total_ticks <= steady[0].cpu_total_ticks:
        return float("nan")
    first, last = steady[0], steady[-1]
    busy = last.cpu_busy_ticks - first.cpu_busy_ticks
    ours = last.cpu_ours_ticks - first.cpu_ours_ticks
    return max(0.0, busy - ours) / (last.cpu_total_ticks - first.cpu_total_ticks)


def _p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99)) if latencies else float("nan")


def _class(record: Record) -> tuple[int, int, bool]:
    return record.version, record.batch, record.explain


def class_medians(run: SoakRun) -> dict[tuple[int, int, bool], float]:
    """The median latency of each (version, batch size, explain) class, over the answered requests after
    warm-up.

    Args:
        run: what :func:`run_soak` recorded.
    """
    groups: dict[tuple[int, int, bool], list[float]] = {}
    for r in run.records:
        if r.outcome == "ok" and r.t >= run.warmup:
            groups.setdefault(_class(r), []).append(r.latency)
    return {key: float(np.median(values)) for key, values in groups.items()}


def blocks(run: SoakRun, step: float = BLOCK) -> list[dict[str, float]]:
    """Per ``step`` seconds after warm-up: the p99 of the latencies normalised by their class's median, the
    raw p99, and the p99 of the load generator's lag.

    Args:
        run: what :func:`run_soak` recorded.
        step: seconds per block.
    """
    medians = class_medians(run)
    out = []
    k = 0
    while (lo := run.warmup + k * step) + step <= run.seconds + 1e-9:
        rs = [r for r in run.records if lo <= r.t < lo + step]
        ok = [r for r in rs if r.outcome == "ok" and medians.get(_class(r), 0) > 0]
        out.append(
            {
                "t": lo + step,
                "requests": len(rs),
                "p99_normalised": _p99([r.latency / medians[_class(r)] for r in ok]),
                "p99_ms": 1000 * _p99([r.latency for r in ok]),
                "lag_p99_ms": 1000 * _p99([r.lag for r in rs]),
            }
        )
        k += 1
    return out


def summarize(
    run: SoakRun,
    window: float | None = None,
    p99_limit: float = 1.2,
    lag_limit: float = LAG_LIMIT,
    foreign_limit: float = FOREIGN_CPU_LIMIT,
) -> dict[str, Any]:
    """The soak's figures and checks.

    Args:
        run: what :func:`run_soak` recorded.
        window: seconds of the first and last comparison windows (default: a minute, or a third of the time
            after warm-up when that is shorter); the latency check compares whole :data:`BLOCK` s blocks,
            as many as fit the window (at least one).
        p99_limit: the largest ratio of the last window's p99 to the first's (the median of the p99s, in
            milliseconds, of its :data:`BLOCK` s blocks).
        lag_limit: seconds; when the p99 of the load generator's lag after warm-up is above it, the latency
            check is not evaluated (``skipped`` says why) and the other checks still are.
        foreign_limit: when other processes took more than this share of the machine's CPU time after
            warm-up (:func:`foreign_cpu_share`), the latency check is not evaluated either: its p99 would
            measure the neighbours' bursts, not the server.

    Returns:
        A JSON-ready summary with ``checks``: name to ``{"value", "limit", "passed"}`` (and ``"skipped"``,
        a reason, for a check that could not be evaluated: it counts as neither passed nor failed).
    """
    after = run.seconds - run.warmup
    window = window or min(60.0, after / 3)
    first = (run.warmup, run.warmup + window)
    last = (run.seconds - window, run.seconds)

    def within(t: float, span: tuple[float, float]) -> bool:
        return span[0] <= t < span[1]

    ok = [r for r in run.records if r.outcome == "ok"]
    errors = [r for r in run.records if r.outcome.startswith("error")]
    wrong = [r for r in run.records if r.outcome == "wrong"]
    steady_records = [r for r in run.records if r.t >= run.warmup]
    lag_p99 = _p99([r.lag for r in steady_records])
    per_block = blocks(run)
    n = max(1, min(len(per_block) // 2, round(window / BLOCK)))
    p99_first, p99_last = (
        float(np.median(values)) if (values := [b["p99_normalised"] for b in part]) else float("nan")
        for part in (per_block[:n], per_block[-n:])
    )
    # the check compares the p99 in milliseconds, as the issue states it; the normalised p99 (divided by
    # each class's median) is reported beside it: with small batches' medians of a few milliseconds it swings
    # with queueing (1.37 on a quiet machine where the raw p99 moved 134 -> 142 ms) and is too noisy to gate on
    ms_first, ms_last = (
        float(np.median(values)) if (values := [b["p99_ms"] for b in part if b["requests"]]) else float("nan")
        for part in (per_block[:n], per_block[-n:])
    )
    rss_first = float(np.median([s.rss_bytes for s in run.samples if within(s.t, first)]))
    rss_last = float(np.median([s.rss_bytes for s in run.samples if within(s.t, last)]))
    steady = [s for s in run.samples if s.t >= run.warmup]
    fds = [s.fds for s in steady]
    fds_first = [s.fds for s in steady if within(s.t, first)]
    fds_last = [s.fds for s in steady if within(s.t, last)]
    differences = [r.difference for r in run.records if not r.outcome.startswith("error")]
    latency_check: dict[str, Any] = {"value": ms_last / ms_first, "limit": p99_limit}
    foreign = foreign_cpu_share(run)
    if foreign > foreign_limit:
        latency_check["skipped"] = (
            f"not evaluated: other processes took {100 * foreign:.0f} % of the machine's CPU time during the "
            f"soak (limit {100 * foreign_limit:.0f} %), so p99 measures their bursts, not the server; run the "
            "soak on a machine without other heavy work"
        )
    elif not lag_p99 <= lag_limit:
        latency_check["skipped"] = (
            f"not evaluated: the load generator fell behind (p99 of its lag {1000 * lag_p99:.0f} ms after "
            f"warm-up, above {1000 * lag_limit:.0f} ms), so the client, not the server, was starved of CPU; "
            "run the soak on a machine without other heavy work"
        )
    elif not np.isfinite(latency_check["value"]):
        latency_check["skipped"] = "not evaluated: too few answered requests per block"
    checks = {
        "memory_growth": {"value": rss_last / rss_first - 1, "limit": 0.05},
        "fd_spread_after_warmup": {"value": max(fds) - min(fds), "limit": 8},
        "fd_climb_last_vs_first_window": {"value": max(fds_last) - max(fds_first), "limit": 2},
        "p99_last_over_first": latency_check,
        "errors": {"value": len(errors), "limit": 0},
        "wrong_answers": {"value": len(wrong), "limit": 0},
        "max_difference": {"value": max(differences, default=0.0), "limit": TOLERANCE},
    }
    for check in checks.values():
        check["passed"] = "skipped" not in check and bool(check["value"] <= check["limit"])
    by_batch = {
        str(b): {
            "requests": len(rs := [r for r in ok if r.batch == b and r.t >= run.warmup]),
            "p50_ms": 1000 * float(np.percentile([r.latency for r in rs], 50)) if rs else None,
            "p99_ms": 1000 * _p99([r.latency for r in rs]) if rs else None,
        }
        for b in sorted({r.batch for r in run.records})
    }
    raw = [b["p99_ms"] for b in per_block if b["requests"]]
    return {
        "seconds": run.seconds,
        "warmup_s": run.warmup,
        "window_s": window,
        "blocks_compared": n,
        "capacity_requests_per_s": run.capacity,
        "rate_requests_per_s": run.rate,
        "load_fraction": run.rate / run.capacity,
        "requests": len(run.records),
        "images": sum(r.batch for r in run.records),
        "achieved_requests_per_s": len(run.records) / run.seconds,
        "explain_share": float(np.mean([r.explain for r in run.records])) if run.records else 0.0,
        "versions": {
            str(v): sum(r.version == v for r in run.records) for v in sorted({r.version for r in run.records})
        },
        "errors": len(errors),
        "first_errors": sorted({r.outcome for r in errors})[:5],
        "wrong": len(wrong),
        "p99_normalised_first_window": p99_first,
        "p99_normalised_last_window": p99_last,
        "p99_ms_first_window": 1000 * _p99([r.latency for r in ok if within(r.t, first)]),
        "p99_ms_last_window": 1000 * _p99([r.latency for r in ok if within(r.t, last)]),
        "p50_ms_after_warmup": 1000 * float(np.percentile([r.latency for r in ok if r.t >= run.warmup] or [0], 50)),
        "p99_ms_10s_range_after_warmup": [min(raw), max(raw)] if raw else [],
        "latency_checked": "skipped" not in latency_check,
        "generator_lag_p99_ms": 1000 * lag_p99,
        "foreign_cpu_share": foreign,
        "foreign_cpu_limit": foreign_limit,
        "generator_lag_limit_ms": 1000 * lag_limit,
        "max_send_lag_ms": 1000 * max((r.lag for r in run.records), default=0.0),
        "rss_mib_first_window": rss_first / 2**20,
        "rss_mib_last_window": rss_last / 2**20,
        "rss_mib_max_after_warmup": max(s.rss_bytes for s in steady) / 2**20,
        "fds_min_max_after_warmup": [min(fds), max(fds)],
        "server_processes": sorted({s.processes for s in steady}),
        "by_batch": by_batch,
        "preparation": run.preparation,
        "environment": run.environment,
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values() if "skipped" not in c),
    }


def timeline(run: SoakRun, step: float = BLOCK) -> list[dict[str, float]]:
    """Per ``step`` seconds: requests, p99 latency (from the scheduled time), the p99 of the load
    generator's lag, and the mean memory and descriptors.

    Args:
        run: what :func:`run_soak` recorded.
        step: seconds per point.
    """
    points = []
    for k in range(int(np.ceil(run.seconds / step))):
        lo, hi = k * step, (k + 1) * step
        rs = [r for r in run.records if lo <= r.t < hi]
        ok = [r.latency for r in rs if r.outcome == "ok"]
        ss = [s for s in run.samples if lo <= s.t < hi]
        points.append(
            {
                "t": hi,
                "requests": len(ok),
                "p99_ms": 1000 * _p99(ok),
                "lag_p99_ms": 1000 * _p99([r.lag for r in rs]),
                "rss_mib": float(np.mean([s.rss_bytes for s in ss])) / 2**20 if ss else float("nan"),
                "fds": float(np.mean([s.fds for s in ss])) if ss else float("nan"),
            }
        )
    return points


def plot(run: SoakRun, summary: dict[str, Any], path: Path) -> None:
    """Memory and descriptors (every reading) and p99 latency (per 10 s) over time.

    Args:
        run: what :func:`run_soak` recorded.
        summary: what :func:`summarize` returned.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = timeline(run)
    fig, (memory, latency) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    memory.plot([s.t for s in run.samples], [s.rss_bytes / 2**20 for s in run.samples], color="C0")
    memory.set_ylabel("resident memory (MiB)", color="C0")
    fds = memory.twinx()
    fds.plot([s.t for s in run.samples], [s.fds for s in run.samples], color="C2", lw=1)
    fds.set_ylabel("open file descriptors", color="C2")
    memory.set_title("tritonserver and its python-backend stubs")
    latency.plot([p["t"] for p in points], [p["p99_ms"] for p in points], "o-", color="C3", label="p99 per 10 s")
    latency.plot(
        [p["t"] for p in points], [p["lag_p99_ms"] for p in points], "s--", color="C7", ms=3, label="generator lag p99"
    )
    latency.set_ylabel("latency from scheduled send (ms)")
    normalised = latency.twinx()
    per_block = blocks(run)
    normalised.plot([b["t"] for b in per_block], [b["p99_normalised"] for b in per_block], "^:", color="C4", ms=4, lw=1)
    normalised.set_ylabel("p99 / class median", color="C4")
    latency.set_xlabel("seconds")
    latency.legend(fontsize=8)
    for axis in (memory, latency):
        axis.axvspan(0, run.warmup, color="grey", alpha=0.15)
        for t in (summary["warmup_s"] + summary["window_s"], run.seconds - summary["window_s"]):
            axis.axvline(t, color="grey", ls=":", lw=1)
    fig.suptitle(
        f"Soak: {run.seconds:.0f} s at {run.rate:.1f} requests/s ({100 * run.rate / run.capacity:.0f} % of "
        f"{run.capacity:.1f} measured); grey: warm-up, dotted: compared windows",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(summary: dict[str, Any], command: str) -> str:
    """The summary as Markdown.

    Args:
        summary: what :func:`summarize` returned.
        command: the command that produced it.
    """
    env = summary["environment"]
    beside = (
        f"**{env['training_jobs_running']} model training job(s) ran on the same machine**"
        if env["training_jobs_running"]
        else "no training job ran on the machine"
    )
    lines = [
        f"# Soak: {summary['seconds']:.0f} s",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['cpus']} CPUs ({env['machine']}), Python {env['python']}; {beside}; load average "
        f"{env['load_average_1m']:.1f} at the start, {env.get('load_average_1m_end', float('nan')):.1f} at the end.",
        "",
        f"Load: {summary['rate_requests_per_s']:.1f} requests/s evenly spaced, "
        f"{100 * summary['load_fraction']:.0f} % of the {summary['capacity_requests_per_s']:.1f} requests/s "
        f"measured just before with the same mix (8 in flight): versions {summary['versions']}, batch sizes "
        f"{ {b: v['requests'] for b, v in summary['by_batch'].items()} } (after warm-up), "
        f"{100 * summary['explain_share']:.0f} % asking for the heatmap. {summary['requests']} requests, "
        f"{summary['images']} images; warm-up {summary['warmup_s']:.0f} s; compared windows "
        f"{summary['window_s']:.0f} s (the first after warm-up, the last).",
        "",
    ]
    prep = summary.get("preparation", {})
    if "rss_mib_ready" in prep and "rss_mib_after_shapes" in prep:
        lines += [
            f"Before the soak: resident memory {prep['rss_mib_ready']:.0f} MiB when the server was ready, "
            f"{prep['rss_mib_after_shapes']:.0f} MiB after every batch size from 1 to 32 had run on every version "
            "(ONNX Runtime keeps memory per input shape: a one-time growth bounded by the 32 sizes, which the "
            "dynamic batcher reaches sooner or later), and after the capacity measurement "
            f"{prep.get('rss_mib_after_capacity', float('nan')):.0f} MiB. The checks start after that.",
            "",
        ]
    spread = summary.get("p99_ms_10s_range_after_warmup") or []
    p99_range = f" (per 10 s window after warm-up: {spread[0]:.0f}–{spread[1]:.0f} ms)" if spread else ""
    lines += [
        "| check | value | limit | passed |",
        "|---|---|---|---|",
    ]
    for name, check in summary["checks"].items():
        value = check["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        passed = "not evaluated" if "skipped" in check else "yes" if check["passed"] else "**no**"
        lines.append(f"| {name} | {shown} | {check['limit']} | {passed} |")
    skipped = summary["checks"]["p99_last_over_first"].get("skipped")
    lines += [
        "",
        f"Latency is measured from each request's scheduled send time (open loop). p99_last_over_first: the "
        f"median of the p99s (ms) of the last {summary['blocks_compared']} blocks of 10 s over that of the first. "
        f"Reported beside it, the same with each latency divided by the median of its (version, batch, explain) "
        f"class: {summary['p99_normalised_first_window']:.2f} then {summary['p99_normalised_last_window']:.2f}. "
        f"The load generator's own lag: p99 {summary['generator_lag_p99_ms']:.0f} ms after warm-up (limit "
        f"{summary['generator_lag_limit_ms']:.0f} ms for the latency check to count); other processes took "
        f"{100 * summary.get('foreign_cpu_share', float('nan')):.0f} % of the machine's CPU time (limit "
        f"{100 * summary.get('foreign_cpu_limit', float('nan')):.0f} %)"
        + (f"; **the latency check was {skipped}**." if skipped else "."),
        "",
        f"Raw p99: {summary['p99_ms_first_window']:.0f} ms in the first window, {summary['p99_ms_last_window']:.0f} ms "
        f"in the last{p99_range}; p50 after warm-up {summary['p50_ms_after_warmup']:.0f} ms. Resident memory of "
        f"`tritonserver` and its stubs: {summary['rss_mib_first_window']:.0f} MiB, then "
        f"{summary['rss_mib_last_window']:.0f} MiB (max {summary['rss_mib_max_after_warmup']:.0f}); descriptors "
        f"{summary['fds_min_max_after_warmup'][0]}–{summary['fds_min_max_after_warmup'][1]}; largest send lag "
        f"{summary['max_send_lag_ms']:.0f} ms (how late the load generator, starved of CPU, sent a request).",
        "",
        "| batch | requests | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|",
    ]
    for batch, row in summary["by_batch"].items():
        p50 = "–" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}"
        p99 = "–" if row["p99_ms"] is None else f"{row['p99_ms']:.0f}"
        lines.append(f"| {batch} | {row['requests']} | {p50} | {p99} |")
    name = f"soak-{summary['seconds']:.0f}s"
    lines += ["", f"![memory and p99 over time]({name}.png)", ""]
    return "\n".join(lines)


def write_report(run: SoakRun, summary: dict[str, Any], out_dir: Path, command: str) -> list[Path]:
    """Write ``soak-<seconds>s.json`` (summary and timeline), ``.md`` and ``.png`` into ``out_dir``.

    Args:
        run: what :func:`run_soak` recorded.
        summary: what :func:`summarize` returned.
        out_dir: the folder (``docs/soak``).
        command: the command that produced it (shown in the Markdown).

    Returns:
        The files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"soak-{run.seconds:.0f}s"
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"]
    data = {"summary": summary, "timeline": timeline(run), "samples": [asdict(s) for s in run.samples]}
    paths[0].write_text(json.dumps(data, indent=1, default=float) + "\n")
    paths[1].write_text(render_markdown(summary, command))
    plot(run, summary, paths[2])
    return paths
