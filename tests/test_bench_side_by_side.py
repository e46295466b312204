"""``braintumor bench`` end to end in a short mode against a real embedded Triton, with Triton's perf_analyzer.

No speed is asserted: the test checks that every row of the side-by-side table is produced and consistent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from braintumor.config import HEATMAP_NAME, INPUT_NAME, MODEL_NAME, OUTPUT_NAME

pytestmark = pytest.mark.slow
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_cut_down_graph_gives_the_same_probabilities_and_runs_fewer_kernels(tmp_path):
    from braintumor.config import DEFAULT_MODEL_REPOSITORY
    from braintumor.model_repository import versions
    from braintumor_serving.onnx_outputs import keep_outputs
    from braintumor_serving.side_by_side import model_gflop

    model = DEFAULT_MODEL_REPOSITORY / MODEL_NAME / str(versions(DEFAULT_MODEL_REPOSITORY / MODEL_NAME)[-1])
    model = model / "model.onnx"
    full = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    lean = ort.InferenceSession(keep_outputs(model, [OUTPUT_NAME]), providers=["CPUExecutionProvider"])
    assert [o.name for o in lean.get_outputs()] == [OUTPUT_NAME]
    pixels = np.random.default_rng(1).integers(0, 256, (3, 160, 160, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        lean.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0], full.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0], atol=1e-6
    )
    assert model_gflop(model, [OUTPUT_NAME]) < model_gflop(model) < 1.0
    with pytest.raises(ValueError, match="not outputs"):
        keep_outputs(model, ["nothing"])


def test_bench_runs_end_to_end_and_produces_every_row(triton, tmp_path):
    from braintumor_serving import perf_analyzer, side_by_side
    from braintumor_serving.triton import ready_models

    try:
        perf_analyzer.find()
    except perf_analyzer.PerfAnalyzerError as err:
        pytest.skip(str(err))
    repository = triton.config.repository
    served = [str(v) for v in ready_models(triton.local_http_url, triton.config.admin_key)[MODEL_NAME]]
    pixels = np.random.default_rng(2).integers(0, 256, (8, 160, 160, 3), dtype=np.uint8)
    results = side_by_side.run(
        triton,
        repository / MODEL_NAME,
        served,
        pixels,
        seconds=0.3,
        batch_sizes=(1, 8),
        preprocessing_seconds=0.3,
        rounds=2,
    )
    rows = {(r["version"], r["precision"], r["outputs"], r["batch_size"]) for r in results["in_process"]}
    assert rows == {(v, "fp32", o, b) for v in served for o in ("all", "probabilities") for b in (1, 8)}
    assert {(t["version"], t["concurrency"]) for t in results["triton"]} == {(v, c) for v in served for c in (1, 16)}
    for point in [*results["in_process"], *results["triton"]]:  # the fastest of two rounds is kept
        assert len(point["rounds_images_per_s"]) == 2 and point["images_per_s"] == max(point["rounds_images_per_s"])
    for t in results["triton"]:
        assert t["images_per_s"] > 0 and t["formed_batch"] >= 1.0
        assert t["latency_ms"]["p50"] <= t["latency_ms"]["p99"]
        assert t["server_us"]["compute_infer"] > 0
        assert 0 < t["client_cores"] < 4 and 0 < t["server_cores"] < 4  # CPU the load generator and server used
        assert "triton-grpc-protocol-admin-key:KEY" in t["command"] and triton.config.admin_key not in t["command"]
    for r in results["in_process"]:
        assert 0 < r["fma_peak_fraction"] < 1 and r["gflop_per_image"] > 0.01
    assert {"c16_over_best_in_process", "p99_overhead_ms", "c16_per_server_core_over_best_per_core"} <= set(
        results["ratios"][0]
    )
    assert all(0 < r["cores"] < 4 for r in results["in_process"])
    assert results["rss_served"]["stubs"] == 2 * len(served)  # two instances per version
    assert 0 < results["rss_served"]["total_pss_mb"] <= results["rss_served"]["total_mb"]
    assert results["cpu"]["gflop_per_s"] > 0 and any(k.startswith("ms_") for k in results["preprocessing"])
    assert len(results["targets"]) == 2 * len(served) + 2
    side_by_side.write(results, tmp_path)
    table = (tmp_path / "bench.txt").read_text()
    needed_lines = ("in-process", "perf_analyzer", "server memory", "FMA", "preprocessing", "target", "per server core")
    for needed in (*needed_lines, "the best of 2 rounds"):
        assert needed in table
    assert json.loads((tmp_path / "bench.json").read_text())["versions"] == served
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_a_request_gets_only_the_outputs_it_asked_for(triton):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.config.grpc_url)
    pixels = np.random.default_rng(3).integers(0, 256, (2, 160, 160, 3), dtype=np.uint8)
    inp = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels)
    lean = client.infer(MODEL_NAME, [inp], outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)])
    full = client.infer(MODEL_NAME, [inp])
    assert lean.as_numpy(HEATMAP_NAME) is None and full.as_numpy(HEATMAP_NAME).shape == (2, 4, 5, 5)
    np.testing.assert_allclose(lean.as_numpy(OUTPUT_NAME), full.as_numpy(OUTPUT_NAME), atol=1e-6)


def test_bench_refuses_fewer_than_one_round(capsys):
    from braintumor.cli import main

    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as stopped:
            main(["bench", "--rounds", bad])
        assert stopped.value.code == 2 and "1 or more" in capsys.readouterr().err
