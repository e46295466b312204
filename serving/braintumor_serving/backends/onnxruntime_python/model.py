"""A Python-based Triton backend that runs any ONNX model with ONNX Runtime.

The embedded Triton server bundled in the ``nvidia-pytriton`` wheel has only the python backend, not
the onnxruntime one, so this backend serves the very same ``model.onnx`` files the GPU container serves
with its native onnxruntime backend. Triton finds it as ``<backend-directory>/onnxruntime_python/model.py``
and a model selects it with ``backend: "onnxruntime_python"``; version folders hold only ``model.onnx``.

Triton hands ``execute`` every request its dynamic batcher gathered: they are concatenated into one
batch for a single ONNX Runtime call and the result is split back per request, so batching pays off.

Model configuration parameters (all optional): ``intra_op_num_threads`` (default 0 = ONNX Runtime's
choice), ``inter_op_num_threads``, ``graph_optimization_level`` (``disable``, ``basic``, ``extended``,
``all``; default ``all``), ``allow_spinning`` (``1`` or ``0``: whether idle threads spin; default ``1``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """Triton's python-backend model interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the version's ONNX file and check it against the model configuration."""
        config = json.loads(args["model_config"])
        params = _parameters(config)
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_num_threads", "0"))
        options.inter_op_num_threads = int(params.get("inter_op_num_threads", "0"))
        options.graph_optimization_level = _OPTIMIZATION[params.get("graph_optimization_level", "all")]
        # Idle ONNX Runtime threads spin by default, taking CPU from Triton and the stub between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        session_inputs = {i.name for i in self.session.get_inputs()}
        session_outputs = {o.name for o in self.session.get_outputs()}
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        missing = sorted((set(self.inputs) - session_inputs) | (set(self.outputs) - session_outputs))
        if missing:
            raise pb_utils.TritonModelException(
                f"{path}: tensors {missing} of the model configuration are not in the ONNX model "
                f"(inputs {sorted(session_inputs)}, outputs {sorted(session_outputs)})"
            )
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run all ``requests`` as one ONNX Runtime batch; one response per request, in order."""
        try:
            feeds: dict[str, np.ndarray] = {}
            sizes: list[int] = []
            for name in self.inputs:
                arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                sizes = [len(a) for a in arrays]
                feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            results = self.session.run(self.outputs, feeds)
        except Exception as err:
            error = pb_utils.TritonError(f"inference failed: {err}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

        bounds = np.cumsum([0, *sizes])
        responses = []
        for k in range(len(requests)):
            tensors = [
                pb_utils.Tensor(name, result[bounds[k] : bounds[k + 1]].astype(self.output_dtypes[name], copy=False))
                for name, result in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        """Release the ONNX Runtime session."""
        self.session = None
