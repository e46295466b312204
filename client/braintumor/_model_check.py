"""Checks the served model's metadata against what this SDK sends and reads (shared by sync and async)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from braintumor.config import CHANNELS, HEATMAP_NAME, INPUT_NAME, LABELS, OUTPUT_NAME
from braintumor.errors import ModelMismatchError
from braintumor.prediction import Prediction


@dataclass(frozen=True)
class ServedModel:
    """What the SDK learned about the served model on connect.

    Args:
        name: model name.
        versions: versions the metadata lists.
        image_size: side of the square input the model takes.
        max_batch_size: largest batch per request.
        heatmap_size: side of the Grad-CAM grid the model returns, or 0 when it returns none.
    """

    name: str
    versions: tuple[str, ...]
    image_size: int
    max_batch_size: int
    heatmap_size: int = 0


def check_model(metadata: dict[str, Any], config: dict[str, Any]) -> ServedModel:
    """Validate model metadata and configuration (as JSON dictionaries from tritonclient).

    Raises:
        ModelMismatchError: naming exactly what differs.
    """
    name = metadata.get("name", "?")
    inputs = {i["name"]: i for i in metadata.get("inputs", [])}
    outputs = {o["name"]: o for o in metadata.get("outputs", [])}
    problems = []
    image = inputs.get(INPUT_NAME)
    if image is None:
        problems.append(f"no input named {INPUT_NAME!r} (inputs: {sorted(inputs)})")
    else:
        shape = [int(d) for d in image["shape"]]
        if image["datatype"] != "UINT8":
            problems.append(f"input {INPUT_NAME!r} is {image['datatype']}, the SDK sends UINT8")
        if len(shape) != 4 or shape[3] != CHANNELS or shape[1] != shape[2] or shape[1] <= 0:
            problems.append(f"input {INPUT_NAME!r} has shape {shape}, the SDK sends [batch, N, N, {CHANNELS}]")
    probabilities = outputs.get(OUTPUT_NAME)
    if probabilities is None:
        problems.append(f"no output named {OUTPUT_NAME!r} (outputs: {sorted(outputs)})")
    elif probabilities["datatype"] != "FP32" or [int(d) for d in probabilities["shape"]][-1] != len(LABELS):
        problems.append(
            f"output {OUTPUT_NAME!r} is {probabilities['datatype']} {probabilities['shape']}, the SDK reads FP32 "
            f"[batch, {len(LABELS)}]"
        )
    heatmap = outputs.get(HEATMAP_NAME)
    heatmap_size = 0
    if heatmap is not None:
        dims = [int(d) for d in heatmap["shape"]]
        if heatmap["datatype"] != "FP32" or len(dims) != 4 or dims[1] != len(LABELS) or dims[2] != dims[3]:
            problems.append(
                f"output {HEATMAP_NAME!r} is {heatmap['datatype']} {dims}, the SDK reads FP32 "
                f"[batch, {len(LABELS)}, N, N]"
            )
        else:
            heatmap_size = dims[2]
    if problems:
        raise ModelMismatchError(f"model {name} does not match this SDK: " + "; ".join(problems))
    return ServedModel(
        name=name,
        versions=tuple(metadata.get("versions", [])),
        image_size=int(image["shape"][1]),
        max_batch_size=int(config.get("max_batch_size", 1)) or 1,
        heatmap_size=heatmap_size,
    )


def requested_outputs(model: ServedModel, explain: bool, explain_label: str | None) -> list[str]:
    """The outputs to ask for; checks that an explanation can be served.

    Raises:
        ModelMismatchError: when ``explain`` is set and the model serves no heatmap.
        ValueError: when ``explain_label`` is not a known label.
    """
    if explain_label is not None and explain_label not in LABELS:
        raise ValueError(f"explain_label must be one of {', '.join(LABELS)}, got {explain_label!r}")
    if not explain:
        return [OUTPUT_NAME]
    if not model.heatmap_size:
        raise ModelMismatchError(f"model {model.name} serves no {HEATMAP_NAME!r} output: it cannot explain")
    return [OUTPUT_NAME, HEATMAP_NAME]


def to_predictions(result: Any, latency_ms: float, explain: bool, explain_label: str | None) -> list[Prediction]:
    """Turn a tritonclient (sync or aio) result into one :class:`Prediction` per image."""
    response = result.get_response()
    probabilities = result.as_numpy(OUTPUT_NAME)
    heatmaps = result.as_numpy(HEATMAP_NAME) if explain else None
    return [
        Prediction.from_probabilities(
            row,
            response.model_name,
            response.model_version,
            latency_ms,
            heatmaps=None if heatmaps is None else np.asarray(heatmaps[i]),
            explain_label=explain_label,
        )
        for i, row in enumerate(probabilities)
    ]
