"""Convolution blocks shared by heads: MONAI's residual block (UNETR's decoder, the side encoder).

Example:
>>> block = ResidualConvBlock(8)
>>> tuple(block(keras.ops.zeros((1, 4, 4, 4, 2))).shape)
(1, 4, 4, 4, 8)
"""

from typing import TYPE_CHECKING, Any

import keras
from keras import ops

if TYPE_CHECKING:
    import tensorflow as tf


@keras.saving.register_keras_serializable(package="unicon_tf")
class ResidualConvBlock(keras.layers.Layer):
    """MONAI's `UnetResBlock`: conv-IN-lrelu-conv-IN (+ 1x1 conv-IN shortcut), lrelu.

    Args:
        channels: output channels.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.conv1 = keras.layers.Conv3D(self.channels, 3, padding="same", use_bias=False, name="conv1")
        self.norm1 = keras.layers.GroupNormalization(groups=-1, name="norm1")
        self.conv2 = keras.layers.Conv3D(self.channels, 3, padding="same", use_bias=False, name="conv2")
        self.norm2 = keras.layers.GroupNormalization(groups=-1, name="norm2")
        self.shortcut = self.shortcut_norm = None

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        out_shape = tuple(input_shape[:-1]) + (self.channels,)
        self.conv1.build(input_shape)
        self.norm1.build(out_shape)
        self.conv2.build(out_shape)
        self.norm2.build(out_shape)
        if input_shape[-1] != self.channels:
            self.shortcut = keras.layers.Conv3D(self.channels, 1, use_bias=False, name="shortcut")
            self.shortcut_norm = keras.layers.GroupNormalization(groups=-1, name="shortcut_norm")
            self.shortcut.build(input_shape)
            self.shortcut_norm.build(out_shape)

    def call(self, x: "tf.Tensor") -> "tf.Tensor":
        y = ops.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        y = self.norm2(self.conv2(y))
        if self.shortcut is not None:
            x = self.shortcut_norm(self.shortcut(x))
        return ops.leaky_relu(y + x, 0.01)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape[:-1]) + (self.channels,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(channels=self.channels)
        return config
