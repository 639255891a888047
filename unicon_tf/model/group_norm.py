"""GroupNormalization computed from per-channel moments: the same function as
`keras.layers.GroupNormalization`, several times faster on CPU for 3D feature maps.

Keras reshapes a `(B, D, H, W, C)` map to `(B, D, H, W, G, C/G)` and takes moments over the
axes (1, 2, 3, 5): a strided reduction that TensorFlow's CPU kernels run slowly (at 64^3 x
16 channels it took most of the residual CNN's normalisation time). Here the map is viewed
as `(B, D*H*W, C)`, reduced over its contiguous spatial axis to per-channel means, which
are averaged per group; the variance is the mean square of the centred map (two passes,
as Keras, so no cancellation from E[x^2] - E[x]^2):

    mu_bg  = mean_{s, c in g} x_bsc
    var_bg = mean_{s, c in g} (x_bsc - mu_bg)^2
    y_bsc  = (x_bsc - mu_bg) * gamma_c / sqrt(var_bg + epsilon) + beta_c

The backward pass is written by hand (`_group_norm`): per channel, the sums of `dy` and
`dy * x`, then `dx = dy * scale + x * a + b`, a few passes over the map where automatic
differentiation of the forward pass takes about twice as many (GroupNorm + SiLU forward and
backward at 96^3 x 16 channels: 0.29 s against 0.37 s, one Conv3D 3^3 taking 0.7 s).
Statistics are float32 under every dtype policy (as Keras': bfloat16 and float16 overflow),
the output is in the layer's compute dtype. Same weights, same configuration and same
outputs (to float32 round-off) as `keras.layers.GroupNormalization`. Group
normalisation: Wu & He 2018, "Group Normalization", arXiv 1803.08494.
"""

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="unicon_tf")
class GroupNormalization(keras.layers.GroupNormalization):
    """`keras.layers.GroupNormalization` over the last axis, computed from per-channel moments.

    Args:
        **kwargs: any `keras.layers.GroupNormalization` argument; with `axis` other than the
            last one it computes as Keras does.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (2, 8, 8, 8, 16)).astype("float32")
    >>> fast, reference = GroupNormalization(groups=8), keras.layers.GroupNormalization(groups=8)
    >>> y = fast(x)
    >>> reference.build(x.shape)
    >>> reference.set_weights(fast.get_weights())
    >>> bool(np.allclose(y, reference(x), atol=1e-5))
    True
    """

    def call(self, inputs):
        if self.axis not in (-1, len(inputs.shape) - 1):
            return super().call(inputs)
        channels = inputs.shape[-1]
        gamma = ops.convert_to_tensor(self.gamma) if self.scale else ops.ones((channels,), "float32")
        beta = ops.convert_to_tensor(self.beta) if self.center else ops.zeros((channels,), "float32")
        outputs = _group_norm(inputs, ops.cast(gamma, "float32"), ops.cast(beta, "float32"), self.groups,
                              self.epsilon)
        return ops.cast(outputs, self.compute_dtype)


def _group_sum(per_channel, groups):
    """`(B, C) -> (B, 1, C)`: each channel gets the sum over its group's channels."""
    channels = per_channel.shape[-1]
    grouped = tf.reduce_sum(tf.reshape(per_channel, (-1, groups, channels // groups)), axis=-1, keepdims=True)
    return tf.reshape(tf.broadcast_to(grouped, (tf.shape(grouped)[0], groups, channels // groups)), (-1, 1, channels))


@tf.custom_gradient
def _group_norm_flat(x, gamma, beta, groups, epsilon):
    """GroupNorm of `x` `(B, S, C)` float32; returns `(y, gradient)` (see `_group_norm`)."""
    count = tf.cast(tf.shape(x)[1] * (x.shape[-1] // groups), x.dtype)  # elements per group
    mean = _group_sum(tf.reduce_sum(x, axis=1), groups) / count
    centred = x - mean
    rstd = tf.math.rsqrt(_group_sum(tf.reduce_sum(tf.square(centred), axis=1), groups) / count + epsilon)
    scale = rstd * gamma  # (B, 1, C)
    y = x * scale + (beta - mean * scale)

    def gradient(dy):
        dy = tf.cast(dy, x.dtype)
        sum_dy = tf.reduce_sum(dy, axis=1, keepdims=True)  # (B, 1, C)
        sum_dy_xhat = (tf.reduce_sum(dy * x, axis=1, keepdims=True) - mean * sum_dy) * rstd
        d_gamma = tf.reduce_sum(sum_dy_xhat, axis=(0, 1))
        d_beta = tf.reduce_sum(sum_dy, axis=(0, 1))
        # dx = rstd (gamma dy - mean_g(gamma dy) - xhat mean_g(gamma dy xhat)), xhat = (x - mean) rstd
        mean_dxhat = _group_sum((gamma * sum_dy)[:, 0], groups) / count
        mean_dxhat_xhat = _group_sum((gamma * sum_dy_xhat)[:, 0], groups) / count
        x_coefficient = -rstd * rstd * mean_dxhat_xhat
        dx = dy * scale + (x * x_coefficient - (rstd * mean_dxhat + mean * x_coefficient))
        return dx, d_gamma, d_beta, None, None

    return y, gradient


def _group_norm(inputs, gamma, beta, groups, epsilon):
    """GroupNorm over the last axis in float32, with a hand-written gradient.

    The forward pass computes `y = x * scale + shift` with per-channel `scale = gamma * rstd`
    and `shift = beta - mean * scale`; the backward pass keeps only `x` and the per-group
    statistics and computes, per channel, the sums of `dy` and `dy * x`, then
    `dx = dy * scale + x * a + b` (a, b per channel): a few passes over the map where
    automatic differentiation of the forward pass takes about twice as many.
    """
    x = tf.cast(inputs, "float32")
    flat = tf.reshape(x, (tf.shape(x)[0], -1, x.shape[-1]))
    return tf.reshape(_group_norm_flat(flat, gamma, beta, groups, epsilon), tf.shape(inputs))
