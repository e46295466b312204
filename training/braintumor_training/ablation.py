"""``python -m braintumor_training.ablation``: what each change of version 3 bought, run against run.

Each run is a training run of the same recipe with one thing changed (its data: ``brain-tumor-mri`` alone or
with ``mri-external``; its augmentation: ``robust`` or ``sequence``). Every run is judged on the same images:
the leak-free Testing subset of ``brain-tumor-mri`` and the test part of ``mri-external`` as one run's
``external_split.json`` draws it (never trained or tuned on by any run). Each run's temperature is fitted, as
``evaluate`` does, on the same validation images (``brain-tumor-mri`` validation and the external validation
part), so calibration differences do not decide; no test-time augmentation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from braintumor_training.dataset import load_arrays
from braintumor_training.evaluate import _labels, external_parts, load_classifier, load_run, run_sets
from braintumor_training.metrics import calibrated, fit_temperature
from braintumor_training.model import tta_logits
from braintumor_training.subgroups import find_row, format_proportion, score_set
from braintumor_training.train import run_preprocessing

#: The table's columns: (title, set, grouping, subgroup, metric).
COLUMNS: tuple[tuple[str, str, str, str, str], ...] = (
    ("leak-free accuracy", "test_leak_free", "all", "all", "class_accuracy"),
    ("T1 sensitivity", "external_test", "sequence", "T1", "tumor_sensitivity"),
    ("T1C sensitivity", "external_test", "sequence", "T1C", "tumor_sensitivity"),
    ("T2 sensitivity", "external_test", "sequence", "T2", "tumor_sensitivity"),
    ("br35h sensitivity", "external_test", "source", "br35h", "tumor_sensitivity"),
    ("external specificity", "external_test", "all", "all", "specificity"),
)


def score_run(run_dir: Path, split_file: Path, manifest_dir: Path) -> dict[str, Any]:
    """Score one run's best checkpoint on the shared sets (see the module's docstring).

    Args:
        run_dir: the training run folder.
        split_file: the ``external_split.json`` whose ``val`` and ``test`` parts every run is judged on.
        manifest_dir: the manifest dataset's folder.
    """
    config, audit = load_run(run_dir)
    data_dir = Path(config["data_dir"])
    preprocessing = run_preprocessing(config)
    model = load_classifier(run_dir)
    folder = run_sets(data_dir, audit)
    external = external_parts(split_file, manifest_dir)
    sets = {
        "validation": (data_dir, folder["validation"]),
        "external_val": (Path("/"), external["external_val"]),
        "test_leak_free": (data_dir, folder["test_leak_free"]),
        "external_test": (Path("/"), external["external_test"]),
    }
    logits, labels = {}, {}
    for name, (root, records) in sets.items():
        pixels, _ = load_arrays(root, records, preprocessing=preprocessing)
        logits[name], labels[name] = tta_logits(model, pixels.astype(np.float32)), _labels(records)
    temperature = fit_temperature(
        np.concatenate([logits["validation"], logits["external_val"]]),
        np.concatenate([labels["validation"], labels["external_val"]]),
    )
    scored = {
        name: score_set(calibrated(logits[name], temperature), labels[name], sets[name][1], name.startswith("external"))
        for name in ("test_leak_free", "external_test")
    }
    history = (run_dir / "history.csv").read_text().splitlines()
    return {
        "run": str(run_dir),
        "data": "brain-tumor-mri + mri-external" if config.get("external") else "brain-tumor-mri",
        "augmentation": config.get("augmentation", "v1"),
        "epochs": len(history) - 1,
        "temperature": temperature,
        "cells": {
            title: find_row(scored[set_name]["subgroups"], grouping, subgroup)[metric]
            for title, set_name, grouping, subgroup, metric in COLUMNS
        },
    }


def render(results: list[dict[str, Any]], split_file: Path) -> str:
    """The ablation table in Markdown, one row per run, with 95 % Wilson intervals."""
    lines = [
        "# Ablation: what each change of version 3 bought",
        "",
        "Every run: the same recipe, seed and preprocessing (crop to the head, intensity stretch), the same "
        "number of epochs, no test-time augmentation; judged on the leak-free Testing subset of "
        f"brain-tumor-mri and on the external test part drawn by `{split_file}` (never trained or tuned on). "
        "Each cell: k/n, the proportion and its 95 % Wilson interval.",
        "",
        "| data | augmentation | epochs | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|---|---:|" + "---|" * len(COLUMNS),
    ]
    for result in results:
        cells = [format_proportion(result["cells"][c[0]], counts=True) for c in COLUMNS]
        lines.append(
            f"| {result['data']} | {result['augmentation']} | {result['epochs']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Score the runs given and write ``ablation.md`` and ``ablation.json`` into ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m braintumor_training.ablation", description=__doc__)
    parser.add_argument("runs", nargs="+", help="training run folders")
    parser.add_argument("--external-split", required=True, help="the external_split.json every run is judged on")
    parser.add_argument("--external", required=True, help="the manifest dataset's folder")
    parser.add_argument("--out", required=True, help="report folder")
    args = parser.parse_args(argv)
    results = [score_run(Path(run), Path(args.external_split), Path(args.external)) for run in args.runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    (out / "ablation.md").write_text(render(results, Path(args.external_split)))
    print((out / "ablation.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
