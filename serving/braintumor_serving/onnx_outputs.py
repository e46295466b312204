"""ONNX models cut down to some of their outputs.

ONNX Runtime runs every node of a session's graph whatever outputs a call asks for (its profiler shows the
same kernels for ``run(["probabilities"])`` as for both outputs), so the served model's Grad-CAM branch
costs about 15 % of every batch even when nobody wants the heatmap. A second session over the graph cut
down to the probabilities skips that work; the backend (``onnxruntime_python/model.py``) and the
benchmark's in-process side both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def keep_outputs(model_path: Path | str, outputs: Sequence[str]) -> bytes:
    """The serialised ONNX model of ``model_path`` with only ``outputs`` and the nodes they need.

    Args:
        model_path: the ONNX file.
        outputs: names of the graph outputs to keep, in the order they should have.

    Returns:
        The smaller model, ready for ``onnxruntime.InferenceSession``.

    Raises:
        ValueError: when a name is not an output of the model.
    """
    import onnx
    import onnx.utils

    model = onnx.load(str(model_path))
    present = [o.name for o in model.graph.output]
    unknown = [name for name in outputs if name not in present]
    if unknown:
        raise ValueError(f"{model_path}: {unknown} are not outputs of the model (outputs: {present})")
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return onnx.utils.Extractor(model).extract_model(inputs, list(outputs)).SerializeToString()
