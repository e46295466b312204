"""The ``braintumor`` command line."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from braintumor.config import DEFAULT_DATA_DIR, DEFAULT_MODEL_REPOSITORY, DEFAULT_TFSERVING_BASE, IMAGE_SIZE, MODEL_NAME


def _require_training(tensorflow: bool = True) -> None:
    try:
        import braintumor_training.audit  # noqa: F401

        if tensorflow:
            import tensorflow
    except ImportError as err:
        sys.exit(
            f"braintumor: this command needs the training extra ({err}); install it with: pip install -e '.[train]'"
        )


def _cmd_audit(args: argparse.Namespace) -> int:
    _require_training(tensorflow=False)
    from braintumor_training.audit import audit_dataset, audit_sequences
    from braintumor_training.external import ManifestError

    if args.hand_check and not args.external:
        print("braintumor audit: --hand-check needs --external (the sequences are estimated from it)", file=sys.stderr)
        return 2
    report = audit_dataset(
        Path(args.data_dir), threshold=args.threshold, val_fraction=args.val_fraction, seed=args.seed
    )
    report.command = args.command_line
    if args.external:
        try:
            audit_sequences(
                report,
                [Path(e) for e in args.external],
                hand_check=Path(args.hand_check) if args.hand_check else None,
                min_confidence=args.min_confidence,
                seed=args.seed,
                workers=args.workers,
            )
        except (ManifestError, ValueError, OSError) as err:
            print(f"braintumor audit: {err}", file=sys.stderr)
            return 2
    json_path, md_path = report.write(Path(args.out))
    print(md_path.read_text())
    print(f"Wrote {json_path} and {md_path}")
    return 1 if report.unreadable else 0


def _cmd_train(args: argparse.Namespace) -> int:
    _require_training()
    from braintumor_training.dataset import DatasetError
    from braintumor_training.train import TrainConfig, TrainingError, train

    config = TrainConfig(
        data_dir=str(args.data),
        out_dir=str(args.out),
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        weights=str(args.weights) if args.weights else None,
        limit_per_class=args.limit_per_class,
        patience=args.patience,
        threshold=args.threshold,
        collapse_grace_epochs=args.collapse_grace_epochs,
        augmentation=args.augmentation,
        crop_to_head=args.crop_to_head,
        normalize_intensity=args.normalize_intensity,
        external=str(args.external) if args.external else None,
        init_from=str(args.init_from) if args.init_from else None,
    )
    try:
        train(config, command=args.command_line)
    except (TrainingError, DatasetError) as err:
        print(f"braintumor train: {err}", file=sys.stderr)
        return 2
    return 0


def _external_dir(args: argparse.Namespace, split_file: Path) -> Path | None:
    """The manifest dataset of ``--external-split``: ``--external``, else the one its run was trained with."""
    if args.external:
        return Path(args.external)
    config = split_file.parent / "config.json"
    if config.exists():
        import json

        external = json.loads(config.read_text()).get("external")
        return Path(external) if external else None
    return None


def _cmd_evaluate_version(args: argparse.Namespace) -> int:
    from braintumor.config import DEFAULT_DATA_DIR
    from braintumor_training.dataset import DatasetError
    from braintumor_training.evaluate import EvaluationError, evaluate_published
    from braintumor_training.subgroups import render_targets

    if not args.external_split:
        print("braintumor evaluate: --version needs --external-split (a run's external_split.json)", file=sys.stderr)
        return 2
    split_file = Path(args.external_split)
    manifest = _external_dir(args, split_file)
    if manifest is None:
        print(f"braintumor evaluate: say where the manifest dataset of {split_file} is (--external)", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else (DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None)
    out = Path(args.out or f"docs/v{args.version}/external")
    try:
        result = evaluate_published(
            args.version, split_file, manifest, out, data, Path(args.repository), args.model_name
        )
    except (EvaluationError, DatasetError) as err:
        print(f"braintumor evaluate: {err}", file=sys.stderr)
        return 2
    print("\n".join(render_targets(result["targets"])))
    print(f"Wrote {out}/subgroups.md, subgroups.png and subgroups.json")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _require_training()
    if args.version is not None:
        if args.run_dir:
            print("braintumor evaluate: give a run folder or --version, not both", file=sys.stderr)
            return 2
        return _cmd_evaluate_version(args)
    if not args.run_dir:
        print("braintumor evaluate: give a run folder (or --version N for a published version)", file=sys.stderr)
        return 2
    from braintumor_training.dataset import DatasetError
    from braintumor_training.evaluate import EvaluationError, evaluate_run
    from braintumor_training.subgroups import render_targets

    try:
        metrics = evaluate_run(
            Path(args.run_dir),
            data_dir=Path(args.data) if args.data else None,
            tta=args.tta,
            compare_version=args.compare_version,
            repository=Path(args.repository),
            model_name=args.model_name,
        )
    except (EvaluationError, DatasetError) as err:
        print(f"braintumor evaluate: {err}", file=sys.stderr)
        return 2
    for split in ("test", "test_leak_free"):
        m = metrics[split]
        print(
            f"{split:15s} n={m['n_images']:5d} accuracy={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f} "
            f"tumor sensitivity={m['tumor_sensitivity']:.4f} specificity={m['tumor_specificity']:.4f} "
            f"ECE={m['ece']:.4f}"
        )
    for split in ("external_val", "external_test"):
        if split in metrics:
            m = metrics[split]
            print(
                f"{split:15s} n={m['n_images']:5d} typed={m['n_labelled']} accuracy(typed)={m['accuracy']:.4f} "
                f"tumor sensitivity={m['tumor_sensitivity']:.4f} specificity={m['tumor_specificity']:.4f} "
                f"ECE(typed)={m['ece']:.4f} ECE(tumor probability)={m['tumor_ece']:.4f}"
            )
    print("\n".join(render_targets(metrics["targets"])))
    print(f"Report: {Path(args.run_dir) / 'evaluation' / 'report.md'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _require_training()
    from braintumor_training.export import ExportError, QualityGate, export_run

    gate = QualityGate(
        min_accuracy=args.min_accuracy,
        min_leak_free_accuracy=args.min_leak_free_accuracy,
        min_tumor_sensitivity=args.min_tumor_sensitivity,
    )
    try:
        version_dir = export_run(
            Path(args.run_dir),
            repository=Path(args.repository),
            tfserving_base=Path(args.tfserving_base),
            model_name=args.model_name,
            gate=gate,
            data_dir=Path(args.data) if args.data else None,
            served_versions=args.served_versions,
            int8=args.int8,
            int8_tolerance=args.int8_tolerance,
            calibration_images=args.calibration_images,
        )
    except ExportError as err:
        print(f"braintumor export: {err}", file=sys.stderr)
        return 2
    print(f"Published {version_dir}")
    return 0


def _cmd_robustness(args: argparse.Namespace) -> int:
    _require_training(tensorflow=False)
    import json

    from braintumor.model_repository import read_preprocessing, versions
    from braintumor_training.robustness import (
        Robustness,
        evaluate_robustness,
        plot_comparison,
        render_comparison,
        render_table,
        write_report,
    )

    model_dir = Path(args.repository) / args.model_name
    published = versions(model_dir)
    version = args.version or (published[-1] if published else None)
    if version not in published:
        print(f"braintumor robustness: version {version} of {args.model_name} is not published", file=sys.stderr)
        return 2
    folder = model_dir / str(version)
    metrics = json.loads((folder / "metrics.json").read_text())
    leak_free = set(metrics.get("leak_free_test_images", []))
    preprocessing = read_preprocessing(model_dir, int(metrics.get("image_size", 0)) or IMAGE_SIZE)[version]
    result = evaluate_robustness(
        folder / "model.onnx", Path(args.data), leak_free, seed=args.seed, limit=args.limit, preprocessing=preprocessing
    )
    result = Robustness(f"{args.model_name} version {version}", result.metrics, result.preprocessing)
    out = Path(args.out or f"docs/robustness/v{version}")
    write_report(result, out)
    print(render_table(result, "test_leak_free"))
    print(f"Wrote {out}/robustness.json, robustness.md and robustness.png")
    baseline = Path(args.compare_with or f"docs/robustness/v{version - 1}") / "robustness.json"
    if args.compare_with and not baseline.exists():
        print(f"braintumor robustness: no robustness.json in {args.compare_with}", file=sys.stderr)
        return 2
    if baseline.exists() and (args.compare_with or version > 1):
        before = Robustness.from_dict(json.loads(baseline.read_text()))
        prefix = f"{args.model_name} version "
        earlier = f"v{before.model.removeprefix(prefix)}" if before.model.startswith(prefix) else baseline.parent.name
        names = (earlier, f"v{version}")
        comparison = render_comparison(before, result, names)
        (out / "comparison.md").write_text(
            f"# Robustness: {names[1]} against {names[0]}\n\n{comparison}\n![comparison](comparison.png)\n"
        )
        plot_comparison(before, result, names, out / "comparison.png")
        print(comparison)
        same_images = all(
            before.metrics[s][shift][0]["n_images"] == levels[0]["n_images"]
            for s in result.metrics
            for shift, levels in result.metrics[s].items()
            if shift in before.metrics.get(s, {})
        )
        if args.limit is None and same_images:  # only full evaluations on the same images go into the card
            _card_section(folder / "model-card.md", "## Robustness to scanner and acquisition shifts", comparison)
            print(f"Wrote {out}/comparison.md and its section of {folder}/model-card.md")
    return 0


def _card_section(card: Path, heading: str, body: str) -> None:
    """Put ``body`` under ``heading`` in a model card, replacing that section when it is already there.

    The section goes before "Known limitations" (or at the end); writing it twice gives the same card.
    """
    text = card.read_text()
    section = f"{heading}\n\nSeeded shifts of the Testing images (see `braintumor robustness`).\n\n{body.strip()}\n\n"
    existing = re.search(rf"^{re.escape(heading)}$", text, flags=re.M)
    if existing:
        following = re.search(r"^## ", text[existing.end() :], flags=re.M)
        end = existing.end() + following.start() if following else len(text)
        text = text[: existing.start()] + section + text[end:]
    else:
        limitations = re.search(r"^## Known limitations$", text, flags=re.M)
        at = limitations.start() if limitations else len(text)
        text = text[:at] + ("" if text[:at].endswith("\n\n") else "\n") + section + text[at:]
    card.write_text(text.rstrip("\n") + "\n")


def _bench_versions(args: argparse.Namespace, model_dir: Path, published: list[int], pixels: Any) -> int:
    import json

    from braintumor_serving.bench import bench_versions, format_versions

    missing = [v for v in args.versions if v not in published]
    if missing:
        print(f"braintumor bench: versions {missing} are not published in {model_dir}", file=sys.stderr)
        return 2
    models = {str(v): model_dir / str(v) / "model.onnx" for v in args.versions}
    print(f"Measuring versions {', '.join(models)} in-process, {args.seconds:.0f} s per point ...")
    results = bench_versions(models, pixels, args.seconds)
    table = format_versions(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "versions.json").write_text(json.dumps(results, indent=1))
    (out / "versions.txt").write_text(table + "\n")
    print(f"Wrote {out}/versions.json and versions.txt")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from braintumor_serving.triton import ServerConfig, restart_policy, serve
    except ImportError as err:
        sys.exit(f"braintumor: serving needs the serve extra ({err}); install it with: pip install -e '.[serve]'")
    try:
        policy = restart_policy(args.restart, args.restart_limit)
    except ValueError as err:
        print(f"braintumor serve: {err}", file=sys.stderr)
        return 2
    config = ServerConfig(
        repository=Path(args.repository),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_config_name=args.model_config_name or None,
        log_file=Path(args.log_file) if args.log_file else None,
        extra_args=[a for a in args.triton_args if a != "--"],
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
    )
    if args.admin_key_env:
        key = os.environ.get(args.admin_key_env, "")
        if not key:
            print(f"braintumor serve: ${args.admin_key_env} is empty or unset", file=sys.stderr)
            return 2
        config.admin_key = key
    if args.shadow is None:
        return serve(config, ready_timeout=args.ready_timeout, restart=policy)
    import tempfile

    from braintumor_serving.shadow import ShadowError, shadow_repository

    with tempfile.TemporaryDirectory(prefix="braintumor-shadow-") as folder:
        config.repository = Path(folder) / "model_repository"
        try:
            spec = shadow_repository(
                Path(args.repository), args.shadow, config.repository, config_name=args.model_config_name
            )
        except (ShadowError, OSError) as err:
            print(f"braintumor serve: {err}", file=sys.stderr)
            return 2
        print(
            f"Shadow: version {spec.primary} answers; {spec.candidate_model} (version {spec.candidate_version}) "
            "gets a copy of its requests; agreement on the metrics port (braintumor_shadow_*)",
            flush=True,
        )
        return serve(config, ready_timeout=args.ready_timeout, restart=policy)


def _bench_pixels(data_dir: Path, n: int = 64):
    import numpy as np

    from braintumor.config import IMAGE_SIZE, IMAGE_SUFFIXES
    from braintumor.preprocessing import preprocess_batch

    files = sorted(p for p in (data_dir / "Testing").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if files:
        print(f"Benchmark images: {min(n, len(files))} Testing images from {data_dir}")
        return preprocess_batch(files[:: max(1, len(files) // n)][:n])
    print(f"Benchmark images: random pixels ({data_dir} not found; content does not change the speed)")
    return np.random.default_rng(0).integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _cmd_bench(args: argparse.Namespace) -> int:
    from braintumor.config import MODEL_NAME as NAME
    from braintumor.model_repository import versions

    repository = Path(args.repository)
    published = versions(repository / NAME)
    if not published:
        print(f"braintumor bench: no published version of {NAME} in {repository}", file=sys.stderr)
        return 2
    pixels = _bench_pixels(Path(args.data))
    if args.versions:
        return _bench_versions(args, repository / NAME, published, pixels)

    from braintumor_serving import side_by_side
    from braintumor_serving.bench import bench_client
    from braintumor_serving.perf_analyzer import PerfAnalyzerError, find
    from braintumor_serving.triton import ServeError, ServerConfig, TritonServer, free_ports, ready_models

    try:
        find()
    except PerfAnalyzerError as err:
        print(f"braintumor bench: {err}", file=sys.stderr)
        return 2
    http, grpc, metrics = free_ports(3)
    config = ServerConfig(repository=repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    try:
        with TritonServer(config) as server:
            server.wait_until_ready(180)
            served = [str(v) for v in ready_models(server.local_http_url, config.admin_key).get(NAME, [])]
            print(f"Embedded Triton ready on {config.grpc_url} (versions {', '.join(served)}); measuring ...")
            results = side_by_side.run(server, repository / NAME, served, pixels, seconds=args.seconds)
            if args.client:
                files = sorted(p for p in (Path(args.data) / "Testing").rglob("*.jpg"))
                if files:
                    results["client"] = bench_client(config.grpc_url, files)
    except (ServeError, PerfAnalyzerError) as err:
        print(f"braintumor bench: {err}", file=sys.stderr)
        return 2
    print(side_by_side.format_table(results))
    side_by_side.write(results, Path(args.out))
    print(f"Wrote {args.out}/bench.json, bench.txt and bench.png")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from braintumor.webapp import create_app
    except ImportError as err:
        sys.exit(f"braintumor: the web app needs the app extra ({err}); install it with: pip install -e '.[app]'")
    print(f"braintumor app on http://{args.host}:{args.port}/ (model server {args.url})", flush=True)
    uvicorn.run(create_app(args.url, args.model_version), host=args.host, port=args.port, log_level="warning")
    return 0


def _cmd_pacs(args: argparse.Namespace) -> int:
    try:
        import highdicom  # noqa: F401

        from braintumor.pacs.command import run
    except ImportError as err:
        sys.exit(f"braintumor: the PACS worker needs the pacs extra ({err}); install it with: pip install -e '.[pacs]'")
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``braintumor`` command."""
    parser = argparse.ArgumentParser(prog="braintumor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "audit", help="audit a folder-per-class dataset (integrity, duplicates, leakage; sequences with --external)"
    )
    p.add_argument("data_dir")
    p.add_argument("--out", default="audit", help="folder for audit.json and audit.md (default: audit)")
    p.add_argument("--threshold", type=int, default=None, help="near-duplicate Hamming distance (of 256)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="DIR",
        help="a manifest dataset (folder with manifest.csv, e.g. ../shared/data/mri-external; repeatable): report "
        "its findings against sources and sequences, and estimate the audited dataset's sequences with a small "
        "classifier trained on its labelled ones",
    )
    p.add_argument(
        "--hand-check",
        default=None,
        metavar="CSV",
        help="hand labels of some images' sequences (path,sequence; e.g. docs/audit/sequence-check.csv) to compare "
        "the estimates with",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="smallest top probability of a definite sequence estimate (default 0.6; below: 'uncertain')",
    )
    p.add_argument("--workers", type=int, default=2, help="threads decoding images for the sequence estimate")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("train", help="audit, split and train MobileNetV3Small into a run folder")
    p.add_argument("--data", required=True, help="dataset root holding Training/ and Testing/")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--epochs", type=int, default=44)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--patience", type=int, default=12, help="early-stopping patience in epochs")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threshold", type=int, default=None, help="near-duplicate Hamming distance (of 256)")
    p.add_argument("--weights", default=None, help="local MobileNetV3Small include_top=False weights file")
    p.add_argument("--limit-per-class", type=int, default=None, help="train on a small subset (smoke tests)")
    p.add_argument(
        "--augmentation",
        choices=["v1", "robust", "sequence"],
        default="v1",
        help="augmentation profile: v1 (mild), robust (contrast, gamma, bias field, noise, framing) or sequence "
        "(robust plus the tissue contrasts of other MRI sequences: random intensity remapping, inversion)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from the weights of an earlier run's checkpoint (e.g. runs/v3/best.keras): a second phase",
    )
    p.add_argument(
        "--external",
        default=None,
        help="a manifest dataset (folder with manifest.csv, e.g. ../shared/data/mri-external) to train on too; "
        "it is split by near-duplicate group into train, validation and test parts",
    )
    p.add_argument(
        "--crop-to-head",
        action="store_true",
        help="preprocessing crops each image to the head (undoes borders, off-centre framing, pixel aspect)",
    )
    p.add_argument(
        "--normalize-intensity",
        action="store_true",
        help="preprocessing stretches each image's intensity percentiles (undoes brightness and contrast)",
    )
    p.add_argument(
        "--collapse-grace-epochs", type=int, default=5, help="epochs before a constant-output model stops the run"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a run (or, with --version, a published version) on its test sets, by subgroup",
    )
    p.add_argument("run_dir", nargs="?", default=None, help="the run folder (omit with --version)")
    p.add_argument("--data", default=None, help="dataset root (default: the one the run was trained on)")
    p.add_argument(
        "--tta",
        choices=["none", "flip"],
        default="none",
        help="test-time augmentation of the served model: flip averages the image and its mirror (2x compute)",
    )
    p.add_argument(
        "--compare-version",
        type=int,
        default=None,
        help="a published version to score on the run's test images too, shown beside it (report, model card)",
    )
    p.add_argument(
        "--version",
        type=int,
        default=None,
        help="instead of a run: a published version's subgroups on the test part of --external-split",
    )
    p.add_argument("--external-split", default=None, help="with --version: a run's external_split.json")
    p.add_argument(
        "--external",
        default=None,
        help="with --version: the manifest dataset (default: the one of the run beside --external-split)",
    )
    p.add_argument("--out", default=None, help="with --version: report folder (default: docs/v<N>/external)")
    p.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.add_argument("--model-name", default=MODEL_NAME)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="publish an evaluated run as the next model version")
    p.add_argument("run_dir")
    p.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.add_argument("--tfserving-base", default=str(DEFAULT_TFSERVING_BASE))
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--data", default=None, help="dataset root (default: the one the run was trained on)")
    p.add_argument("--min-accuracy", type=float, default=0.95, help="quality gate on Testing accuracy")
    p.add_argument("--min-leak-free-accuracy", type=float, default=0.93)
    p.add_argument("--min-tumor-sensitivity", type=float, default=0.97)
    p.add_argument("--served-versions", type=int, default=2, help="latest versions Triton serves side by side")
    p.add_argument(
        "--int8",
        action="store_true",
        help="serve a static int8 quantization (fp32 kept as model.fp32.onnx); refused unless every test set and "
        "subgroup figure stays within --int8-tolerance of fp32",
    )
    p.add_argument("--int8-tolerance", type=float, default=0.003, help="with --int8: 0.003 = 0.3 points")
    p.add_argument("--calibration-images", type=int, default=512, help="with --int8: training images to calibrate")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("robustness", help="accuracy of a published version under scanner and acquisition shifts")
    p.add_argument("--version", type=int, default=None, help="published version (default: the latest)")
    p.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--out", default=None, help="report folder (default: docs/robustness/v<N>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use about this many Testing images (quick runs)")
    p.add_argument(
        "--compare-with",
        default=None,
        help="report folder of the version to compare with (default: docs/robustness/v<N-1>)",
    )
    p.set_defaults(func=_cmd_robustness)

    p = sub.add_parser("serve", help="run the model repository on the embedded Triton server (CPU)")
    p.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-config-name", default="cpu", help="configs/<name>.pbtxt to serve ('' for config.pbtxt)")
    p.add_argument("--log-file", default=None, help="keep Triton's own log in this file")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over TLS")
    p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA of client certificates: mutual TLS")
    p.add_argument(
        "--admin-key-env",
        default=None,
        metavar="NAME",
        help="environment variable holding the admin key for the restricted APIs (default: a random key)",
    )
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    p.add_argument(
        "--shadow",
        type=int,
        default=None,
        metavar="N",
        help="shadow rollout: serve version N as the model <name>_candidate, which gets a copy of the current "
        "version's requests; callers never see its answers (see README: Shadow rollout)",
    )
    p.add_argument(
        "--restart",
        default="no",
        metavar="POLICY",
        help="when tritonserver dies: 'no' (exit with status 1, the default; e.g. under Kubernetes) or "
        "'on-failure[:N]' (restart it with backoff, at most N times in a row, default 5)",
    )
    p.add_argument(
        "--restart-limit",
        default=None,
        metavar="N",
        help="with --restart on-failure: at most N restarts in a row (0 or more)",
    )
    p.add_argument(
        "triton_args", nargs=argparse.REMAINDER, help="after --: further tritonserver arguments (e.g. restricted APIs)"
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("predict", help="classify images, folders or globs with a running server")
    from braintumor.predict_cli import add_arguments, run

    add_arguments(p)
    p.set_defaults(func=run)

    p = sub.add_parser("app", help="the clinicians' web page (calls the Triton server through the SDK)")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--model-version", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=_cmd_app)

    p = sub.add_parser(
        "bench", help="side by side: in-process ONNX Runtime, Triton (perf_analyzer), preprocessing, FMA peak, memory"
    )
    p.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="images to send (Testing split)")
    p.add_argument(
        "--seconds", type=float, default=5.0, help="seconds per in-process point and per perf_analyzer window (3 each)"
    )
    p.add_argument("--out", default="docs/benchmarks", help="folder for bench.json, bench.txt, bench.png")
    p.add_argument(
        "--versions",
        type=int,
        nargs="+",
        default=None,
        help="instead: compare these published versions side by side, in-process (e.g. --versions 1 2)",
    )
    p.add_argument(
        "--client",
        action="store_true",
        help="also measure the SDK's end-to-end throughput over the Testing images",
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("pacs", help="follow an Orthanc PACS: classify each stable MR series, write SR and overlay back")
    from braintumor.pacs.command import add_arguments as add_pacs_arguments

    add_pacs_arguments(p)
    p.set_defaults(func=_cmd_pacs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``braintumor`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "braintumor " + shlex.join(argv)
    if getattr(args, "threshold", "absent") is None:
        _require_training(tensorflow=False)
        from braintumor_training.audit import DEFAULT_NEAR_DUPLICATE_THRESHOLD

        args.threshold = DEFAULT_NEAR_DUPLICATE_THRESHOLD
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
