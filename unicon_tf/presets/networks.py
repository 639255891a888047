"""`backbone(name)`: a preset's pretrained Keras backbone (TensorFlow; the registry is
`unicon_tf.presets.registry`)."""

from __future__ import annotations

import pathlib

import keras

from unicon_tf.model.foundation import foundation
from unicon_tf.model.parts import model_parts
from unicon_tf.presets.registry import preset

def backbone(name: str, weights: str | pathlib.Path | None = None,
             input_shape: tuple[int, int, int] | None = None) -> keras.Model:
    """The pretrained Keras backbone of a preset: a volume in the preset's intensity range to
    its feature maps, finest first.

    Args:
        name: a preset name.
        weights: the checkpoint, for presets whose weights are a user file (or to override).
        input_shape: `(D, H, W)` the model is built for: needed by patch-embedding (ViT)
            presets, whose position embedding depends on the grid; default the trained shape.

    Returns:
        A functional `keras.Model` from `(B, D, H, W, 1)` to the list of feature maps (for the
        I3ResNet presets: stem, layer1..4, the last with 2048 channels).

    Raises:
        ValueError: an unknown name.
        PretrainedWeightsError: see `weights_path`, and a checkpoint that does not fit.

    Example:
    >>> net = backbone("astra_i3resnet152")  # doctest: +SKIP
    >>> net(keras.ops.zeros((1, 224, 224, 160, 1)))[-1].shape  # doctest: +SKIP
    TensorShape([1, 7, 7, 10, 2048])
    """
    spec = preset(name)
    shape = tuple(input_shape or spec.input.get("trained_shape") or (96, 96, 96))
    model = foundation(shape, encoder=name, weights=weights)
    parts = model_parts(model)
    stem, encoder = next(iter(parts["stems"].values())), parts["encoder"]
    if stem.kind == "identity":
        return encoder.backbone
    volume = keras.Input((None, None, None, 1), name="volume")
    return keras.Model(volume, encoder(stem(volume)), name=f"{name}_backbone")
