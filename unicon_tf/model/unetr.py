"""UNETR: a segmentation decoder over a ViT's hidden states at several depths.

UNETR (Hatamizadeh et al. 2022, arXiv 2103.10504; MONAI `monai.networks.nets.UNETR`)
turns transformer states, all on the coarse token grid, into a U-Net's skips: a state
from a shallow block is upsampled by transposed convolutions to a fine scale, a deeper
one to a coarser scale, and the raw volume gives the full-resolution skip. With patch
size p = 2**L per axis (MONAI: 16, L = 4):

    scale 0 (D):        enc0 = ResBlock(volume)                                (encoder1)
    scale s (D / 2**s): enc_s = up^(L-s)(hidden state), s = 1 .. L-1           (encoder2..4)
    scale L (D / p):    x = final normalised state
    for s = L-1 .. 0:   x = ResBlock(concat(up(x), enc_s))                     (decoder5..2)
    logits = Conv 1x1(x)

ResBlock is MONAI's `UnetResBlock` (two 3^3 convolutions with instance norm and leaky
ReLU, a 1x1 projection when channels change). Scale s has `feature_size * 2**s` channels.

A head reading several modalities (the paper's CT+PET segmentation) also reads each
further modality's volume through its own skip encoder, whose output is added to the
first modality's full-resolution skip (UNICON's PET skip encoder). Its last convolution
starts at zero, so the skip path starts as the first modality's alone.
"""

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from unicon_tf.model.blocks import ResidualConvBlock
from unicon_tf.model.heads import Head

if TYPE_CHECKING:
    import tensorflow as tf


@keras.saving.register_keras_serializable(package="unicon_tf")
class UNETRHead(Head):
    """UNETR decoder: voxel logits from a ViT's hidden states and the input volumes.

    Called on `features + volumes`: the encoder's outputs (intermediate hidden states,
    then the final normalised state, all `(batch, D/p, H/p, W/p, hidden)`) followed by
    the raw volume of each modality the head reads, `(batch, D, H, W, 1)`, in
    `modalities` order. The patch size p (a power of two per axis) is the ratio of the
    two grids. When the encoder exposes fewer or more intermediate states than the L - 1
    skips need, they are spread evenly (shallow states to fine scales).

    Args:
        num_classes: classes including background, >= 2.
        feature_size: channels of the full-resolution scale (doubled per scale); MONAI's
            `feature_size`.
        modality_skips: give each further modality a zero-initialised skip encoder added
            to the first modality's full-resolution skip.
        **kwargs: see `Head`.

    Raises:
        ValueError: grids that differ by a non-power of two, or no hidden state for a skip.

    Example:
    >>> head = UNETRHead(num_classes=2, feature_size=8, modalities=["ct"])
    >>> states = [keras.ops.zeros((1, 4, 4, 4, 24)), keras.ops.zeros((1, 4, 4, 4, 24))]
    >>> tuple(head(states + [keras.ops.zeros((1, 16, 16, 16, 1))]).shape)
    (1, 16, 16, 16, 2)
    """

    task = "segmentation"
    reads_volumes = True

    def __init__(self, num_classes: int = 2, feature_size: int = 16, modality_skips: bool = True,
                 **kwargs: Any) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 for a {self.task} head, got {num_classes}.")
        if int(feature_size) < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}.")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.feature_size = int(feature_size)
        self.modality_skips = bool(modality_skips)

    def encoder_features(self, inputs: Sequence["tf.Tensor"]) -> list["tf.Tensor"]:
        return list(inputs)[: -len(self.modalities)]

    def _plan(self, shapes):
        """(upsampling factor per step s -> s-1 ..., indices of the states for scales 1..L-1)."""
        features, volumes = shapes[: -len(self.modalities)], shapes[-len(self.modalities):]
        tokens, volume = tuple(features[-1][1:4]), tuple(volumes[0][1:4])
        patch = []
        for v, t in zip(volume, tokens):
            ratio = v // t if t else 0
            if not t or v != ratio * t or ratio & (ratio - 1):
                raise ValueError(f"UNETR needs the volume grid {volume} to be the token grid {tokens} times a "
                                 "power of two per axis (the patch size).")
            patch.append(int(math.log2(ratio)))
        levels = max(patch)
        factors = [tuple(2 if step < p else 1 for p in patch) for step in range(levels)]
        available = len(features) - 1
        if levels > 1 and available < 1:
            raise ValueError(f"UNETR over patch size {[2**p for p in patch]} needs intermediate hidden states "
                             "(the encoder's feature_layers), but the encoder outputs only the final state.")
        states = [min(available - 1, k * available // (levels - 1)) for k in range(levels - 1)]
        return factors, states

    def build(self, input_shapes: Sequence[tuple[int | None, ...]]) -> None:
        shapes = [tuple(s) for s in input_shapes]
        factors, _ = self._plan(shapes)
        levels = len(factors)
        hidden = shapes[-len(self.modalities) - 1][-1]
        volume = shapes[-len(self.modalities)]
        fs = self.feature_size

        def scaled(s, channels):  # shape at scale s (volume grid divided by the factors below s)
            spatial = list(volume[1:4])
            for step in range(s):
                spatial = [d // f for d, f in zip(spatial, factors[step])]
            return (volume[0], *spatial, channels)

        self.skip_encoder = ResidualConvBlock(fs, name="encoder0")
        self.skip_encoder.build(volume)
        self.modality_encoders, self.modality_projections = [], []
        if self.modality_skips:
            for index, modality in enumerate(self.modalities[1:], start=1):
                encoder = ResidualConvBlock(fs, name=f"encoder0_{modality}")
                encoder.build(shapes[-len(self.modalities) + index])
                projection = keras.layers.Conv3D(fs, 1, kernel_initializer="zeros", name=f"skip_{modality}")
                projection.build(scaled(0, fs))
                self.modality_encoders.append(encoder)
                self.modality_projections.append(projection)
        # Skips at scales 1..L-1 from hidden states: transposed convs up to the scale.
        self.skip_ups = []
        for s in range(1, levels):
            channels = fs * 2**s
            ups, shape = [], scaled(levels, hidden)
            for step in range(levels - 1, s - 1, -1):
                conv = keras.layers.Conv3DTranspose(channels, factors[step], strides=factors[step],
                                                    use_bias=False, name=f"encoder{s}_up{step}")
                conv.build(shape)
                shape = scaled(step, channels)
                block = None
                if step != levels - 1:  # MONAI: transp_conv_init, then (transp conv + res block)s
                    block = ResidualConvBlock(channels, name=f"encoder{s}_block{step}")
                    block.build(shape)
                ups.append((conv, block))
            self.skip_ups.append(ups)
        # Decoder: from the token grid down to full resolution.
        self.decoder_ups, self.decoder_blocks = [], []
        shape = scaled(levels, hidden)
        for s in range(levels - 1, -1, -1):
            channels = fs * 2**s
            up = keras.layers.Conv3DTranspose(channels, factors[s], strides=factors[s], use_bias=False,
                                              name=f"decoder{s}_up")
            up.build(shape)
            block = ResidualConvBlock(channels, name=f"decoder{s}_block")
            block.build(scaled(s, 2 * channels))
            self.decoder_ups.append(up)
            self.decoder_blocks.append(block)
            shape = scaled(s, channels)
        self.logits = keras.layers.Conv3D(self.num_classes, 1, name="logits")
        self.logits.build(shape)

    def call(self, inputs: Sequence["tf.Tensor"]) -> "tf.Tensor":
        inputs = list(inputs)
        features, volumes = inputs[: -len(self.modalities)], inputs[-len(self.modalities):]
        _, states = self._plan([tuple(t.shape) for t in inputs])
        skips = [self.skip_encoder(volumes[0])]
        for volume, encoder, projection in zip(volumes[1:], self.modality_encoders, self.modality_projections):
            skips[0] = skips[0] + projection(encoder(volume))
        for ups, state in zip(self.skip_ups, states):
            x = features[state]
            for conv, block in ups:
                x = conv(x)
                if block is not None:
                    x = block(x)
            skips.append(x)
        x = features[-1]
        for up, block, skip in zip(self.decoder_ups, self.decoder_blocks, reversed(skips)):
            x = block(ops.concatenate([up(x), skip], axis=-1))
        return self.logits(x)

    def compute_output_shape(self, input_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        volume = tuple(input_shapes[-len(self.modalities)])
        return volume[:-1] + (self.num_classes,)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_classes": self.num_classes, "decoder": "unetr"}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(num_classes=self.num_classes, feature_size=self.feature_size,
                      modality_skips=self.modality_skips)
        return config
