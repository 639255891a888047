"""Modality stems and their fusion.

Each imaging modality (CT, PET, ...) enters the model through its own stem, which maps a
one-channel volume to the encoder's input channels (for a ViT encoder the stem is the
modality's patch embedding, and the fusion mixes patch tokens). A path that reads several modalities
first fuses their stem features with `ModalityFusion`, which starts out as the first
modality's features exactly (identity on it, zero on the others): a new modality begins
from what the model already does and learns how much to add. A fusion may also act at an
encoder level (`level=s`): it then mixes the new modality's stem features, average-pooled
to that level's grid, into the first modality's level `s - 1` feature map.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from unicon_tf.model.encoder import group_norm

if TYPE_CHECKING:
    import tensorflow as tf


@keras.saving.register_keras_serializable(package="unicon_tf")
class ModalityStem(keras.layers.Layer):
    """Maps a `(D, H, W, 1)` volume of one modality to the features the encoder reads.

    Args:
        modality: the modality this stem reads (also the model input's name).
        channels: output channels (the encoder's input channels).
        stage: the continual-learning stage that added it.
        kind: `"conv"` (Conv3D 3^3, GroupNorm, swish: `(D, H, W, channels)`),
            `"identity"` (pass the volume through, for a user encoder pretrained on raw
            one-channel volumes) or `"patch"` (a ViT patch embedding: Conv3D with kernel =
            stride = `patch_size`, giving tokens on a `(D/p, H/p, W/p, channels)` grid, as
            `PatchEmbeddingBlock` in MONAI).
        patch_size: the patch size per axis (an int or three), for `kind="patch"`.
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> stem = ModalityStem("ct", channels=8)
    >>> tuple(stem(keras.ops.zeros((1, 16, 16, 16, 1))).shape)
    (1, 16, 16, 16, 8)
    """

    def __init__(self, modality: str, channels: int, stage: int = 0, kind: str = "conv",
                 patch_size: int | Sequence[int] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("name", f"stem_{modality}")
        super().__init__(**kwargs)
        if kind not in ("conv", "identity", "patch"):
            raise ValueError(f"Unknown stem kind '{kind}': expected 'conv', 'identity' or 'patch'.")
        if kind == "identity" and channels != 1:
            raise ValueError(f"An identity stem outputs 1 channel, but the encoder reads {channels}.")
        self.modality = modality
        self.channels = int(channels)
        self.stage = int(stage)
        self.kind = kind
        self.patch_size = None
        if kind == "patch":
            size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size or ())
            if len(size) != 3 or min(size) < 1:
                raise ValueError(f"A patch stem needs patch_size: one or three positive ints, got {patch_size!r}.")
            self.patch_size = tuple(int(p) for p in size)
            self.conv = keras.layers.Conv3D(self.channels, self.patch_size, strides=self.patch_size, name="conv")
        if kind == "conv":
            self.conv = keras.layers.Conv3D(self.channels, 3, padding="same", name="conv")
            self.norm = group_norm(self.channels, name="norm")

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if self.kind == "patch":
            self.conv.build(input_shape)
        if self.kind == "conv":
            self.conv.build(input_shape)
            self.norm.build(tuple(input_shape[:-1]) + (self.channels,))

    def call(self, volume: "tf.Tensor") -> "tf.Tensor":
        if self.kind == "identity":
            return volume
        if self.kind == "patch":
            return self.conv(volume)
        return ops.silu(self.norm(self.conv(volume)))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        spatial = tuple(input_shape[1:-1])
        if self.kind == "patch":
            spatial = tuple(None if d is None else d // p for d, p in zip(spatial, self.patch_size))
        return (input_shape[0],) + spatial + (self.channels,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(modality=self.modality, channels=self.channels, stage=self.stage, kind=self.kind)
        if self.patch_size is not None:
            config["patch_size"] = list(self.patch_size)
        return config


@keras.saving.register_keras_serializable(package="unicon_tf")
class ModalityFusion(keras.layers.Layer):
    """Fuses the features of several modalities into the first one's channels and grid.

    A learned 1x1x1 mixing of the concatenated features, initialised to pass the first
    input through unchanged and to ignore the others. Inputs on a finer grid than the first
    (an integer factor per axis) are average-pooled to its grid first.

    Args:
        modalities: the modalities fused, in input order; the first is passed through.
        stage: the stage that added it.
        level: the encoder level whose input it produces: 0 fuses stem features (the first
            input is the first modality's stem output); s > 0 fuses into the first
            modality's level `s - 1` feature map (see `expand(..., adapter_start=s)`).
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> fusion = ModalityFusion(["ct", "pet"])
    >>> ct, pet = keras.ops.ones((1, 4, 4, 4, 8)), keras.ops.zeros((1, 4, 4, 4, 8))
    >>> bool(keras.ops.all(fusion([ct, pet]) == ct))
    True
    """

    def __init__(self, modalities: Sequence[str], stage: int = 0, level: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("name", "fusion_" + "_".join(modalities) + (f"_level{level}" if level else ""))
        super().__init__(**kwargs)
        if len(modalities) < 2:
            raise ValueError(f"Fusion needs at least two modalities, got {list(modalities)}.")
        self.modalities = list(modalities)
        self.stage = int(stage)
        self.level = int(level)

    def build(self, input_shapes: Sequence[tuple[int | None, ...]]) -> None:
        channels = input_shapes[0][-1]
        self.pooling = [_pool_factor(input_shapes[0], shape) for shape in input_shapes]

        def pass_first(shape, dtype=None):
            return ops.concatenate(
                [ops.eye(channels, dtype=dtype), ops.zeros((shape[0] - channels, channels), dtype=dtype)], axis=0
            )

        self.mixing = self.add_weight(
            name="mixing", shape=(sum(shape[-1] for shape in input_shapes), channels), initializer=pass_first
        )
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer="zeros")

    def call(self, features: Sequence["tf.Tensor"]) -> "tf.Tensor":
        features = [x if factor == 1 else _average_pool(x, factor) for x, factor in zip(features, self.pooling)]
        return ops.matmul(ops.concatenate(features, axis=-1), self.mixing) + self.bias

    def compute_output_shape(self, input_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        return tuple(input_shapes[0])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(modalities=self.modalities, stage=self.stage, level=self.level)
        return config


def _average_pool(x, factor):
    """3D average pooling by `factor` (stride = window), in float32 for a float16 `x`
    (mixed_float16: TensorFlow has no float16 AvgPool3D kernel on the CPU)."""
    if x.dtype != "float16":
        return ops.average_pool(x, factor, factor)
    return ops.cast(ops.average_pool(ops.cast(x, "float32"), factor, factor), x.dtype)


def _pool_factor(target_shape, shape):
    """The integer factor (one, or one per axis) that takes grid `shape` (5D) to `target_shape`'s grid."""
    target, grid = tuple(target_shape[1:4]), tuple(shape[1:4])
    if None in target + grid:
        return 1  # spatial dims free: the grids are the same by construction
    factors = tuple(g // max(t, 1) for g, t in zip(grid, target))
    if min(factors) < 1 or any(g != t * f for g, t, f in zip(grid, target, factors)):
        raise ValueError(f"Cannot fuse a {grid} grid into a {target} grid: it must be an integer multiple per axis.")
    return factors[0] if len(set(factors)) == 1 else factors
