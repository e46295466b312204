"""A Python-based Triton backend that runs any ONNX model with ONNX Runtime.

The embedded Triton server bundled in the ``nvidia-pytriton`` wheel has only the python backend, not
the onnxruntime one, so this backend serves the very same ``model.onnx`` files the GPU container serves
with its native onnxruntime backend. Triton finds it as ``<backend-directory>/onnxruntime_python/model.py``
and a model selects it with ``backend: "onnxruntime_python"``; version folders hold only ``model.onnx``.

Triton hands ``execute`` every request its dynamic batcher gathered: they are concatenated into one
batch for a single ONNX Runtime call and the result is split back per request, so batching pays off.
Each response carries only the outputs its request asked for (a request that names none gets all).

Model configuration parameters (all optional): ``intra_op_num_threads`` (default 0 = ONNX Runtime's
choice), ``inter_op_num_threads``, ``graph_optimization_level`` (``disable``, ``basic``, ``extended``,
``all``; default ``all``), ``allow_spinning`` (``1`` or ``0``: whether idle threads spin; default ``1``),
``enable_cpu_mem_arena`` (``1`` or ``0``; default ``1``), ``lean_outputs`` (comma-separated output names:
a second session runs the graph cut down to them, for the requests that ask for nothing else; ONNX
Runtime otherwise computes every output at every call).
"""

from __future__ import annotations

import ctypes
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


_ARENA: bool | None = None


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _shared_arena() -> bool:
    """Register one CPU arena for every session of this process (once); whether it is there."""
    global _ARENA
    if _ARENA is None:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
            _ARENA = True
        except Exception:  # an older ONNX Runtime, or one already registered by someone else
            _ARENA = False
    return _ARENA


def _options(params: dict[str, str]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_num_threads", "0"))
    options.inter_op_num_threads = int(params.get("inter_op_num_threads", "0"))
    options.graph_optimization_level = _OPTIMIZATION[params.get("graph_optimization_level", "all")]
    options.enable_cpu_mem_arena = params.get("enable_cpu_mem_arena", "1") == "1"
    if options.enable_cpu_mem_arena and _shared_arena():
        # the full and the cut-down session of this stub draw from one arena: 60 MB less per stub
        options.add_session_config_entry("session.use_env_allocators", "1")
    # Idle ONNX Runtime threads spin by default, taking CPU from Triton and the stub between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
    return options


class TritonPythonModel:
    """Triton's python-backend model interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open the version's ONNX file (and its cut-down graph) and check it against the model configuration."""
        config = json.loads(args["model_config"])
        params = _parameters(config)
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = _options(params)
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

        # (output names, session): the cut-down session first, used when a request asks only for its outputs
        self.sessions: list[tuple[list[str], ort.InferenceSession]] = []
        lean = [name.strip() for name in params.get("lean_outputs", "").split(",") if name.strip()]
        if lean and set(lean) < set(self.outputs):
            from braintumor_serving.onnx_outputs import keep_outputs

            session = ort.InferenceSession(keep_outputs(path, lean), options, providers=["CPUExecutionProvider"])
            ctypes.CDLL(None).malloc_trim(0)  # hand back what cutting the graph took (about 30 MB)
            self._warm_up(session, config, lean)
            self.sessions.append((lean, session))
        self.sessions.append((self.outputs, self.session))

    @staticmethod
    def _warm_up(session: ort.InferenceSession, config: dict[str, Any], outputs: list[str]) -> None:
        """Run a batch of 1 and a full batch (Triton's ``model_warmup`` reaches only the full session)."""
        for batch in sorted({1, max(1, int(config.get("max_batch_size", 1)))}):
            feeds = {
                i["name"]: np.zeros(
                    (batch, *[int(d) for d in i["dims"]]), pb_utils.triton_string_to_numpy(i["data_type"])
                )
                for i in config["input"]
            }
            session.run(outputs, feeds)

    def _session_for(self, wanted: set[str]) -> int:
        return next(k for k, (names, _) in enumerate(self.sessions) if wanted <= set(names))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run the ``requests`` as one ONNX Runtime batch per session they need; one response per request,
        in order."""
        wanted = [set(r.requested_output_names()) or set(self.outputs) for r in requests]
        groups: dict[int, list[int]] = {}
        for k, names in enumerate(wanted):
            groups.setdefault(self._session_for(names), []).append(k)
        responses: list[Any] = [None] * len(requests)
        for index, members in groups.items():
            names, session = self.sessions[index]
            try:
                feeds: dict[str, np.ndarray] = {}
                sizes: list[int] = []
                for name in self.inputs:
                    arrays = [pb_utils.get_input_tensor_by_name(requests[k], name).as_numpy() for k in members]
                    sizes = [len(a) for a in arrays]
                    feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                results = dict(zip(names, session.run(names, feeds), strict=True))
            except Exception as err:
                error = pb_utils.TritonError(f"inference failed: {err}")
                for k in members:
                    responses[k] = pb_utils.InferenceResponse(output_tensors=[], error=error)
                continue
            bounds = np.cumsum([0, *sizes])
            for j, k in enumerate(members):
                tensors = [
                    pb_utils.Tensor(
                        name, results[name][bounds[j] : bounds[j + 1]].astype(self.output_dtypes[name], copy=False)
                    )
                    for name in self.outputs
                    if name in wanted[k]
                ]
                responses[k] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        """Release the ONNX Runtime sessions."""
        self.session = None
        self.sessions = []
