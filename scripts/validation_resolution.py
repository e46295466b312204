"""Whether a run's weights gain from a larger input at inference (an exploratory check).

MobileNetV3Small ends in global pooling, so weights trained on 160-pixel slices run on any size. Feeding
them larger slices at inference sometimes gains accuracy without training ("FixRes"), which would say a
larger served input is worth its cost. For each size: the run's ``best.keras`` through its own preprocessing
at that size, on the Kaggle validation images and the external validation part, a temperature fitted on
both, and the serving rule's counts (``docs/serving-rule.json``). Validation only: no test image is read.

    .venv/bin/python scripts/validation_resolution.py runs/v6 160 192 224
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from braintumor.config import LABELS
from braintumor_training.evaluate import validation_logits
from braintumor_training.metrics import calibrated, classification_metrics, fit_temperature, partial_label_metrics

NO_TUMOR = LABELS.index("notumor")
SETS = ("validation", "external_val")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with best.keras trained with --external")
    parser.add_argument("sizes", type=int, nargs="+", help="input sides to try, in pixels")
    args = parser.parse_args()
    print(
        "| input | T | Kaggle accuracy (errors of 571) | external tumours missed | external false alarms "
        "| external tumour ROC AUC | Kaggle ECE | external ECE (top label) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        logits, labels = validation_logits(args.run, image_size=size)
        temperature = fit_temperature(
            np.concatenate([logits[n] for n in SETS]), np.concatenate([labels[n] for n in SETS])
        )
        kaggle = classification_metrics(calibrated(logits["validation"], temperature), labels["validation"])
        probabilities = calibrated(logits["external_val"], temperature)
        external = partial_label_metrics(probabilities, labels["external_val"])
        called = 1 - probabilities[:, NO_TUMOR] >= 0.5
        tumour = labels["external_val"] != NO_TUMOR  # a tumour of no class has a negative label
        errors = int((calibrated(logits["validation"], temperature).argmax(axis=1) != labels["validation"]).sum())
        print(
            f"| {size} | {temperature:.3f} | {kaggle['accuracy']:.3f} ({errors}) | {int((~called & tumour).sum())} "
            f"of {int(tumour.sum())} | {int((called & ~tumour).sum())} of {int((~tumour).sum())} "
            f"| {external['tumor_auc']:.3f} | {kaggle['ece']:.3f} | {external['ece']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
