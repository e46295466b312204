"""braintumor_training: dataset audit, training, evaluation, robustness, export (int8 where it holds), model card.

Installed with the ``train`` extra. :mod:`braintumor_training.cli` defines the ``audit``, ``train``, ``evaluate``,
``export`` and ``robustness`` commands. This package is the highest layer: it imports the client SDK
(:mod:`braintumor`) and, to publish a version, :mod:`braintumor_serving.model_config`.
"""
