"""braintumor_serving: runs the model repository on a real Triton Inference Server.

:mod:`braintumor_serving.triton` starts the ``tritonserver`` binary bundled in the ``nvidia-pytriton``
wheel on this machine's CPU; :mod:`braintumor_serving.backends` holds the python-based
``onnxruntime_python`` backend that lets that bundle (which has only the python backend) serve the
same ONNX files as the GPU container. :mod:`braintumor_serving.model_config` renders the repository's Triton
configurations (``braintumor export`` publishes with it), and :mod:`braintumor_serving.cli` defines the ``serve``
and ``bench`` commands. Around them: the side-by-side benchmark (:mod:`~braintumor_serving.side_by_side`,
:mod:`~braintumor_serving.perf_analyzer`), nginx in front of several replicas (:mod:`~braintumor_serving.balancer`,
:mod:`~braintumor_serving.drain`, :mod:`~braintumor_serving.rollout`) and the shadow rollout
(:mod:`~braintumor_serving.shadow`). This package imports only the client SDK (:mod:`braintumor`), never the
training one.
"""
