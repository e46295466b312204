"""Checks the served model's metadata against what this SDK sends and reads (shared by sync and async)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from braintumor.config import CHANNELS, INPUT_NAME, LABELS, OUTPUT_NAME
from braintumor.errors import ModelMismatchError


@dataclass(frozen=True)
class ServedModel:
    """What the SDK learned about the served model on connect.

    Args:
        name: model name.
        versions: versions the metadata lists.
        image_size: side of the square input the model takes.
        max_batch_size: largest batch per request.
    """

    name: str
    versions: tuple[str, ...]
    image_size: int
    max_batch_size: int


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
    if problems:
        raise ModelMismatchError(f"model {name} does not match this SDK: " + "; ".join(problems))
    return ServedModel(
        name=name,
        versions=tuple(metadata.get("versions", [])),
        image_size=int(image["shape"][1]),
        max_batch_size=int(config.get("max_batch_size", 1)) or 1,
    )
