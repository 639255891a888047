"""The parts of a unicon model, found by layer type: what `foundation`, `expand`, `describe`
and the weight loaders read (a module of its own so that each can import it).

Example:
>>> from unicon_tf.model import foundation
>>> parts = model_parts(foundation((16, 16, 16), width=8, depth=2))
>>> sorted(parts["stems"]), sorted(parts["heads"]), parts["encoder"].name
(['ct'], ['classification'], 'encoder')
"""

from typing import Any

import keras

from unicon_tf.model.encoder import SharedEncoder
from unicon_tf.model.heads import Head
from unicon_tf.model.stems import ModalityFusion, ModalityStem


def model_parts(model: keras.Model) -> dict[str, Any]:
    """The stems (by modality), fusions (by modality tuple), heads (by name) and encoder."""
    if not isinstance(model.input, dict) or not isinstance(model.output, dict):
        raise ValueError(f"Model '{model.name}' is not a unicon_tf model: its inputs and outputs must be dicts.")
    parts = {"stems": {}, "fusions": {}, "heads": {}, "encoder": None}
    for layer in model.layers:
        if isinstance(layer, ModalityStem):
            parts["stems"][layer.modality] = layer
        elif isinstance(layer, ModalityFusion):
            parts["fusions"][tuple(layer.modalities)] = layer
        elif isinstance(layer, Head):
            parts["heads"][layer.name] = layer
        elif isinstance(layer, SharedEncoder):
            parts["encoder"] = layer
    if parts["encoder"] is None or not parts["stems"] or not parts["heads"]:
        raise ValueError(f"Model '{model.name}' is not a unicon_tf model: it needs stems, a SharedEncoder and heads.")
    return parts
