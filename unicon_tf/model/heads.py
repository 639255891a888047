"""Task heads: named, self-describing output blocks that read the encoder's features.

Each head records the task it solves, the modalities its path reads, the stage that
added it and the rank of its encoder adapter (if any) in its config, so a saved model
describes itself (see `unicon_tf.describe`). Every head takes the encoder's list of
feature maps, finest first. Which head a task uses on which encoder is its task kind's
(`unicon_tf.tasks`).

| task             | head                 | output                                   |
|------------------|----------------------|------------------------------------------|
| `classification` | `ClassificationHead` | class logits `(batch, num_classes)`      |
| `prognosis`      | `PrognosisHead`      | risk score (Cox log-hazard) `(batch,)`   |
| `segmentation`   | `SegmentationHead`   | voxel logits `(batch, D, H, W, classes)` |
"""

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from unicon_tf.model.blocks import ResidualConvBlock
from unicon_tf.model.encoder import group_norm
from unicon_tf.options import POOLINGS, default_head_name, default_modalities  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import tensorflow as tf


class Head(keras.layers.Layer):
    """Base of all heads: the registry entry every head carries.

    Args:
        modalities: the modalities the head's input path reads, e.g. `["ct", "pet"]`.
        stage: the continual-learning stage that added the head.
        adapter_rank: rank of the encoder adapter on this head's path (named after the
            head), or None when the head reads the base encoder.
        adapter_start: the first encoder level its path computes itself (levels below are
            shared with the base path; see `expand`).
        adapter_levels: the encoder levels whose layers carry the path's adapters and norm
            copies (None: every level from `adapter_start`).
        adapter_shortcuts: whether the 1x1x1 shortcut convolutions carry adapters too.
        path_norm: whether the path has its own copy of the encoder's GroupNorm scale and
            shift (see `unicon_tf.model.adapters.PathGroupNormalization`).
        **kwargs: `keras.layers.Layer` arguments; `name` is the head's (and output's) name.
    """

    task = None
    reads_volumes = False  # True: called on encoder features + the raw volume of each modality

    def __init__(self, modalities: Sequence[str] = ("ct",), stage: int = 0, adapter_rank: int | None = None,
                 adapter_start: int = 0, adapter_levels: Sequence[int] | None = None, adapter_shortcuts: bool = True,
                 path_norm: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("name", self.task)
        super().__init__(**kwargs)
        self.modalities = list(modalities)
        self.stage = int(stage)
        self.adapter_rank = None if adapter_rank is None else int(adapter_rank)
        self.adapter_start = int(adapter_start or 0)
        self.adapter_levels = None if adapter_levels is None else sorted(int(level) for level in adapter_levels)
        self.adapter_shortcuts = bool(adapter_shortcuts)
        self.path_norm = bool(path_norm)

    @property
    def adapter(self) -> str | None:
        """Name of this head's own encoder parameters (its adapters and norm copies, named
        after the head), or None when its path reads the shared encoder only."""
        return self.name if self.adapter_rank or self.path_norm else None

    @property
    def output_layer(self) -> keras.layers.Layer:
        """The layer that computes the head's output (logits or risk): its `logits` layer, else
        its `dense` one. Mixed precision keeps it in float32 (`unicon_tf.train.precision`)."""
        return self.logits if hasattr(self, "logits") else self.dense

    def encoder_features(self, inputs: Sequence["tf.Tensor"]) -> Sequence["tf.Tensor"]:
        """The encoder's feature maps among the head's inputs (all of them unless it reads volumes)."""
        return inputs

    def used_features(self, features: Sequence["tf.Tensor"]) -> list["tf.Tensor"]:
        """The feature maps this head reads (all levels unless a subclass needs fewer)."""
        return list(features)

    @classmethod
    def options(cls) -> list[str]:
        """The task-specific constructor options (what `expand(**head_options)` accepts)."""
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]

    def describe(self) -> dict[str, Any]:
        """This head's registry entry as a plain dict."""
        return {
            "task": self.task,
            "modalities": list(self.modalities),
            "stage": self.stage,
            "adapter": None if self.adapter is None else {"name": self.adapter, "rank": self.adapter_rank},
            "adapter_start": self.adapter_start,
            "adapter_levels": self.adapter_levels,
            "adapter_shortcuts": self.adapter_shortcuts,
            "path_norm": self.path_norm,
            "params": self.count_params(),
        }

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(modalities=self.modalities, stage=self.stage, adapter_rank=self.adapter_rank,
                      adapter_start=self.adapter_start)
        # Written only when set, so configs of models saved before these options stay the same.
        if self.adapter_levels is not None:
            config["adapter_levels"] = self.adapter_levels
        if not self.adapter_shortcuts:
            config["adapter_shortcuts"] = False
        if self.path_norm:
            config["path_norm"] = True
        return config


class PooledHead(Head):
    """Normalise the coarsest feature map, pool it globally and apply a dense layer.

    `pooling="avgmax"` concatenates global average and global max pooling: the max keeps a
    small lesion's signal that averaging over the whole volume would dilute.
    """

    def __init__(self, units: int, dropout: float = 0.0, pooling: str = "avgmax", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got '{pooling}'.")
        self.units = int(units)
        self.dropout = float(dropout)
        self.pooling = pooling
        self.drop = keras.layers.Dropout(self.dropout, name="dropout")
        self.dense = keras.layers.Dense(self.units, name="dense")

    def build(self, feature_shapes: Sequence[tuple[int | None, ...]]) -> None:
        coarsest = feature_shapes[-1]
        self.norm = group_norm(coarsest[-1], name="norm")
        self.norm.build(coarsest)
        self.dense.build((coarsest[0], coarsest[-1] * (2 if self.pooling == "avgmax" else 1)))

    def used_features(self, features: Sequence["tf.Tensor"]) -> list["tf.Tensor"]:
        return list(features)[-1:]  # only the coarsest map

    def pooled(self, features: Sequence["tf.Tensor"], training: bool | None = None) -> "tf.Tensor":
        x = ops.silu(self.norm(features[-1]))
        pooled = []
        if self.pooling in ("avg", "avgmax"):
            pooled.append(ops.mean(x, axis=(1, 2, 3)))
        if self.pooling in ("max", "avgmax"):
            pooled.append(ops.max(x, axis=(1, 2, 3)))
        return self.dense(self.drop(ops.concatenate(pooled, axis=-1), training=training))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(dropout=self.dropout, pooling=self.pooling)
        return config


@keras.saving.register_keras_serializable(package="unicon_tf")
class ClassificationHead(PooledHead):
    """Patient-level classification: class logits from the coarsest features.

    Args:
        num_classes: number of classes, >= 2.
        dropout: dropout rate before the dense layer.
        pooling: `avg`, `max` or `avgmax` (both, concatenated).
        **kwargs: see `Head`.

    Example:
    >>> head = ClassificationHead(num_classes=3)
    >>> tuple(head([keras.ops.zeros((2, 4, 4, 4, 16))]).shape)
    (2, 3)
    """

    task = "classification"

    def __init__(self, num_classes: int = 2, dropout: float = 0.0, pooling: str = "avgmax", **kwargs: Any) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 for a {self.task} head, got {num_classes}.")
        super().__init__(units=num_classes, dropout=dropout, pooling=pooling, **kwargs)
        self.num_classes = int(num_classes)

    def call(self, features: Sequence["tf.Tensor"], training: bool | None = None) -> "tf.Tensor":
        return self.pooled(features, training=training)

    def compute_output_shape(self, feature_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        return (feature_shapes[-1][0], self.num_classes)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_classes": self.num_classes}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(num_classes=self.num_classes)
        return config


class ScalarHead(PooledHead):
    """One value per patient `(batch,)` from the coarsest features (a risk, a volume, ...).

    Args:
        dropout: dropout rate before the dense layer.
        pooling: `avg`, `max` or `avgmax` (both, concatenated).
        **kwargs: see `Head`.
    """

    def __init__(self, dropout: float = 0.0, pooling: str = "avgmax", **kwargs: Any) -> None:
        super().__init__(units=1, dropout=dropout, pooling=pooling, **kwargs)

    def call(self, features: Sequence["tf.Tensor"], training: bool | None = None) -> "tf.Tensor":
        return ops.squeeze(self.pooled(features, training=training), axis=-1)

    def compute_output_shape(self, feature_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        return (feature_shapes[-1][0],)


@keras.saving.register_keras_serializable(package="unicon_tf")
class PrognosisHead(ScalarHead):
    """Survival prognosis: one risk score (log relative hazard, for a Cox loss) per patient.

    Args: see `ScalarHead`.

    Example:
    >>> head = PrognosisHead()
    >>> tuple(head([keras.ops.zeros((2, 4, 4, 4, 16))]).shape)
    (2,)
    """

    task = "prognosis"


@keras.saving.register_keras_serializable(package="unicon_tf")
class SegmentationHead(Head):
    """UNet-style decoder over the encoder's skips: voxel logits at input resolution.

    From the coarsest map upwards, each level upsamples, concatenates the skip at that
    scale and applies Conv3D-GroupNorm-swish blocks with the skip's channel count.

    With `side_encoder=w` the head also reads its modalities' raw volumes through a small
    encoder of its own (one `ResidualConvBlock` per level, `w * 2**level` channels, a
    stride-2 convolution between levels), whose level-l features enter the encoder's
    level-l skip through a zero-initialised 1x1x1 projection: the head starts from the
    frozen encoder's features exactly and learns what to add (UNICON's PET skip encoder,
    arXiv 2508.14024, here at every level, for any modality). Called then on
    `features + volumes` (`reads_volumes`).

    Args:
        num_classes: number of classes including background, >= 2.
        blocks_per_level: Conv3D-GroupNorm-swish blocks after each skip concatenation.
        final_upsampling: factor from the finest feature map to the input grid, one int or
            one per axis (1 for the built-in encoder, whose finest level is at input
            resolution; (2, 2, 1) for the I3ResNet's stem).
        side_encoder: channels w of the side encoder's first level; 0 for none.
        decoder_channels: most channels of a decoder level's convolutions (0: each level
            has its skip's channels, as for the built-in encoder). A wide pretrained encoder
            (the I3ResNet's 256 to 2048 channels) wants e.g. 64: its decoder then has a few
            million parameters instead of hundreds.
        **kwargs: see `Head`.

    Example:
    >>> head = SegmentationHead(num_classes=3)
    >>> features = [keras.ops.zeros((1, 16, 16, 16, 8)), keras.ops.zeros((1, 8, 8, 8, 16))]
    >>> tuple(head(features).shape)
    (1, 16, 16, 16, 3)
    >>> side = SegmentationHead(num_classes=2, side_encoder=4, modalities=["ct"])
    >>> tuple(side(features + [keras.ops.zeros((1, 16, 16, 16, 1))]).shape)
    (1, 16, 16, 16, 2)
    """

    task = "segmentation"

    def __init__(self, num_classes: int = 2, blocks_per_level: int = 2, final_upsampling: int = 1,
                 side_encoder: int = 0, decoder_channels: int = 0, **kwargs: Any) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 for a {self.task} head, got {num_classes}.")
        if int(blocks_per_level) < 1:
            raise ValueError(f"blocks_per_level must be >= 1, got {blocks_per_level}.")
        if isinstance(side_encoder, bool) or int(side_encoder) < 0:
            raise ValueError(f"side_encoder must be a channel count >= 0 (0: none), got {side_encoder!r}.")
        if isinstance(decoder_channels, bool) or int(decoder_channels) < 0:
            raise ValueError(f"decoder_channels must be a channel count >= 0 (0: the skips'), got {decoder_channels!r}.")
        super().__init__(**kwargs)
        self.decoder_channels = int(decoder_channels)
        self.num_classes = int(num_classes)
        self.blocks_per_level = int(blocks_per_level)
        self.final_upsampling = (int(final_upsampling) if isinstance(final_upsampling, (int, float))
                                 else [int(f) for f in final_upsampling])
        self.side_encoder = int(side_encoder)
        self.reads_volumes = self.side_encoder > 0

    def encoder_features(self, inputs: Sequence["tf.Tensor"]) -> Sequence["tf.Tensor"]:
        return list(inputs)[: -len(self.modalities)] if self.reads_volumes else inputs

    def build(self, input_shapes: Sequence[tuple[int | None, ...]]) -> None:
        input_shapes = [tuple(s) for s in input_shapes]
        feature_shapes = self.encoder_features(input_shapes)
        if self.reads_volumes:
            self._build_side_encoder(feature_shapes, input_shapes[-len(self.modalities):])
        self.upsamplers, self.convs, self.norms = [], [], []
        x_shape = tuple(feature_shapes[-1])
        for index in range(len(feature_shapes) - 2, -1, -1):
            skip = tuple(feature_shapes[index])
            factor = tuple(s // c for s, c in zip(skip[1:4], x_shape[1:4]))
            self.upsamplers.append(keras.layers.UpSampling3D(factor, name=f"up{index}"))
            in_shape = skip[:-1] + (x_shape[-1] + skip[-1],)
            channels = min(skip[-1], self.decoder_channels) if self.decoder_channels else skip[-1]
            for block in range(self.blocks_per_level):
                conv = keras.layers.Conv3D(channels, 3, padding="same", name=f"dec{index}_conv{block}")
                norm = group_norm(channels, name=f"dec{index}_norm{block}")
                conv.build(in_shape)
                in_shape = skip[:-1] + (channels,)
                norm.build(in_shape)
                self.convs.append(conv)
                self.norms.append(norm)
            x_shape = in_shape
        self.upsample_final = keras.layers.UpSampling3D(_per_axis(self.final_upsampling), name="up_final")
        self.logits = keras.layers.Conv3D(self.num_classes, 1, name="logits")
        self.logits.build(x_shape)

    def _build_side_encoder(self, feature_shapes, volume_shapes):
        shape = tuple(volume_shapes[0][:-1]) + (sum(s[-1] for s in volume_shapes),)
        self.side_pooling = tuple(v // f for v, f in zip(shape[1:4], feature_shapes[0][1:4]))
        shape = tuple(feature_shapes[0][:-1]) + (shape[-1],)
        self.side_downs, self.side_blocks, self.side_projections = [], [], []
        for level, skip in enumerate(feature_shapes):
            channels = self.side_encoder * 2**level
            down = None
            if level > 0:
                factor = tuple(p // s for p, s in zip(shape[1:4], skip[1:4]))
                down = keras.layers.Conv3D(channels, 3, strides=factor, padding="same", name=f"side{level}_down")
                down.build(shape)
                shape = tuple(skip[:-1]) + (channels,)
            block = ResidualConvBlock(channels, name=f"side{level}_block")
            block.build(shape)
            shape = tuple(skip[:-1]) + (channels,)
            projection = keras.layers.Conv3D(skip[-1], 1, kernel_initializer="zeros", name=f"side{level}_projection")
            projection.build(shape)
            self.side_downs.append(down)
            self.side_blocks.append(block)
            self.side_projections.append(projection)

    def _with_side_features(self, features, volumes):
        """The encoder's feature maps plus the side encoder's projected features, level by level."""
        x = ops.concatenate(volumes, axis=-1) if len(volumes) > 1 else volumes[0]
        if max(self.side_pooling) > 1:
            x = ops.average_pool(x, self.side_pooling, self.side_pooling)
        out = []
        for feature, down, block, projection in zip(features, self.side_downs, self.side_blocks,
                                                     self.side_projections):
            x = block(x if down is None else down(x))
            out.append(feature + projection(x))
        return out

    def call(self, inputs: Sequence["tf.Tensor"]) -> "tf.Tensor":
        inputs = list(inputs)
        features = self.encoder_features(inputs)
        if self.reads_volumes:
            features = self._with_side_features(features, inputs[-len(self.modalities):])
        x = features[-1]
        blocks = zip(self.convs, self.norms)
        for upsample, skip in zip(self.upsamplers, reversed(features[:-1])):
            x = ops.concatenate([upsample(x), skip], axis=-1)
            for _ in range(self.blocks_per_level):
                conv, norm = next(blocks)
                x = ops.silu(norm(conv(x)))
        if max(_per_axis(self.final_upsampling)) > 1:
            x = self.upsample_final(x)
        return self.logits(x)

    def compute_output_shape(self, input_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        finest = input_shapes[0]
        spatial = tuple(None if d is None else d * f for d, f in zip(finest[1:4], _per_axis(self.final_upsampling)))
        return (finest[0],) + spatial + (self.num_classes,)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_classes": self.num_classes, "side_encoder": self.side_encoder}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            blocks_per_level=self.blocks_per_level,
            final_upsampling=self.final_upsampling,
        )
        if self.side_encoder:
            config["side_encoder"] = self.side_encoder
        if self.decoder_channels:
            config["decoder_channels"] = self.decoder_channels
        return config


def _per_axis(factor):
    """A factor as three ints (one int stands for all axes)."""
    return (factor,) * 3 if isinstance(factor, int) else tuple(factor)


