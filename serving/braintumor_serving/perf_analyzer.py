"""Triton's own load generator, ``perf_analyzer``, for this project: where it comes from and how to run it.

The ``perf-analyzer`` wheels on PyPI need glibc 2.38 (Debian 12 has 2.36), so ``scripts/setup.sh`` takes the
``perf_analyzer`` binary of Triton's release 24.10, the server's own (2.51), from the ``tritonclient==2.51.0``
wheel, which shipped it, into ``.tools/perf_analyzer/bin/``, without installing that older client
(``python -m braintumor_serving.perf_analyzer install``). The binary links ``libb64`` and ``libcudart``
(unused without a GPU); both come from the ``nvidia-pytriton`` wheel's bundled libraries, copied beside it.

The statistics API is restricted to the admin key, and ``perf_analyzer`` reads the server's statistics after
every measurement, so against ``braintumor serve`` it needs ``-H triton-grpc-protocol-admin-key:KEY`` (gRPC)
or ``-H admin-key:KEY`` (HTTP); :func:`run` passes it.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

#: The tritonclient wheel that carries the perf_analyzer of Triton 2.51 (the server's release).
WHEEL = "tritonclient==2.51.0"
WHEEL_MEMBER = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
#: Where setup.sh installs it: ``<project>/.tools/perf_analyzer``.
DEFAULT_HOME = Path(__file__).resolve().parents[2] / ".tools" / "perf_analyzer"
#: Libraries the binary links, as the nvidia-pytriton wheel names its bundled copies (glob) -> the name needed.
LIBRARIES = {"libb64-*.so.0d": "libb64.so.0d", "libcudart-*.so.12*": "libcudart.so.12"}
#: The gRPC metadata key of the admin key (Triton prefixes restricted-protocol headers with this).
GRPC_ADMIN_HEADER = "triton-grpc-protocol-admin-key"


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, or a measurement failed."""


def _pytriton_libraries() -> Path:
    import pytriton

    return Path(next(iter(pytriton.__path__))).parent / "nvidia_pytriton.libs"


def install(home: Path = DEFAULT_HOME) -> Path:
    """Download the pinned tritonclient wheel (pip, no dependencies) and install its ``perf_analyzer``.

    Args:
        home: the folder that gets ``bin/perf_analyzer`` and ``lib/``.

    Returns:
        The path of the installed binary.
    """
    binary = home / "bin" / "perf_analyzer"
    lib = home / "lib"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL], check=True
        )
        wheel = next(Path(tmp).glob("tritonclient-*.whl"))
        binary.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as src, open(binary, "wb") as dst:
            shutil.copyfileobj(src, dst)
    binary.chmod(0o755)
    lib.mkdir(exist_ok=True)
    bundled = _pytriton_libraries()
    for pattern, name in LIBRARIES.items():
        found = sorted(bundled.glob(pattern))
        if not found:
            raise PerfAnalyzerError(f"{pattern} not found in {bundled}: is nvidia-pytriton installed?")
        shutil.copy2(found[-1], lib / name)
    return binary


@dataclass(frozen=True)
class PerfAnalyzer:
    """An installed ``perf_analyzer``.

    Args:
        binary: the executable.
        library_path: the folder with the libraries it links.
    """

    binary: Path
    library_path: Path

    def command_env(self) -> dict[str, str]:
        """The environment to run it in (its libraries first on ``LD_LIBRARY_PATH``)."""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.library_path), env.get("LD_LIBRARY_PATH")]))
        return env


def find(home: Path = DEFAULT_HOME) -> PerfAnalyzer:
    """The installed perf_analyzer (``$BRAINTUMOR_PERF_ANALYZER`` names another binary).

    Args:
        home: where :func:`install` put it.

    Raises:
        PerfAnalyzerError: when it is not installed, saying how to install it.
    """
    chosen = os.environ.get("BRAINTUMOR_PERF_ANALYZER")
    binary = Path(chosen) if chosen else home / "bin" / "perf_analyzer"
    if not binary.is_file():
        raise PerfAnalyzerError(
            f"perf_analyzer not found at {binary}: run bash scripts/setup.sh, or "
            ".venv/bin/python -m braintumor_serving.perf_analyzer install"
        )
    return PerfAnalyzer(binary, binary.parent.parent / "lib")


@dataclass
class Measurement:
    """What perf_analyzer measured at one concurrency.

    Args:
        concurrency: requests in flight.
        batch_size: images per request.
        images_per_s: throughput (inferences per second times the batch size).
        latency_ms: client-side p50, p90, p95 and p99, in milliseconds.
        server_us: the server's average per request, in microseconds: queue, compute input, compute
            infer and compute output (Triton's statistics extension).
        formed_batch: the average batch the server executed (inferences over executions).
        command: the command line, with the admin key replaced by ``KEY``.
        client_cores: CPU cores perf_analyzer used on average over its run (its warm-up and windows).
        server_cores: CPU cores the server (``tritonserver`` and its stubs) used over the same run, when its
            process was given.
    """

    concurrency: int
    batch_size: int
    images_per_s: float
    latency_ms: dict[str, float]
    server_us: dict[str, float]
    formed_batch: float | None
    command: str
    client_cores: float | None = None
    server_cores: float | None = None


def command(
    url: str,
    model: str,
    *,
    concurrency: int,
    admin_key: str,
    version: str = "",
    batch_size: int = 1,
    window_ms: int = 5000,
    csv_file: Path | None = None,
) -> list[str]:
    """The perf_analyzer arguments for batch-``batch_size`` gRPC requests at ``concurrency`` in flight.

    Windows of ``window_ms`` are measured until three in a row agree within 1000 % (at once, in practice; at
    most ten), so the run time stays bounded even on a busy machine; the figures are the last three's.

    Args:
        url: the gRPC endpoint, ``host:port``.
        model: the model's name.
        concurrency: requests in flight.
        admin_key: the server's admin key (its statistics API is restricted).
        version: the model version ("" = the server's latest).
        batch_size: images per request.
        window_ms: length of each measurement window.
        csv_file: where perf_analyzer writes its CSV report.
    """
    args = ["-m", model, "-u", url, "-i", "grpc", "-b", str(batch_size)]
    args += ["--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", "1000", "-r", "10"]
    args += ["--percentile=99", "-H", f"{GRPC_ADMIN_HEADER}:{admin_key}"]
    if version:
        args += ["-x", str(version)]
    if csv_file is not None:
        args += ["-f", str(csv_file)]
    return args


def parse_csv(text: str) -> dict[str, object]:
    """Throughput, latency percentiles and the server's breakdown from perf_analyzer's CSV report.

    Args:
        text: the CSV (``-f``), one row per concurrency; the first row is used.
    """
    row = next(csv.DictReader(io.StringIO(text)))
    us = {k.strip(): float(v) for k, v in row.items() if k and v not in (None, "")}
    return {
        "images_per_s": us["Inferences/Second"],  # an inference is one image (one batch row), whatever batch_size
        "latency_ms": {q: us[f"{q} latency"] / 1000.0 for q in ("p50", "p90", "p95", "p99")},
        "server_us": {
            "queue": us["Server Queue"],
            "compute_input": us["Server Compute Input"],
            "compute_infer": us["Server Compute Infer"],
            "compute_output": us["Server Compute Output"],
        },
    }


def run(
    analyzer: PerfAnalyzer,
    url: str,
    model: str,
    *,
    concurrency: int,
    admin_key: str,
    version: str = "",
    window_ms: int = 5000,
    timeout: float = 300.0,
    server_pid: int | None = None,
) -> Measurement:
    """Run perf_analyzer once against a server; batch-1 requests over gRPC.

    Args:
        analyzer: the installed perf_analyzer.
        url: the gRPC endpoint.
        model: the model's name.
        concurrency: requests in flight.
        admin_key: the server's admin key.
        version: the model version ("" = latest).
        window_ms: length of each of the three measurement windows.
        timeout: seconds before the run is abandoned.
        server_pid: the ``tritonserver`` process, to measure the CPU the server used (on the same machine).

    Raises:
        PerfAnalyzerError: with the end of its output when it fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        args = command(
            url,
            model,
            concurrency=concurrency,
            admin_key=admin_key,
            version=version,
            window_ms=window_ms,
            csv_file=report,
        )
        before_client, before_server = _children_cpu_s(), process_tree_cpu_s(server_pid) if server_pid else 0.0
        started = time.perf_counter()
        done = subprocess.run(
            [str(analyzer.binary), *args],
            env=analyzer.command_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        wall = time.perf_counter() - started
        client_cores = (_children_cpu_s() - before_client) / wall
        server_cores = (process_tree_cpu_s(server_pid) - before_server) / wall if server_pid else None
        if done.returncode != 0 or not report.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise PerfAnalyzerError(f"perf_analyzer failed (status {done.returncode}): {' | '.join(tail)}")
        parsed = parse_csv(report.read_text())
    inferences = executions = None
    for line in done.stdout.splitlines():
        text = line.strip()
        if text.startswith("Inference count:"):
            inferences = float(text.split(":")[1])
        elif text.startswith("Execution count:"):
            executions = float(text.split(":")[1])
    shown = command(url, model, concurrency=concurrency, admin_key="KEY", version=version, window_ms=window_ms)
    return Measurement(
        concurrency=concurrency,
        batch_size=1,
        images_per_s=float(parsed["images_per_s"]),  # type: ignore[arg-type]
        latency_ms=parsed["latency_ms"],  # type: ignore[arg-type]
        server_us=parsed["server_us"],  # type: ignore[arg-type]
        formed_batch=inferences / executions if inferences and executions else None,
        command=" ".join(["perf_analyzer", *shown]),
        client_cores=client_cores,
        server_cores=server_cores,
    )


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process and its living children have used so far (Linux ``/proc``).

    Args:
        pid: the process (here ``tritonserver``; its children are the python backend's stubs).
    """
    from braintumor_serving.triton import child_pids

    total_ticks = 0
    for one in [pid, *child_pids(pid)]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a stub that exited meanwhile
            continue
        total_ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total_ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    """``python -m braintumor_serving.perf_analyzer install [HOME]``: install perf_analyzer (setup.sh).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
    """
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "install":
        print("usage: python -m braintumor_serving.perf_analyzer install [HOME]", file=sys.stderr)
        return 2
    binary = install(Path(args[1]) if len(args) > 1 else DEFAULT_HOME)
    check = subprocess.run([str(binary), "--help"], env=find(binary.parent.parent).command_env(), capture_output=True)
    if b"perf_analyzer" not in check.stdout + check.stderr:
        print(f"{binary} does not run: {check.stderr.decode(errors='replace')[-300:]}", file=sys.stderr)
        return 1
    print(f"perf_analyzer installed: {binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
