"""The training package's commands: ``braintumor audit``, ``train``, ``soup``, ``evaluate``, ``export``, ``robustness``.

The ``braintumor`` entry point (:mod:`braintumor.cli`) finds this module when a training command is asked for,
and calls :func:`define` to add that command's arguments. This module imports only the standard library and
:mod:`braintumor.config` at import time, so that every command's ``--help`` works without the ``train`` extra;
each command imports what it needs (TensorFlow among it) when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from braintumor.config import DEFAULT_DATA_DIR, DEFAULT_MODEL_REPOSITORY, DEFAULT_TFSERVING_BASE, IMAGE_SIZE, MODEL_NAME

__all__ = ["COMMANDS", "define"]


def _require_training(tensorflow: bool = True) -> None:
    try:
        import braintumor_training.audit  # noqa: F401

        if tensorflow:
            import tensorflow
    except ImportError as err:
        sys.exit(
            f"braintumor: this command needs the training extra ({err}); install it with: pip install -e '.[train]'"
        )


def _default_threshold(args: argparse.Namespace) -> None:
    """``--threshold`` left unset: the audit's near-duplicate distance (needs the training package's audit)."""
    if args.threshold is None:
        from braintumor_training.audit import DEFAULT_NEAR_DUPLICATE_THRESHOLD

        args.threshold = DEFAULT_NEAR_DUPLICATE_THRESHOLD


def _cmd_audit(args: argparse.Namespace) -> int:
    _require_training(tensorflow=False)
    _default_threshold(args)
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
    _require_training(tensorflow=False)
    _default_threshold(args)
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
        jpeg_draft=args.jpeg_draft,
        balance=args.balance,
        ema=args.ema,
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
            args.version,
            split_file,
            manifest,
            out,
            data,
            Path(args.repository),
            args.model_name,
            sequences_by_eye=Path(args.sequences_by_eye) if args.sequences_by_eye else None,
            compare_version=args.compare_version,
            card=args.card,
        )
    except (EvaluationError, DatasetError) as err:
        print(f"braintumor evaluate: {err}", file=sys.stderr)
        return 2
    print("\n".join(render_targets(result["targets"])))
    sheet = " and failures.png (its missed tumours and false alarms)" if (out / "failures.png").exists() else ""
    print(f"Wrote {out}/subgroups.md, subgroups.png, subgroups.json{sheet}")
    if args.card:
        print(f"and the section 'Sequences read by eye' of version {args.version}'s model card")
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
    if args.card:
        print("braintumor evaluate: --card writes a published version's card: use it with --version", file=sys.stderr)
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
            sequences_by_eye=Path(args.sequences_by_eye) if args.sequences_by_eye else None,
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

    if args.against is not None and not args.rule:
        print("braintumor export: --against names the version a --rule compares with; give --rule too", file=sys.stderr)
        return 2
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
            rule=Path(args.rule) if args.rule else None,
            against=args.against,
        )
    except ExportError as err:
        print(f"braintumor export: {err}", file=sys.stderr)
        return 2
    print(f"Published {version_dir}")
    return 0


def _cmd_soup(args: argparse.Namespace) -> int:
    _require_training()
    from braintumor_training.dataset import DatasetError
    from braintumor_training.soup import SoupError, make_soup

    try:
        make_soup([Path(r) for r in args.runs], Path(args.out), batches=args.batches, command=args.command_line)
    except (SoupError, DatasetError) as err:
        print(f"braintumor soup: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_robustness(args: argparse.Namespace) -> int:
    _require_training(tensorflow=False)
    import json

    from braintumor.model_repository import versions
    from braintumor_training.robustness import (
        Robustness,
        compare_versions,
        evaluate_version,
        render_table,
        same_images,
        write_card_section,
        write_report,
    )

    model_dir = Path(args.repository) / args.model_name
    published = versions(model_dir)
    version = args.version or (published[-1] if published else None)
    if version not in published:
        print(f"braintumor robustness: version {version} of {args.model_name} is not published", file=sys.stderr)
        return 2
    folder = model_dir / str(version)
    result = evaluate_version(model_dir, version, Path(args.data), seed=args.seed, limit=args.limit)
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
        comparison = compare_versions(before, result, baseline, out, args.model_name)
        print(comparison)
        if args.limit is None and same_images(before, result):  # only full evaluations on the same images
            write_card_section(folder / "model-card.md", comparison)
            print(f"Wrote {out}/comparison.md and its section of {folder}/model-card.md")
    return 0


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir")
    parser.add_argument("--out", default="audit", help="folder for audit.json and audit.md (default: audit)")
    parser.add_argument("--threshold", type=int, default=None, help="near-duplicate Hamming distance (of 256)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--external",
        action="append",
        default=[],
        metavar="DIR",
        help="a manifest dataset (folder with manifest.csv, e.g. ../shared/data/mri-external; repeatable): report "
        "its findings against sources and sequences, and estimate the audited dataset's sequences with a small "
        "classifier trained on its labelled ones",
    )
    parser.add_argument(
        "--hand-check",
        default=None,
        metavar="CSV",
        help="hand labels of some images' sequences (path,sequence; e.g. docs/audit/sequence-check.csv) to compare "
        "the estimates with",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="smallest top probability of a definite sequence estimate (default 0.6; below: 'uncertain')",
    )
    parser.add_argument("--workers", type=int, default=2, help="threads decoding images for the sequence estimate")
    parser.set_defaults(func=_cmd_audit)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root holding Training/ and Testing/")
    parser.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    parser.add_argument("--epochs", type=int, default=44)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--patience", type=int, default=12, help="early-stopping patience in epochs")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threshold", type=int, default=None, help="near-duplicate Hamming distance (of 256)")
    parser.add_argument("--weights", default=None, help="local MobileNetV3Small include_top=False weights file")
    parser.add_argument("--limit-per-class", type=int, default=None, help="train on a small subset (smoke tests)")
    parser.add_argument(
        "--augmentation",
        choices=["v1", "robust", "sequence"],
        default="v1",
        help="augmentation profile: v1 (mild), robust (contrast, gamma, bias field, noise, framing) or sequence "
        "(robust plus the tissue contrasts of other MRI sequences: random intensity remapping, inversion)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="start from the weights of an earlier run's checkpoint (e.g. runs/v3/best.keras): a second phase",
    )
    parser.add_argument(
        "--external",
        default=None,
        help="a manifest dataset (folder with manifest.csv, e.g. ../shared/data/mri-external) to train on too; "
        "it is split by near-duplicate group into train, validation and test parts",
    )
    parser.add_argument(
        "--crop-to-head",
        action="store_true",
        help="preprocessing crops each image to the head (undoes borders, off-centre framing, pixel aspect)",
    )
    parser.add_argument(
        "--normalize-intensity",
        action="store_true",
        help="preprocessing stretches each image's intensity percentiles (undoes brightness and contrast)",
    )
    parser.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="preprocessing decodes JPEGs at a reduced size (Pillow's draft) where the output is smaller; "
        "published with the version, so every client decodes the same pixels",
    )
    parser.add_argument(
        "--balance",
        # braintumor_training.train.BALANCES (not imported here: it needs TensorFlow)
        choices=["kind", "source", "kind-source"],
        default="kind",
        help="loss weights: kind (each class, or 'any tumour', weighs the same) or source (each dataset and "
        "kind weighs the same, so the external set's few normal slices count as much as its tumours) or "
        "kind-source (each kind weighs as under kind, split equally between the datasets that have it)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="MOMENTUM",
        help="validate and keep an exponential moving average of the weights (e.g. 0.998: about 500 steps) "
        "instead of the last step's, so the checkpoint chosen on validation is less noisy",
    )
    parser.add_argument(
        "--collapse-grace-epochs", type=int, default=5, help="epochs before a constant-output model stops the run"
    )
    parser.set_defaults(func=_cmd_train)


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", default=None, help="the run folder (omit with --version)")
    parser.add_argument("--data", default=None, help="dataset root (default: the one the run was trained on)")
    parser.add_argument(
        "--tta",
        choices=["none", "flip"],
        default="none",
        help="test-time augmentation of the served model: flip averages the image and its mirror (2x compute)",
    )
    parser.add_argument(
        "--compare-version",
        type=int,
        default=None,
        help="a published version to score on the same test images too, shown beside it (report, model card)",
    )
    parser.add_argument(
        "--sequences-by-eye",
        default=None,
        metavar="CSV",
        help="also report the external test images of this hand-check CSV by the sequence read by eye "
        "(docs/audit/br35h-test-sequences.csv: Br35H, whose manifest names no sequence; the only FLAIR labels)",
    )
    parser.add_argument(
        "--version",
        type=int,
        default=None,
        help="instead of a run: a published version's subgroups on the test part of --external-split",
    )
    parser.add_argument("--external-split", default=None, help="with --version: a run's external_split.json")
    parser.add_argument(
        "--external",
        default=None,
        help="with --version: the manifest dataset (default: the one of the run beside --external-split)",
    )
    parser.add_argument("--out", default=None, help="with --version: report folder (default: docs/v<N>/external)")
    parser.add_argument(
        "--card",
        action="store_true",
        help="with --version and --sequences-by-eye: also put those rows into the version's model card",
    )
    parser.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.set_defaults(func=_cmd_evaluate)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    parser.add_argument("--tfserving-base", default=str(DEFAULT_TFSERVING_BASE))
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--data", default=None, help="dataset root (default: the one the run was trained on)")
    parser.add_argument("--min-accuracy", type=float, default=0.95, help="quality gate on Testing accuracy")
    parser.add_argument("--min-leak-free-accuracy", type=float, default=0.93)
    parser.add_argument("--min-tumor-sensitivity", type=float, default=0.97)
    parser.add_argument("--served-versions", type=int, default=2, help="latest versions Triton serves side by side")
    parser.add_argument(
        "--rule",
        default=None,
        metavar="FILE",
        help="publish only if the run meets this serving rule on validation (e.g. docs/serving-rule.json): "
        "no worse than the served version by more than each condition's margin",
    )
    parser.add_argument(
        "--against",
        type=int,
        default=None,
        metavar="VERSION",
        help="with --rule: the published version to compare with (default: the latest)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="serve a static int8 quantization (fp32 kept as model.fp32.onnx); refused unless every test set and "
        "subgroup figure stays within --int8-tolerance of fp32",
    )
    parser.add_argument("--int8-tolerance", type=float, default=0.003, help="with --int8: 0.003 = 0.3 points")
    parser.add_argument("--calibration-images", type=int, default=512, help="with --int8: training images to calibrate")
    parser.set_defaults(func=_cmd_export)


def _robustness_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=int, default=None, help="published version (default: the latest)")
    parser.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--data", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--out", default=None, help="report folder (default: docs/robustness/v<N>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use about this many Testing images (quick runs)")
    parser.add_argument(
        "--compare-with",
        default=None,
        help="report folder of the version to compare with (default: docs/robustness/v<N-1>)",
    )
    parser.set_defaults(func=_cmd_robustness)


def _soup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", help="run folders fine-tuned from the same weights, on the same data and preprocessing"
    )
    parser.add_argument("--out", required=True, help="the soup's run folder (new); evaluate and export it as a run")
    parser.add_argument(
        "--batches",
        type=int,
        default=200,
        help="augmented training batches of 32 the BatchNorm statistics are recomputed on (default 200)",
    )
    parser.set_defaults(func=_cmd_soup)


#: Each command's arguments (and the function that runs it), by name.
COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "audit": _audit_arguments,
    "train": _train_arguments,
    "soup": _soup_arguments,
    "evaluate": _evaluate_arguments,
    "export": _export_arguments,
    "robustness": _robustness_arguments,
}


def define(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the arguments of the training command ``name`` to its parser, and the function that runs it.

    Args:
        name: one of :data:`COMMANDS`.
        parser: the command's parser (a subparser of ``braintumor``).
    """
    COMMANDS[name](parser)
