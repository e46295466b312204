"""Whether one temperature can calibrate a run on both validation sets (an exploratory check).

Fits the temperature on the Kaggle validation images alone, on the external validation part alone, and on
both (as ``braintumor evaluate`` does), and prints each fit's expected calibration errors on both sets: the
top label (Kaggle: all images; external: the images with one of the four classes) and, on the external part,
the tumour probability. Validation only: no test image is read.

    .venv/bin/python scripts/validation_calibration.py runs/v6
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from braintumor_training.evaluate import validation_logits
from braintumor_training.metrics import calibrated, classification_metrics, fit_temperature, partial_label_metrics

SETS = ("validation", "external_val")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with best.keras trained with --external")
    logits, labels = validation_logits(parser.parse_args().run)
    print("| temperature fitted on | T | Kaggle ECE | external ECE (top label) | external ECE (tumour probability) |")
    print("|---|---:|---:|---:|---:|")
    for fitted in (("validation",), ("external_val",), SETS):
        temperature = fit_temperature(
            np.concatenate([logits[n] for n in fitted]), np.concatenate([labels[n] for n in fitted])
        )
        kaggle = classification_metrics(calibrated(logits["validation"], temperature), labels["validation"])
        external = partial_label_metrics(calibrated(logits["external_val"], temperature), labels["external_val"])
        print(
            f"| {' + '.join(fitted)} | {temperature:.3f} | {kaggle['ece']:.4f} | {external['ece']:.4f} "
            f"| {external['tumor_ece']:.4f} |"
        )


if __name__ == "__main__":
    main()
