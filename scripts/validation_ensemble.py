"""Validation figures of several runs and of the averages of their predictions (an exploratory check).

For each run folder: its ``best.keras`` through its own preprocessing on the Kaggle validation images and the
external validation part, temperature-scaled on those (as ``braintumor evaluate`` does); then every pair,
triple, ... of runs, their calibrated probabilities averaged. Prints, for each, the serving rule's counts
(``docs/unpublished/v9/decision-rule.md``): missed external tumours, false alarms on the external normal
slices, Kaggle errors, and 2 × missed + false alarms + Kaggle errors. Validation only: no test image is read.

    .venv/bin/python scripts/validation_ensemble.py runs/v5 runs/v6 runs/v8 runs/v9
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from braintumor.config import LABELS
from braintumor_training.evaluate import validation_logits
from braintumor_training.metrics import calibrated, fit_temperature

NO_TUMOR = LABELS.index("notumor")
SETS = ("validation", "external_val")


def validation_probabilities(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A run's calibrated probabilities and labels on the Kaggle validation images and the external validation part."""
    logits, labels = validation_logits(run_dir)
    temperature = fit_temperature(np.concatenate([logits[n] for n in SETS]), np.concatenate([labels[n] for n in SETS]))
    return {n: calibrated(logits[n], temperature) for n in SETS}, labels


def rule_counts(probabilities: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
    """Missed external tumours, external false alarms, Kaggle errors and the weighted total."""
    kaggle = int((probabilities["validation"].argmax(axis=1) != labels["validation"]).sum())
    called = 1 - probabilities["external_val"][:, NO_TUMOR] >= 0.5
    tumour = labels["external_val"] != NO_TUMOR  # a tumour of no class has a negative label
    missed, alarms = int((~called & tumour).sum()), int((called & ~tumour).sum())
    return missed, alarms, kaggle, 2 * missed + alarms + kaggle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with best.keras, on the same validation images")
    args = parser.parse_args()
    probabilities, labels = {}, None
    for run in args.runs:
        probabilities[run.name], labels = validation_probabilities(run)
    print("runs: missed of external tumours, false alarms, Kaggle errors, weighted")
    for k in range(1, len(args.runs) + 1):
        for combo in itertools.combinations(probabilities, k):
            averaged = {n: np.mean([probabilities[r][n] for r in combo], axis=0) for n in SETS}
            print(" + ".join(combo), *rule_counts(averaged, labels))


if __name__ == "__main__":
    main()
