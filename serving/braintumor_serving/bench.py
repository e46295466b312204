"""``braintumor bench``: in-process ONNX Runtime versus end-to-end Triton gRPC, measured in one run.

In-process: one ONNX Runtime session (the server's session options) at several batch sizes. Triton:
batch-1 gRPC requests from an asyncio client (``tritonclient.grpc.aio``) keeping N requests in flight,
against the embedded server on the same machine; the batch size Triton formed comes from its metrics
(``nv_inference_count`` over ``nv_inference_exec_count``). The ratios answer "what does serving cost?".
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as grpcaio

from braintumor.config import HEATMAP_NAME, INPUT_NAME, MODEL_NAME, OUTPUT_NAME
from braintumor_serving.triton import read_metric


@dataclass
class Point:
    """One measurement.

    Args:
        name: what was measured (``onnxruntime`` or ``triton``).
        batch_size: images per call (in-process) or per request (Triton).
        concurrency: requests in flight (Triton) or 1.
        images_per_s: throughput.
        latency_ms: p50, p95 and p99 of one call or request, in milliseconds.
        formed_batch: the average batch Triton executed (Triton only).
    """

    name: str
    batch_size: int
    concurrency: int
    images_per_s: float
    latency_ms: dict[str, float]
    formed_batch: float | None = None


def _percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples) * 1000.0
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """The ONNX Runtime options the served model uses (see ``configs/cpu.pbtxt``)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def bench_onnxruntime(model: Path, pixels: np.ndarray, batch_size: int, seconds: float) -> Point:
    """Throughput and latency of in-process ONNX Runtime calls of ``batch_size`` images."""
    session = ort.InferenceSession(str(model), session_options(), providers=["CPUExecutionProvider"])
    batch = np.resize(pixels, (batch_size, *pixels.shape[1:]))
    for _ in range(3):
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return Point("onnxruntime", batch_size, 1, len(times) * batch_size / elapsed, _percentiles(times))


def _read_counts(metrics_url: str, model: str) -> tuple[float, float]:
    return (
        read_metric(metrics_url, "nv_inference_count", model=model),
        read_metric(metrics_url, "nv_inference_exec_count", model=model),
    )


async def _triton_run(url: str, pixels: np.ndarray, concurrency: int, seconds: float, model: str) -> list[float]:
    client = grpcaio.InferenceServerClient(url)
    times: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            inp = grpcaio.InferInput(INPUT_NAME, [1, *pixels.shape[1:]], "UINT8")
            inp.set_data_from_numpy(pixels[i % len(pixels)][None])
            t = time.perf_counter()
            await client.infer(model, [inp], outputs=[grpcaio.InferRequestedOutput(OUTPUT_NAME)])
            times.append(time.perf_counter() - t)
            i += concurrency

    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        await client.close()
    return times


def bench_triton(
    grpc_url: str, metrics_url: str, pixels: np.ndarray, concurrency: int, seconds: float, model: str = MODEL_NAME
) -> Point:
    """Throughput, latency and formed batch size of batch-1 gRPC requests at ``concurrency``."""
    asyncio.run(_triton_run(grpc_url, pixels, concurrency, min(1.0, seconds), model))  # warm up
    before = _read_counts(metrics_url, model)
    start = time.perf_counter()
    times = asyncio.run(_triton_run(grpc_url, pixels, concurrency, seconds, model))
    elapsed = time.perf_counter() - start
    after = _read_counts(metrics_url, model)
    executions = after[1] - before[1]
    formed = (after[0] - before[0]) / executions if executions else None
    return Point("triton", 1, concurrency, len(times) / elapsed, _percentiles(times), formed)


def run_benchmark(
    model: Path,
    grpc_url: str,
    metrics_url: str,
    pixels: np.ndarray,
    seconds: float = 5.0,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    concurrencies: tuple[int, ...] = (1, 4, 16, 32),
) -> dict[str, Any]:
    """Measure everything and compute the ratios; returns JSON-serialisable results."""
    ort_points = {b: bench_onnxruntime(model, pixels, b, seconds) for b in batch_sizes}
    triton_points = {c: bench_triton(grpc_url, metrics_url, pixels, c, seconds) for c in concurrencies}
    results: dict[str, Any] = {
        "onnxruntime": [p.__dict__ for p in ort_points.values()],
        "triton": [p.__dict__ for p in triton_points.values()],
        "ratios": {},
    }
    if 16 in triton_points and triton_points[16].formed_batch:
        formed = max(1, round(triton_points[16].formed_batch))
        if formed not in ort_points:
            ort_points[formed] = bench_onnxruntime(model, pixels, formed, seconds)
            results["onnxruntime"].append(ort_points[formed].__dict__)
        results["ratios"]["triton_c16_over_onnxruntime_at_formed_batch"] = {
            "formed_batch": triton_points[16].formed_batch,
            "onnxruntime_batch": formed,
            "ratio": triton_points[16].images_per_s / ort_points[formed].images_per_s,
            "target": ">= 0.90",
        }
    if 1 in triton_points and 1 in ort_points:
        triton, local = triton_points[1].latency_ms, ort_points[1].latency_ms
        results["ratios"]["triton_c1_latency_overhead_ms"] = {
            "triton_p99_ms": triton["p99"],
            "onnxruntime_b1_p99_ms": local["p99"],
            "p99_overhead_ms": triton["p99"] - local["p99"],
            "p50_overhead_ms": triton["p50"] - local["p50"],
            "target": "p99 overhead <= 3 ms",
        }
    return results


def format_table(results: dict[str, Any]) -> str:
    """A readable table of the results."""
    lines = [
        f"{'what':<12} {'batch':>5} {'conc.':>5} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'formed batch':>12}"
    ]
    for p in [*results["onnxruntime"], *results["triton"]]:
        formed = f"{p['formed_batch']:.2f}" if p.get("formed_batch") else ""
        lat = p["latency_ms"]
        lines.append(
            f"{p['name']:<12} {p['batch_size']:>5} {p['concurrency']:>5} {p['images_per_s']:>9.1f} "
            f"{lat['p50']:>8.2f} {lat['p95']:>8.2f} {lat['p99']:>8.2f} {formed:>12}"
        )
    sections = [
        *results["ratios"].items(),
        *((k, results[k]) for k in ("explain_cost", "preprocessing", "client") if k in results),
    ]
    for name, r in sections:
        shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
        lines.append(f"{name}: {shown}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput and latency against concurrency (Triton), with in-process ONNX Runtime for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    triton = results["triton"]
    conc = [p["concurrency"] for p in triton]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(conc, [p["images_per_s"] for p in triton], "o-", label="Triton gRPC, batch-1 requests")
    for p in results["onnxruntime"]:
        left.axhline(p["images_per_s"], ls=":", color="grey")
        left.text(conc[-1], p["images_per_s"], f" ORT batch {p['batch_size']}", va="bottom", ha="right", fontsize=8)
    left.set_xscale("log", base=2)
    left.set_xlabel("requests in flight")
    left.set_ylabel("images / s")
    left.set_title("Throughput")
    left.legend(fontsize=8)
    for q in ("p50", "p95", "p99"):
        right.plot(conc, [p["latency_ms"][q] for p in triton], "o-", label=f"Triton {q}")
    right.set_xscale("log", base=2)
    right.set_xlabel("requests in flight")
    right.set_ylabel("latency (ms)")
    right.set_title("Latency per request")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path) -> None:
    """Write ``bench.json``, ``bench.txt`` and ``bench.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=1))
    (out_dir / "bench.txt").write_text(format_table(results) + "\n")
    plot(results, out_dir / "bench.png")


def bench_versions(
    models: dict[str, Path], pixels: np.ndarray, seconds: float = 5.0, batch_sizes: tuple[int, ...] = (1, 32)
) -> dict[str, Any]:
    """Published versions side by side in one run: in-process ONNX Runtime throughput and latency of each,
    and each one's ratio to the first (e.g. the cost of version 2's test-time augmentation).

    The versions are measured in turns (A, B, A, B) so that a drift of the machine affects them alike.
    """
    points: dict[str, dict[int, list[Point]]] = {v: {b: [] for b in batch_sizes} for v in models}
    for _ in range(2):
        for batch_size in batch_sizes:
            for version, model in models.items():
                points[version][batch_size].append(bench_onnxruntime(model, pixels, batch_size, seconds / 2))
    first = next(iter(models))
    rows = []
    for version in models:
        for batch_size in batch_sizes:
            runs = points[version][batch_size]
            throughput = float(np.mean([p.images_per_s for p in runs]))
            p50 = float(np.mean([p.latency_ms["p50"] for p in runs]))
            rows.append({"version": version, "batch_size": batch_size, "images_per_s": throughput, "p50_ms": p50})
    baseline = {r["batch_size"]: r for r in rows if r["version"] == first}
    for row in rows:
        row["throughput_vs_first"] = row["images_per_s"] / baseline[row["batch_size"]]["images_per_s"]
        row["latency_vs_first"] = row["p50_ms"] / baseline[row["batch_size"]]["p50_ms"]
    return {"versions": rows, "seconds_per_point": seconds}


def format_versions(results: dict[str, Any]) -> str:
    """The version comparison as a text table."""
    lines = ["version  batch  images/s   p50 ms  throughput vs first  latency vs first"]
    for r in results["versions"]:
        lines.append(
            f"{r['version']:>7}  {r['batch_size']:>5}  {r['images_per_s']:>8.1f}  {r['p50_ms']:>7.2f}  "
            f"{r['throughput_vs_first']:>19.2f}  {r['latency_vs_first']:>16.2f}"
        )
    return "\n".join(lines)


def bench_preprocessing(seconds: float = 3.0, side: int = 512) -> dict[str, float]:
    """Milliseconds per image of the shared preprocessing on one core, measured side by side in one run.

    Two synthetic slices (a textured head on black) as JPEG bytes: a grey ``side``×``side`` one and an RGB
    224×224 one (as most Kaggle slices). Each is preprocessed with version 1's parameters (plain resize),
    versions 2 and 3's (crop to the head and intensity stretch) and each of these with ``jpeg_draft`` on; the
    calls take turns, so that other load on the machine weighs on all alike; the median and the minimum
    are reported (the minimum is the least disturbed by other work on a busy machine).
    The crop and stretch of version 2 as implemented before issue #14 (a hand-written connected-component
    spreading and ``np.percentile`` with a per-pixel stretch; the same output) is timed beside it, and checked
    to give the same tensor. The process is pinned to one core meanwhile.

    Args:
        seconds: total measuring time.
        side: side of the large JPEG, in pixels.

    Returns:
        ``ms_<side>_<parameters>`` and ``ms_224_<parameters>`` medians (and ``..._min``),
        ``ms_<side>_v2_v3_before_14``, the ratio of medians ``v2_v3_over_v1_<side>``, and the JPEG sizes.
    """
    import io
    import os
    from dataclasses import replace

    from PIL import Image

    from braintumor.preprocessing import Preprocessing, head_box, load_image, to_grey

    def slice_jpeg(size: int, mode: str) -> bytes:
        rng = np.random.default_rng(size)
        yy, xx = np.mgrid[0:size, 0:size] / size
        field = Image.fromarray(rng.normal(size=(12, 12)).astype(np.float32), mode="F")
        texture = np.asarray(field.resize((size, size), Image.Resampling.BICUBIC))
        head = ((xx - 0.52) ** 2 + (yy - 0.48) ** 2) < 0.4**2
        pixels = np.clip(head * (120 + 35 * texture) + rng.normal(4, 3, (size, size)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").convert(mode).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    def before_14(data: bytes) -> np.ndarray:
        """Versions 2 and 3's preprocessing as implemented before issue #14 (timed here only)."""
        grey = to_grey(load_image(data))
        scale = max(grey.size) / 64
        thumb = grey.resize((max(1, round(grey.width / scale)), max(1, round(grey.height / scale))), Image.BOX)
        values = np.asarray(thumb, dtype=np.float32)
        low, high = np.percentile(values, (1, 99))
        mask = values > low + 0.15 * (high - low)
        labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), mask.size)
        for _ in range(512):  # labels spread as the minimum over 4-neighbours until nothing changes
            spread = labels.copy()
            np.minimum(spread[1:], labels[:-1], out=spread[1:])
            np.minimum(spread[:-1], labels[1:], out=spread[:-1])
            np.minimum(spread[:, 1:], labels[:, :-1], out=spread[:, 1:])
            np.minimum(spread[:, :-1], labels[:, 1:], out=spread[:, :-1])
            spread = np.where(mask, spread, mask.size)
            if np.array_equal(spread, labels):
                break
            labels = spread
        np.unique(labels[mask], return_counts=True)  # the component sizes; the box itself is not timed apart
        crop = np.asarray(grey.crop(head_box(grey)), dtype=np.float32)
        low, high = np.percentile(crop, (1, 99.5))
        stretched = np.clip(np.rint((crop - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(stretched, mode="L").resize((160, 160), Image.BILINEAR))
        return np.repeat(pixels[:, :, None], 3, axis=2)

    v1, v2 = Preprocessing(160), Preprocessing(160, crop_to_head=True, normalize_intensity=True)
    images = {side: slice_jpeg(side, "L"), 224: slice_jpeg(224, "RGB")}
    calls = {}
    for size, data in images.items():
        for name, preprocessing in (("v1", v1), ("v2_v3", v2)):
            calls[f"ms_{size}_{name}"] = (preprocessing, data)
            calls[f"ms_{size}_{name}_jpeg_draft"] = (replace(preprocessing, jpeg_draft=True), data)
    calls[f"ms_{side}_v2_v3_before_14"] = (before_14, images[side])
    if not np.array_equal(before_14(images[side]), v2(images[side])):
        raise AssertionError("the pre-#14 implementation and the current one disagree on the benchmark slice")
    times: dict[str, list[float]] = {key: [] for key in calls}
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(times[f"ms_{side}_v1"]) < 20:
            for key, (call, data) in calls.items():
                start = time.perf_counter()
                call(data)
                times[key].append(time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, affinity)
    results: dict[str, float] = {"image_side": side, "jpeg_bytes": len(images[side])}
    results["jpeg_224_bytes"] = len(images[224])
    for key, values in times.items():
        results[key], results[f"{key}_min"] = 1e3 * float(np.median(values)), 1e3 * min(values)
    results[f"v2_v3_over_v1_{side}"] = results[f"ms_{side}_v2_v3"] / results[f"ms_{side}_v1"]
    results["rounds"] = len(times[f"ms_{side}_v1"])
    return results


def bench_client(grpc_url: str, files: list[Path], workers: int = 8) -> dict[str, Any]:
    """End-to-end SDK throughput over ``files`` (decode + preprocess + gRPC), and packed versus concurrent
    ``predict_batch`` on the same files."""
    from braintumor.classifier import TumorClassifier

    results: dict[str, Any] = {"files": len(files)}
    with TumorClassifier(grpc_url, timeout=60) as classifier:
        classifier.predict(files[0])
        for strategy in ("packed", "concurrent"):
            start = time.perf_counter()
            predictions = classifier.predict_batch(files, strategy=strategy, workers=workers)
            results[f"predict_batch_{strategy}_images_per_s"] = len(predictions) / (time.perf_counter() - start)
    results["faster_strategy"] = max(("packed", "concurrent"), key=lambda s: results[f"predict_batch_{s}_images_per_s"])
    return results


def bench_explain_cost(model: Path, grpc_url: str, pixels: np.ndarray, seconds: float = 3.0) -> dict[str, float]:
    """What the Grad-CAM output costs: in-process ONNX Runtime at batch 8 and Triton at concurrency 1, each
    asked for the probabilities alone and for the probabilities with the heatmap."""
    import tritonclient.grpc as grpcclient

    session = ort.InferenceSession(str(model), session_options(), providers=["CPUExecutionProvider"])
    batch = np.resize(pixels, (8, *pixels.shape[1:]))
    client = grpcclient.InferenceServerClient(grpc_url)
    results: dict[str, float] = {}
    for label, names in (("probabilities", [OUTPUT_NAME]), ("with_heatmap", [OUTPUT_NAME, HEATMAP_NAME])):
        times: list[float] = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t = time.perf_counter()
            session.run(names, {INPUT_NAME: batch})
            times.append(time.perf_counter() - t)
        results[f"onnxruntime_b8_{label}_p50_ms"] = _percentiles(times)["p50"]
        times = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            inp = grpcclient.InferInput(INPUT_NAME, [1, *pixels.shape[1:]], "UINT8")
            inp.set_data_from_numpy(pixels[len(times) % len(pixels)][None])
            t = time.perf_counter()
            client.infer(MODEL_NAME, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in names])
            times.append(time.perf_counter() - t)
        results[f"triton_c1_{label}_p50_ms"] = _percentiles(times)["p50"]
    client.close()
    return results
