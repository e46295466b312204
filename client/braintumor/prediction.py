"""The result of classifying one image."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from braintumor.config import LABELS, NO_TUMOR_LABEL


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image.

    Args:
        label: the most probable class.
        probabilities: calibrated probability of each class, by label.
        tumor_probability: probability of any tumor, ``1 - p(notumor)``.
        model_name: the served model that answered.
        model_version: its version.
        latency_ms: time of the request that carried this image, in milliseconds.
    """

    label: str
    probabilities: dict[str, float]
    tumor_probability: float
    model_name: str
    model_version: str
    latency_ms: float

    @classmethod
    def from_probabilities(
        cls,
        probabilities: np.ndarray,
        model_name: str,
        model_version: str,
        latency_ms: float,
        labels: tuple[str, ...] = LABELS,
    ) -> Prediction:
        """Build a prediction from one row of the model's output."""
        by_label = {label: float(p) for label, p in zip(labels, probabilities, strict=True)}
        return cls(
            label=labels[int(np.argmax(probabilities))],
            probabilities=by_label,
            tumor_probability=1.0 - by_label[NO_TUMOR_LABEL],
            model_name=model_name,
            model_version=model_version,
            latency_ms=latency_ms,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return asdict(self)
