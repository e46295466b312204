"""``braintumor bench``: everything side by side in one run, against the embedded server it starts.

- In-process ONNX Runtime, per served version and precision (fp32; int8 where a version folder holds an
  int8 ``model.onnx`` beside ``model.fp32.onnx``), at batch 1, 8 and 32, once computing every output (what a
  request naming no output, e.g. perf_analyzer's, costs the server) and once cut down to the probabilities.
- Triton through its own ``perf_analyzer``: batch-1 gRPC requests at concurrency 1 and 16, per served
  version, with the server's breakdown (queue, compute input, infer, output) from its statistics.
- Ratios against the targets: concurrency 16 over the best in-process batch of the same work (≥ 0.95), and
  the p99 at concurrency 1 over in-process batch-1 p99 (≤ +1.5 ms).
- Preprocessing per image (:func:`.bench.bench_preprocessing`), the fraction of the CPU's FMA peak reached,
  and the server's resident memory (``tritonserver`` and its python stubs) with the served versions loaded,
  after every version has run every batch size.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from braintumor.config import HEATMAP_NAME, INPUT_NAME, MAX_BATCH_SIZE, MODEL_NAME, OUTPUT_NAME
from braintumor_serving.onnx_outputs import keep_outputs

#: The served int8 model's fp32 original keeps this name (``braintumor_training.quantize.FP32_FILE``).
FP32_FILE = "model.fp32.onnx"
MODEL_FILE = "model.onnx"
#: Targets of issue #14.
TARGET_RATIO = 0.95
TARGET_P99_OVERHEAD_MS = 1.5
TARGET_RSS_MB = 1024.0
#: FP32 floating-point operations per cycle and core with FMA: AVX-512 on AMD Zen 4 (family 25) runs one
#: 512-bit FMA per cycle (two 256-bit pipes), 16 lanes × 2 operations; Zen 5 (family 26) two.
FLOPS_PER_CYCLE = {25: 32, 26: 64}


def precisions(version_dir: Path) -> dict[str, Path]:
    """The model files of a version folder by precision: ``fp32`` always; ``int8`` when the served
    ``model.onnx`` is the int8 one and the fp32 original is kept beside it as ``model.fp32.onnx``.

    Args:
        version_dir: ``model_repository/<model>/<N>``.
    """
    if (version_dir / FP32_FILE).exists():
        return {"fp32": version_dir / FP32_FILE, "int8": version_dir / MODEL_FILE}
    return {"fp32": version_dir / MODEL_FILE}


def _percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples) * 1000.0
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 95, 99)}


def in_process(model: Path, outputs: list[str], pixels: np.ndarray, batch_size: int, seconds: float) -> dict[str, Any]:
    """Throughput and latency of in-process ONNX Runtime calls of ``batch_size`` images (all cores).

    Args:
        model: the ONNX file.
        outputs: the outputs to compute; fewer than the model's cuts the graph down to them first.
        pixels: uint8 images to cycle through.
        batch_size: images per call.
        seconds: measuring time.
    """
    import onnx

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    present = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
    source: str | bytes = str(model) if set(outputs) >= set(present) else keep_outputs(model, outputs)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    batch = np.resize(pixels, (batch_size, *pixels.shape[1:]))
    for _ in range(3):
        session.run(outputs, {INPUT_NAME: batch})
    times: list[float] = []
    cpu_before = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        session.run(outputs, {INPUT_NAME: batch})
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    throughput = len(times) * batch_size / elapsed
    return {
        "batch_size": batch_size,
        "images_per_s": throughput,
        "latency_ms": _percentiles(times),
        "cores": (time.process_time() - cpu_before) / elapsed,
    }


def model_gflop(model: Path, outputs: list[str] | None = None) -> float:
    """Floating-point operations of one image through the model (2 per multiply-add of every Conv, MatMul
    and Gemm), in GFLOP, from ONNX shape inference at batch 1.

    Args:
        model: the ONNX file.
        outputs: count only what these outputs need (default: everything).
    """
    import onnx

    graph_model = onnx.load_from_string(keep_outputs(model, outputs)) if outputs else onnx.load(str(model))
    for tensor in graph_model.graph.input:
        tensor.type.tensor_type.shape.dim[0].dim_value = 1
    graph_model = onnx.shape_inference.infer_shapes(graph_model)
    graph = graph_model.graph
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    total = 0.0
    for node in graph.node:
        out, weight = shapes.get(node.output[0]), shapes.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in ("Conv", "MatMul", "Gemm") or not out or not weight or 0 in out + weight:
            continue
        if node.op_type == "Conv":
            total += 2.0 * np.prod(out) * np.prod(weight[1:])
        else:
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            first = shapes.get(node.input[0]) or [0, 0]
            total += 2.0 * np.prod(out) * (first[-2] if transposed else first[-1])
    return total / 1e9


def cpu_peak() -> dict[str, Any]:
    """The CPU's FP32 FMA peak: cores available to this process × clock × FLOP per cycle.

    The clock is the kernel's ``cpu MHz`` (in a virtual machine: the host's nominal clock, as the guest cannot
    see boosts); FLOP per cycle follow from the CPU family (:data:`FLOPS_PER_CYCLE`; 32 when unknown).
    """
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    mhz = float(fields.get("cpu MHz", "0") or 0)
    family = int(fields.get("cpu family", "0") or 0)
    per_cycle = FLOPS_PER_CYCLE.get(family, 32) if "avx512f" in fields.get("flags", "") else 16
    cores = len(os.sched_getaffinity(0))
    return {
        "cpu": fields.get("model name", "unknown"),
        "family": family,
        "cores": cores,
        "mhz": mhz,
        "flop_per_cycle_per_core": per_cycle,
        "gflop_per_s": cores * mhz * 1e6 * per_cycle / 1e9,
    }


def _memory_kb(pid: int) -> dict[str, int]:
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    text = rollup.read_text() if rollup.exists() else Path(f"/proc/{pid}/status").read_text()
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "VmRSS") and value.strip():
            found["Rss" if key == "VmRSS" else key] = int(value.split()[0])
    return found


def server_rss_mb(pid: int) -> dict[str, float]:
    """Memory of ``tritonserver`` and its children (the python stubs), in MiB: the sum of their resident
    sets (``rss``; counts the pages they share, such as libraries and the tensors' shared-memory regions, once
    per process) and of their proportional sets (``pss``: shared pages divided among their users, so the
    sum is the physical memory the server holds).

    Args:
        pid: the ``tritonserver`` process.
    """
    from braintumor_serving.triton import child_pids

    children = child_pids(pid)
    server, stubs = _memory_kb(pid), [_memory_kb(c) for c in children]
    rss = [server.get("Rss", 0), *(s.get("Rss", 0) for s in stubs)]
    pss = [server.get("Pss", server.get("Rss", 0)), *(s.get("Pss", s.get("Rss", 0)) for s in stubs)]
    return {
        "tritonserver_mb": rss[0] / 1024,
        "stubs_mb": sum(rss[1:]) / 1024,
        "stubs": len(stubs),
        "total_mb": sum(rss) / 1024,
        "total_pss_mb": sum(pss) / 1024,
    }


def exercise_batch_sizes(grpc_url: str, versions: list[str], pixels: np.ndarray) -> None:
    """Send every batch size from 1 to the maximum to every version, with and without the heatmap: ONNX
    Runtime keeps memory per input shape, so resident memory is read after this (as the soak does).

    Args:
        grpc_url: the gRPC endpoint.
        versions: the served versions.
        pixels: uint8 images.
    """
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        for version in versions:
            for batch_size in range(1, MAX_BATCH_SIZE + 1):
                for names in ([OUTPUT_NAME], [OUTPUT_NAME, HEATMAP_NAME]):
                    batch = np.resize(pixels, (batch_size, *pixels.shape[1:]))
                    inp = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
                    inp.set_data_from_numpy(batch)
                    outputs = [grpcclient.InferRequestedOutput(n) for n in names]
                    client.infer(MODEL_NAME, [inp], model_version=version, outputs=outputs)
    finally:
        client.close()


def _best_round(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the highest throughput, with every round's throughput beside it (``rounds_images_per_s``)."""
    best = dict(max(points, key=lambda p: p["images_per_s"]))
    best["rounds_images_per_s"] = [p["images_per_s"] for p in points]
    return best


def run(
    server: Any,
    model_dir: Path,
    versions: list[str],
    pixels: np.ndarray,
    seconds: float = 5.0,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    concurrencies: tuple[int, ...] = (1, 16),
    preprocessing_seconds: float = 3.0,
    rounds: int = 2,
) -> dict[str, Any]:
    """Measure everything against a running :class:`~braintumor_serving.triton.TritonServer`.

    Every point (in-process and perf_analyzer alike) is measured once per round, the rounds one after the
    other over all points, and the round with the highest throughput is kept: on this shared machine a point
    sometimes runs at half speed while its process still gets both cores, and a second round shows it.

    Args:
        server: the running server (its admin key, ports and process are used).
        model_dir: ``model_repository/<model>``.
        versions: the versions it serves.
        pixels: uint8 images to send.
        seconds: measuring time of each in-process point and of each perf_analyzer window (three windows).
        batch_sizes: in-process batch sizes.
        concurrencies: perf_analyzer concurrencies (batch-1 requests).
        preprocessing_seconds: measuring time of the preprocessing benchmark.
        rounds: times each point is measured (1 or more).
    """
    from braintumor_serving import perf_analyzer
    from braintumor_serving.bench import bench_preprocessing

    if rounds < 1:
        raise ValueError(f"rounds must be 1 or more, not {rounds}")
    analyzer = perf_analyzer.find()
    config = server.config
    results: dict[str, Any] = {"versions": versions, "seconds": seconds, "rounds": rounds, "cpu": cpu_peak()}
    results["rss_after_start"] = server_rss_mb(server.process.pid)
    # In-process points run in a fresh process of their own: in the process that started the server (its HTTP
    # front's thread, the watchdog's pipe), ONNX Runtime's two-thread pool measured at half its speed in some
    # runs (1,148 against 556 images/s at batch 32 in the same run), while a separate process measured the
    # full speed beside the same running server.
    # Each point gets a process of its own, too: one worker reused for every point measured the second
    # version's points at half speed (562 against 1,199 images/s at batch 32 for two graphs that run equally
    # fast alone), as if the earlier sessions' thread pools were still competing. Even so, a fresh process
    # later measured one version's points at half speed with both cores busy (564 against 1,318 images/s
    # alone): hence the rounds.
    spawn = multiprocessing.get_context("spawn")
    measure = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1)
    measured: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    analysed: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    served_precisions: dict[str, str] = {}
    for _ in range(rounds):
        for version in versions:
            files = precisions(model_dir / version)
            for precision, path in files.items():
                for label, outputs in (("all", [OUTPUT_NAME, HEATMAP_NAME]), ("probabilities", [OUTPUT_NAME])):
                    gflop = model_gflop(path, None if label == "all" else outputs)
                    for b in batch_sizes:
                        point = measure.submit(in_process, path, outputs, pixels, b, seconds).result()
                        point.update(version=version, precision=precision, outputs=label, gflop_per_image=gflop)
                        point["fma_peak_fraction"] = point["images_per_s"] * gflop / results["cpu"]["gflop_per_s"]
                        measured.setdefault((version, precision, label, b), []).append(point)
            served_precision = served_precisions[version] = "int8" if "int8" in files else "fp32"
            for c in concurrencies:
                m = perf_analyzer.run(
                    analyzer, config.grpc_url, MODEL_NAME, concurrency=c, admin_key=config.admin_key,
                    version=version, window_ms=max(1000, int(seconds * 1000)), server_pid=server.process.pid,
                )  # fmt: skip
                point = dict(m.__dict__, version=version, precision=served_precision, outputs="all")
                gflop = model_gflop(files[served_precision])
                point["fma_peak_fraction"] = m.images_per_s * gflop / results["cpu"]["gflop_per_s"]
                analysed.setdefault((version, c), []).append(point)
    measure.shutdown()
    rows = [_best_round(points) for points in measured.values()]
    triton = [_best_round(points) for points in analysed.values()]
    by_version = [ratios(v, served_precisions[v], rows, triton) for v in versions]
    results.update(in_process=rows, triton=triton, ratios=by_version)
    exercise_batch_sizes(config.grpc_url, versions, pixels)
    results["rss_served"] = server_rss_mb(server.process.pid)
    results["preprocessing"] = bench_preprocessing(preprocessing_seconds)
    results["targets"] = targets(results)
    return results


def ratios(
    version: str, served_precision: str, rows: list[dict[str, Any]], triton: list[dict[str, Any]]
) -> dict[str, Any]:
    """One version's Triton figures against its best in-process figures (the same work: every output).

    Args:
        version: the version.
        served_precision: the precision its server instances run (``fp32`` or ``int8``).
        rows: the in-process points.
        triton: the perf_analyzer points.
    """
    same = [r for r in rows if (r["version"], r["precision"], r["outputs"]) == (version, served_precision, "all")]
    best = max(same, key=lambda r: r["images_per_s"])
    by_c = {p["concurrency"]: p for p in triton if p["version"] == version}
    entry: dict[str, Any] = {"version": version, "precision": served_precision}
    if 16 in by_c:
        entry.update(
            c16_images_per_s=by_c[16]["images_per_s"],
            best_in_process_images_per_s=best["images_per_s"],
            best_in_process_batch=best["batch_size"],
            c16_over_best_in_process=by_c[16]["images_per_s"] / best["images_per_s"],
        )
        # Per CPU core used: the load generator shares the cores, so the server had fewer than in-process.
        if by_c[16].get("server_cores") and best.get("cores"):
            per_core = by_c[16]["images_per_s"] / by_c[16]["server_cores"]
            entry.update(
                c16_client_cores=by_c[16]["client_cores"],
                c16_server_cores=by_c[16]["server_cores"],
                best_in_process_cores=best["cores"],
                c16_per_server_core_over_best_per_core=per_core / (best["images_per_s"] / best["cores"]),
            )
    one = [r for r in same if r["batch_size"] == 1]
    if 1 in by_c and one:
        entry.update(
            c1_p99_ms=by_c[1]["latency_ms"]["p99"],
            in_process_b1_p99_ms=one[0]["latency_ms"]["p99"],
            p99_overhead_ms=by_c[1]["latency_ms"]["p99"] - one[0]["latency_ms"]["p99"],
        )
    return entry


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue #14 with the measured figure and whether it is met.

    Args:
        results: what :func:`run` measured.
    """
    found = []
    for r in results["ratios"]:
        if "c16_over_best_in_process" in r:
            value = r["c16_over_best_in_process"]
            name = f"v{r['version']} c16 / best in-process >= {TARGET_RATIO}"
            found.append({"target": name, "value": value, "met": value >= TARGET_RATIO})
        if "p99_overhead_ms" in r:
            value = r["p99_overhead_ms"]
            name = f"v{r['version']} c1 p99 - in-process b1 p99 <= {TARGET_P99_OVERHEAD_MS} ms"
            found.append({"target": name, "value": value, "met": value <= TARGET_P99_OVERHEAD_MS})
    memory = results["rss_served"]
    for key, label in (("total_mb", "RSS sum"), ("total_pss_mb", "PSS sum")):
        name = f"server {label} <= {TARGET_RSS_MB:.0f} MiB"
        found.append({"target": name, "value": memory[key], "met": memory[key] <= TARGET_RSS_MB})
    return found


def format_table(results: dict[str, Any]) -> str:
    """The side-by-side table as text.

    Args:
        results: what :func:`run` measured.
    """
    cpu = results["cpu"]
    lines = [
        f"CPU: {cpu['cpu']} (family {cpu['family']}), {cpu['cores']} cores at {cpu['mhz']:.0f} MHz, "
        f"{cpu['flop_per_cycle_per_core']} FP32 FLOP/cycle/core with FMA: peak {cpu['gflop_per_s']:.0f} GFLOP/s",
        "",
        f"{'what':<13} {'ver':>3} {'prec':>4} {'outputs':>13} {'batch':>5} {'conc':>4} {'images/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'formed':>6} {'FMA peak':>8}",
    ]
    for r in results["in_process"]:
        lines.append(
            f"{'in-process':<13} {r['version']:>3} {r['precision']:>4} {r['outputs']:>13} {r['batch_size']:>5} "
            f"{'':>4} {r['images_per_s']:>9.1f} {r['latency_ms']['p50']:>7.2f} {r['latency_ms']['p99']:>7.2f} "
            f"{'':>6} {r['fma_peak_fraction']:>8.1%}"
        )
    for t in results["triton"]:
        formed = f"{t['formed_batch']:.2f}" if t.get("formed_batch") else ""
        lines.append(
            f"{'perf_analyzer':<13} {t['version']:>3} {t['precision']:>4} {t['outputs']:>13} {1:>5} "
            f"{t['concurrency']:>4} {t['images_per_s']:>9.1f} {t['latency_ms']['p50']:>7.2f} "
            f"{t['latency_ms']['p99']:>7.2f} {formed:>6} {t['fma_peak_fraction']:>8.1%}"
        )
    lines.append("")
    rounds = results.get("rounds", 1)
    if rounds > 1:
        lines.append(f"Each point: the best of {rounds} rounds, measured one after the other over all points.")
        for r in [*results["in_process"], *results["triton"]]:
            seen = r.get("rounds_images_per_s", [])
            if seen and min(seen) < 0.8 * max(seen):
                where = f"batch {r['batch_size']}" if "batch_size" in r else f"concurrency {r['concurrency']}"
                lines.append(
                    f"  rounds differ by more than 20 %: {'in-process' if 'batch_size' in r else 'perf_analyzer'} "
                    f"v{r['version']} {r['outputs']} {where}: " + " / ".join(f"{x:.0f}" for x in seen) + " images/s"
                )
        lines.append("")
    for t in results["triton"]:
        s = t["server_us"]
        lines.append(
            f"server per request, v{t['version']} c{t['concurrency']}: queue {s['queue']:.0f} us, compute input "
            f"{s['compute_input']:.0f} us, infer {s['compute_infer']:.0f} us, output {s['compute_output']:.0f} us"
        )
    for r in results["ratios"]:
        if "c16_over_best_in_process" in r:
            lines.append(
                f"v{r['version']}: c16 {r['c16_images_per_s']:.1f} images/s = {r['c16_over_best_in_process']:.2f}x "
                f"the best in-process ({r['best_in_process_images_per_s']:.1f} at batch {r['best_in_process_batch']})"
            )
        if "c16_per_server_core_over_best_per_core" in r:
            lines.append(
                f"v{r['version']}: at c16 the server used {r['c16_server_cores']:.2f} cores and perf_analyzer "
                f"{r['c16_client_cores']:.2f} (in-process: {r['best_in_process_cores']:.2f}); per server core the "
                f"server reaches {r['c16_per_server_core_over_best_per_core']:.2f}x the best in-process per core"
            )
        if "p99_overhead_ms" in r:
            lines.append(
                f"v{r['version']}: c1 p99 {r['c1_p99_ms']:.2f} ms = in-process batch-1 p99 "
                f"{r['in_process_b1_p99_ms']:.2f} ms {r['p99_overhead_ms']:+.2f} ms"
            )
    for key, label in (("rss_after_start", "after start"), ("rss_served", "after every batch size")):
        m = results[key]
        lines.append(
            f"server memory {label}: RSS {m['total_mb']:.0f} MiB (tritonserver {m['tritonserver_mb']:.0f}, "
            f"{m['stubs']} stubs {m['stubs_mb']:.0f}), PSS {m['total_pss_mb']:.0f} MiB"
        )
    pre = results.get("preprocessing", {})
    shown = ", ".join(f"{k} {v:.2f}" for k, v in pre.items() if k.startswith("ms_") and isinstance(v, float))
    if shown:
        lines.append(f"preprocessing per image, one core (ms): {shown}")
    elif pre:
        lines.append("preprocessing: " + ", ".join(f"{k}={v:.3g}" for k, v in pre.items() if isinstance(v, float)))
    for t in results["targets"]:
        lines.append(f"target {t['target']}: {t['value']:.2f} {'met' if t['met'] else 'MISSED'}")
    lines.append(f"perf_analyzer command (c16): {results['triton'][-1]['command']}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput of every in-process point and perf_analyzer run, per version, as bars.

    Args:
        results: what :func:`run` measured.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = results["versions"]
    fig, axes = plt.subplots(1, len(versions), figsize=(5.5 * len(versions), 4), squeeze=False)
    for ax, version in zip(axes[0], versions, strict=True):
        labels, values, colours = [], [], []
        for r in results["in_process"]:
            if r["version"] == version:
                labels.append(f"ORT {r['precision']} {'all' if r['outputs'] == 'all' else 'prob'} b{r['batch_size']}")
                values.append(r["images_per_s"])
                colours.append("tab:grey" if r["outputs"] == "all" else "tab:blue")
        for t in results["triton"]:
            if t["version"] == version:
                labels.append(f"Triton c{t['concurrency']}")
                values.append(t["images_per_s"])
                colours.append("tab:orange")
        ax.barh(labels, values, color=colours)
        ax.invert_yaxis()
        ax.set_xlabel("images / s")
        ax.set_title(f"version {version}")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("In-process ONNX Runtime (grey: every output, blue: probabilities) vs Triton perf_analyzer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path) -> None:
    """Write ``bench.json``, ``bench.txt`` and ``bench.png`` into ``out_dir``.

    Args:
        results: what :func:`run` measured.
        out_dir: the folder.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1, default=float))
    (out_dir / "bench.txt").write_text(format_table(results) + "\n")
    plot(results, out_dir / "bench.png")
