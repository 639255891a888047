"""Inflated 3D ResNet (I3ResNet) in Keras 3: Merlin's CT image encoder, weights from PyTorch.

A port of Merlin's `merlin/models/i3res.py` and `inflate.py` (Stanford MIMI, MIT licence;
adapted there from hassony2/inflated_convnets_pytorch), the image backbone of Merlin and of
Astra_CTRG: torchvision's Bottleneck v1.5 (stride on the 3x3 convolution) inflated to 3D.

Layout. Merlin reads a volume `(B, 1, X, Y, Z)` in RAS voxel order (Z the 3 mm slice axis),
moves Z to the front (`permute(0, 1, 4, 2, 3)`: Z is the network's "time" axis), copies
the channel three times for the ImageNet-inflated stem, and returns its skips permuted
back to `(X, Y, Z)` order. This port does the same on channels-last volumes
`(B, D, H, W, 1)` = unicon_tf's RAS `(X, Y, Z)` order: each level permutes its input to
`(Z, X, Y)`, computes, and permutes its feature map back, so every level is computed from
the previous level's feature map alone (adapter paths may start at any level). Kernels map
one to one (`(O, I, kt, kh, kw)` -> `(kt, kh, kw, I, O)`); the three identical input
channels are folded into the stem kernel (summed over its input axis), which computes the
same convolution on one channel.

| part      | kernel (T, H, W) | stride    | padding   | channels out            |
|-----------|------------------|-----------|-----------|-------------------------|
| conv1     | 3 x 7 x 7        | 1, 2, 2   | 1, 3, 3   | 64 (`stem` feature map) |
| maxpool   | 3 x 3 x 3        | 2, 2, 2   | 1, 1, 1   | 64                      |
| layerN    | bottlenecks 1^3 -> 3^3 (stride s on T, H, W) -> 1^3; 1^3 downsample, stride s | 256, 512, 1024, 2048 |

Strided convolutions and the max pool pad explicitly (zeros; the pool reads ReLU outputs,
>= 0, so zero padding equals PyTorch's -inf) and then run `valid`, matching PyTorch's
symmetric padding at any input size (Keras' `same` would pad one voxel more on the right).
BatchNorm runs in inference mode always (`FrozenBatchNormalization`), with the published
running statistics and epsilon 1e-5.

The backbone returns five feature maps in the volume's `(D, H, W)` order, finest first:
`stem` (D/2, H/2, W, 64) and `layer1..4` at strides (4, 4, 2), (8, 8, 4), (16, 16, 8),
(32, 32, 16): D and H must be multiples of 32, W of 16 (Merlin's 224 x 224 x 160 is).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from unicon_tf.model.adapters import AdaptableConv3D
from unicon_tf.model.encoder import SharedEncoder
from unicon_tf.model.families import EncoderFamily, register
from unicon_tf.model.parts import model_parts
from unicon_tf.model.torch_checkpoint import torch_state_dict
from unicon_tf.options import ENCODER_OPTIONS
from unicon_tf.model.pretrained import check_state

if TYPE_CHECKING:
    import tensorflow as tf

RESNET152_LAYERS = (3, 8, 36, 3)
"""Bottlenecks per layer of ResNet-152 (Merlin's and Astra's image encoder)."""

CHECKPOINT_PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.")
"""Where the I3ResNet's tensors sit in Astra's and Merlin's full checkpoints (stripped on load)."""

HEAD_KEYS = ("fc.", "classifier.", "contrastive_head.")
"""Tensors of Merlin's classifier and contrastive heads: not part of the backbone, ignored."""

FEATURE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
"""The backbone's feature maps, finest first."""


@keras.saving.register_keras_serializable(package="unicon_tf")
class FrozenBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that always normalises with its moving statistics.

    A published encoder's running mean and variance stay as published: training a head
    (or adapters, or the encoder) never updates them and never normalises with batch
    statistics, whatever `training` the caller passes. Scale and shift may still train.

    Args:
        **kwargs: `keras.layers.BatchNormalization` arguments (epsilon 1e-5 by default,
            PyTorch's).

    Example:
    >>> bn = FrozenBatchNormalization()
    >>> y = bn(keras.ops.ones((2, 4, 4, 4, 3)), training=True)
    >>> float(keras.ops.max(keras.ops.abs(y - 1 / (1 + 1e-5) ** 0.5))) < 1e-6
    True
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("epsilon", 1e-5)
        super().__init__(**kwargs)

    def call(self, inputs: tf.Tensor, training: bool | None = None, mask: tf.Tensor | None = None) -> tf.Tensor:
        return super().call(inputs, training=False, mask=mask)


def i3resnet_backbone(layers: tuple[int, ...] = RESNET152_LAYERS, width: int = 64,
                      name: str = "i3resnet") -> keras.Model:
    """An I3ResNet backbone (randomly initialised; load weights with `load_i3resnet_weights`).

    Args:
        layers: bottleneck blocks in each of the four layers; `(3, 8, 36, 3)` is ResNet-152.
        width: the stem's channels and layer1's bottleneck width (64 in ResNet-152);
            layer k's blocks output `4 * width * 2**(k-1)` channels.
        name: the model's name.

    Returns:
        A functional `keras.Model` from a one-channel volume `(B, D, H, W, 1)` (spatial
        dims free) to the five feature maps `stem, layer1..4`, finest first (the last with
        `32 * width` channels: 2048 for ResNet-152).

    Raises:
        ValueError: not four layers, or a layer or width < 1.

    Example:
    >>> net = i3resnet_backbone(layers=(1, 1, 1, 1), width=4)
    >>> [tuple(f.shape[1:]) for f in net(keras.ops.zeros((1, 32, 32, 16, 1)))]
    [(16, 16, 16, 4), (8, 8, 8, 16), (4, 4, 4, 32), (2, 2, 2, 64), (1, 1, 1, 128)]
    """
    layers = tuple(int(n) for n in layers)
    if len(layers) != 4 or min(layers) < 1 or int(width) < 1:
        raise ValueError(f"An I3ResNet needs four layers of >= 1 blocks and width >= 1, got {layers}, {width}.")
    width = int(width)
    inputs = keras.Input((None, None, None, 1), name="volume")
    x = _to_time_first(inputs, "conv1")
    x = keras.layers.ZeroPadding3D((1, 3, 3), name="conv1_pad")(x)
    x = AdaptableConv3D(width, (3, 7, 7), strides=(1, 2, 2), use_bias=False, name="conv1")(x)
    x = FrozenBatchNormalization(name="bn1")(x)
    features = [_to_volume_order(keras.layers.ReLU(name="relu")(x), "stem")]
    for index, blocks in enumerate(layers):
        x = _to_time_first(features[-1], f"layer{index + 1}")
        if index == 0:
            x = keras.layers.ZeroPadding3D(1, name="maxpool_pad")(x)
            x = keras.layers.MaxPooling3D(3, strides=2, name="maxpool")(x)
        planes = width * 2**index
        for block in range(blocks):
            x = _bottleneck(x, planes, stride=2 if index and not block else 1, prefix=f"layer{index + 1}_{block}")
        features.append(_to_volume_order(x, f"layer{index + 1}"))
    return keras.Model(inputs, features, name=name)


def _to_time_first(x, name):
    """(B, X, Y, Z, C) -> (B, Z, X, Y, C): Merlin's `permute(0, 1, 4, 2, 3)`, Z the "time" axis."""
    return keras.layers.Permute((3, 1, 2, 4), name=f"{name}_time_first")(x)


def _to_volume_order(x, name):
    """(B, Z, X, Y, C) -> (B, X, Y, Z, C): Merlin's skips' `permute(0, 1, 3, 4, 2)`."""
    return keras.layers.Permute((2, 3, 1, 4), name=f"{name}_volume_order")(x)


def _bottleneck(x, planes, stride, prefix):
    """torchvision's Bottleneck v1.5 inflated: 1^3 -> 3^3 (stride) -> 1^3, plus the shortcut."""
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * planes:
        shortcut = AdaptableConv3D(4 * planes, 1, strides=stride, use_bias=False, name=f"{prefix}_downsample_0")(x)
        shortcut = FrozenBatchNormalization(name=f"{prefix}_downsample_1")(shortcut)
    y = AdaptableConv3D(planes, 1, use_bias=False, name=f"{prefix}_conv1")(x)
    y = keras.layers.ReLU(name=f"{prefix}_relu1")(FrozenBatchNormalization(name=f"{prefix}_bn1")(y))
    if stride == 1:
        y = AdaptableConv3D(planes, 3, padding="same", use_bias=False, name=f"{prefix}_conv2")(y)
    else:
        y = keras.layers.ZeroPadding3D(1, name=f"{prefix}_conv2_pad")(y)
        y = AdaptableConv3D(planes, 3, strides=stride, use_bias=False, name=f"{prefix}_conv2")(y)
    y = keras.layers.ReLU(name=f"{prefix}_relu2")(FrozenBatchNormalization(name=f"{prefix}_bn2")(y))
    y = AdaptableConv3D(4 * planes, 1, use_bias=False, name=f"{prefix}_conv3")(y)
    y = FrozenBatchNormalization(name=f"{prefix}_bn3")(y)
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


def is_i3resnet(backbone: keras.Model) -> bool:
    """Whether a backbone is an I3ResNet built by `i3resnet_backbone` (its stem and BatchNorms)."""
    names = {layer.name: layer for layer in backbone.layers}
    return isinstance(names.get("conv1"), keras.layers.Conv3D) and isinstance(names.get("bn1"),
                                                                              FrozenBatchNormalization)


def i3resnet_summary(backbone: keras.Model) -> dict:
    """`{"kind": "i3resnet", "layers": [...], "width": w}` of an I3ResNet backbone."""
    counts = [0, 0, 0, 0]
    for layer in backbone.layers:
        if layer.name.endswith("_conv1") and layer.name.startswith("layer"):
            counts[int(layer.name[5]) - 1] += 1
    conv1 = next(layer for layer in backbone.layers if layer.name == "conv1")
    return {"kind": "i3resnet", "layers": counts, "width": int(conv1.filters)}


def i3resnet_targets(backbone: keras.Model) -> tuple[dict, set]:
    """The PyTorch state-dict keys of an I3ResNet backbone and how to assign each.

    Returns:
        `({key: (shape in the file, assign(array))}, skipped keys)`: conv kernels
        `(O, I, kd, kh, kw)` are transposed to Keras' `(kd, kh, kw, I, O)` (the stem's three
        input channels summed into one); BatchNorm `weight, bias, running_mean, running_var`
        go to `gamma, beta, moving_mean, moving_variance`; `num_batches_tracked` is skipped.
    """
    targets, skipped = {}, set()
    for layer in backbone.layers:
        key = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Conv3D):
            kernel = layer._kernel
            shape = (kernel.shape[4], 3 if layer.name == "conv1" else kernel.shape[3], *kernel.shape[:3])

            def assign(array, kernel=kernel, stem=layer.name == "conv1"):
                array = np.transpose(array, (2, 3, 4, 1, 0))
                kernel.assign(array.sum(axis=3, keepdims=True) if stem else array)

            targets[f"{key}.weight"] = (tuple(int(d) for d in shape), assign)
        elif isinstance(layer, FrozenBatchNormalization):
            for field, variable in (("weight", layer.gamma), ("bias", layer.beta),
                                    ("running_mean", layer.moving_mean), ("running_var", layer.moving_variance)):
                targets[f"{key}.{field}"] = ((int(variable.shape[0]),), lambda a, v=variable: v.assign(a))
            skipped.add(f"{key}.num_batches_tracked")
    return targets, skipped


def read_i3resnet_state(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The I3ResNet tensors of a `torch.save` checkpoint (Astra's, Merlin's or a bare state
    dict), the full checkpoints' prefixes stripped and Merlin's head tensors left out.

    Raises:
        PretrainedWeightsError: see `unicon_tf.model.torch_checkpoint.read_torch_checkpoint`.
    """
    state = torch_state_dict(path)
    for prefix in CHECKPOINT_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}


def load_i3resnet_weights(backbone: keras.Model, path: str | pathlib.Path) -> list[str]:
    """Load PyTorch I3ResNet weights (Astra's or Merlin's checkpoint) into a backbone.

    Args:
        backbone: built by `i3resnet_backbone` with the checkpoint's layers and width.
        path: a `torch.save` zip checkpoint (read without torch, see `torch_checkpoint`).

    Returns:
        The keys loaded, sorted.

    Raises:
        PretrainedWeightsError: an unreadable, unsafe or foreign file, or tensors missing,
            unexpected or wrongly shaped (each named with the file); nothing is assigned.

    Example:
    >>> backbone = i3resnet_backbone()  # doctest: +SKIP
    >>> len(load_i3resnet_weights(backbone, "astra_encoder.pt"))  # doctest: +SKIP
    775
    """
    targets, skipped = i3resnet_targets(backbone)
    check_state(path, targets, read_i3resnet_state(path), skipped, what=f"the I3ResNet '{backbone.name}'")
    return sorted(targets)


I3RESNET_OPTIONS = ENCODER_OPTIONS["i3resnet"]  # `foundation(encoder="i3resnet", ...)`: block counts, stem width, checkpoint


def i3resnet_encoder(input_shape: tuple[int, int, int], layers: tuple[int, ...] = RESNET152_LAYERS,
                     width: int = 64) -> SharedEncoder:
    """The `i3resnet` family's `SharedEncoder` (`foundation(encoder="i3resnet")`); any
    `input_shape` divisible by the total stride (checked by `foundation`).

    Example:
    >>> i3resnet_encoder((32, 32, 32), layers=(1, 1, 1, 1), width=8).depth
    5
    """
    return SharedEncoder(i3resnet_backbone(layers=layers, width=width), name="encoder")


def load_i3resnet_model_weights(model: keras.Model, path: str | pathlib.Path, format: str | None = None) -> list[str]:
    """`load_i3resnet_weights` into the backbone of a unicon model's encoder (`format` unused:
    the checkpoint is a `torch.save` file)."""
    return load_i3resnet_weights(model_parts(model)["encoder"].backbone, path)


register(EncoderFamily("i3resnet", I3RESNET_OPTIONS, i3resnet_encoder, is_i3resnet,
                       lambda encoder: i3resnet_summary(encoder.backbone), load_weights=load_i3resnet_model_weights))
