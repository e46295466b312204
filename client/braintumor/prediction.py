"""The result of classifying one image."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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
        explained_label: the class the heatmap explains (the predicted one unless another was asked for).
        heatmap: Grad-CAM map of ``explained_label`` over the model's last convolution grid, in [0, 1]
            (``None`` unless an explanation was asked for). :mod:`braintumor.explain` overlays it.
    """

    label: str
    probabilities: dict[str, float]
    tumor_probability: float
    model_name: str
    model_version: str
    latency_ms: float
    explained_label: str | None = None
    heatmap: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_probabilities(
        cls,
        probabilities: np.ndarray,
        model_name: str,
        model_version: str,
        latency_ms: float,
        labels: tuple[str, ...] = LABELS,
        heatmaps: np.ndarray | None = None,
        explain_label: str | None = None,
    ) -> Prediction:
        """Build a prediction from one row of the model's outputs (``heatmaps``: that row's class maps)."""
        by_label = {label: float(p) for label, p in zip(labels, probabilities, strict=True)}
        label = labels[int(np.argmax(probabilities))]
        explained = (explain_label or label) if heatmaps is not None else None
        return cls(
            label=label,
            probabilities=by_label,
            tumor_probability=1.0 - by_label[NO_TUMOR_LABEL],
            model_name=model_name,
            model_version=model_version,
            latency_ms=latency_ms,
            explained_label=explained,
            heatmap=None if explained is None else np.asarray(heatmaps[labels.index(explained)], np.float32),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (the heatmap as nested lists, when there is one)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "heatmap"}
        if self.heatmap is not None:
            data["heatmap"] = np.round(self.heatmap, 4).tolist()
        else:
            data.pop("explained_label")
        return data
