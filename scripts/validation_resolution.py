"""Whether a run's weights gain from a larger input at inference (an exploratory check).

MobileNetV3Small ends in global pooling, so weights trained at the run's input size run on any size. Feeding
them larger slices at inference sometimes gains accuracy without training ("FixRes"), which would say a
larger served input is worth its cost. For each size: the run's ``best.keras`` through its own preprocessing
at that size, on the Kaggle validation images and the external validation part, a temperature fitted on
both, the serving rule's counts (``docs/serving-rule.json``, counted by ``validation_ensemble.rule_counts``) and
the calibration errors. Validation only: no test image is read.

    .venv/bin/python scripts/validation_resolution.py runs/v6 160 192 224
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from validation_ensemble import NO_TUMOR, SETS, rule_counts  # beside this script (run as scripts/...)

from braintumor_training.evaluate import validation_logits
from braintumor_training.metrics import calibrated, classification_metrics, fit_temperature, partial_label_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with best.keras trained with --external")
    parser.add_argument("sizes", type=int, nargs="+", help="input sides to try, in pixels")
    args = parser.parse_args()
    print(
        "| input | T | Kaggle accuracy | Kaggle errors | external tumours missed | external false alarms "
        "| 2 × missed + false alarms + Kaggle errors | external tumour ROC AUC | Kaggle ECE "
        "| external ECE (top label) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        logits, labels = validation_logits(args.run, image_size=size)
        temperature = fit_temperature(
            np.concatenate([logits[n] for n in SETS]), np.concatenate([labels[n] for n in SETS])
        )
        probabilities = {n: calibrated(logits[n], temperature) for n in SETS}
        kaggle = classification_metrics(probabilities["validation"], labels["validation"])
        external = partial_label_metrics(probabilities["external_val"], labels["external_val"])
        missed, alarms, errors, total = rule_counts(probabilities, labels)
        print(
            f"| {size} | {temperature:.3f} | {kaggle['accuracy']:.3f} | {errors} of {len(labels['validation'])} "
            f"| {missed} of {int((labels['external_val'] != NO_TUMOR).sum())} "
            f"| {alarms} of {int((labels['external_val'] == NO_TUMOR).sum())} | {total} "
            f"| {external['tumor_auc']:.3f} | {kaggle['ece']:.3f} | {external['ece']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
