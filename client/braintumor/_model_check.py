"""Checks the served model's metadata against what this SDK sends and reads (shared by sync and async)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from braintumor.config import CHANNELS, HEATMAP_NAME, INPUT_NAME, LABELS, OUTPUT_NAME
from braintumor.errors import ModelMismatchError
from braintumor.model_repository import PREPROCESSING_PARAMETER
from braintumor.prediction import Prediction
from braintumor.preprocessing import Preprocessing


@dataclass(frozen=True)
class ServedModel:
    """What the SDK learned about the served model on connect.

    Args:
        name: model name.
        versions: versions the metadata lists.
        image_size: side of the square input the model takes.
        max_batch_size: largest batch per request.
        heatmap_size: side of the Grad-CAM grid the model returns, or 0 when it returns none.
        version: the version requests go to: the one pinned, else the latest served at connect time.
        preprocessing: the preprocessing that version was trained with (from the model configuration's
            ``preprocessing/<version>`` parameter; a plain resize when the configuration has none at all).
        by_version: the preprocessing of every version the configuration lists.
    """

    name: str
    versions: tuple[str, ...]
    image_size: int
    max_batch_size: int
    heatmap_size: int = 0
    version: str = ""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    by_version: dict[str, Preprocessing] = field(default_factory=dict)

    def preprocessing_of(self, version: str) -> Preprocessing:
        """The preprocessing of ``version`` (e.g. a prediction's ``model_version``), as the configuration says."""
        if version in self.by_version:
            return self.by_version[version]
        return self.preprocessing if version == self.version else Preprocessing(self.image_size)


def _preprocessings(config: dict[str, Any], image_size: int) -> dict[str, Preprocessing]:
    found = {}
    for key, parameter in config.get("parameters", {}).items():
        if not key.startswith(PREPROCESSING_PARAMETER):
            continue
        version = key.removeprefix(PREPROCESSING_PARAMETER)
        try:
            preprocessing = Preprocessing.from_json(parameter.get("string_value", ""))
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise ModelMismatchError(f"version {version}'s preprocessing parameter cannot be used: {err}") from err
        if preprocessing.size != image_size:
            raise ModelMismatchError(
                f"version {version}'s preprocessing makes {preprocessing.size}-pixel images, the model takes "
                f"{image_size}"
            )
        found[version] = preprocessing
    return found


def _preprocessing(by_version: dict[str, Preprocessing], version: str, image_size: int) -> Preprocessing:
    if version in by_version:
        return by_version[version]
    if by_version:  # other versions declare theirs: guessing this one's could feed it the wrong tensors
        raise ModelMismatchError(
            f"the model configuration declares no preprocessing for version {version} (it does for "
            f"{', '.join(sorted(by_version))}): re-render it with the repository tools"
        )
    return Preprocessing(image_size)  # a configuration from before per-version preprocessing


def check_model(metadata: dict[str, Any], config: dict[str, Any], version: str = "") -> ServedModel:
    """Validate model metadata and configuration (as JSON dictionaries from tritonclient).

    Args:
        metadata: the model metadata.
        config: the model configuration.
        version: the version pinned by the client; ``""`` resolves to the latest version the metadata lists
            (the one Triton answers unversioned requests with), so that the SDK knows which version's
            preprocessing to apply, and sends to that version.

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
    listed = tuple(metadata.get("versions", []))
    numeric = [v for v in listed if v.isdigit()]
    resolved = version or (max(numeric, key=int) if numeric else "")
    image_size = int(image["shape"][1])
    by_version = _preprocessings(config, image_size)
    return ServedModel(
        name=name,
        versions=listed,
        image_size=image_size,
        max_batch_size=int(config.get("max_batch_size", 1)) or 1,
        heatmap_size=heatmap_size,
        version=resolved,
        preprocessing=_preprocessing(by_version, resolved, image_size),
        by_version=by_version,
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
