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

Statistics are float32 under every dtype policy (as Keras': bfloat16 and float16 overflow),
the output is in the layer's compute dtype. Same weights, same configuration and same
outputs (to float32 round-off) as `keras.layers.GroupNormalization`. Group
normalisation: Wu & He 2018, "Group Normalization", arXiv 1803.08494.
"""

import keras
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
        groups, per_group = self.groups, channels // self.groups
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        flat = ops.reshape(x, (ops.shape(x)[0], -1, channels))  # (B, S, C)

        def group_mean(per_channel):  # (B, C) -> (B, 1, C): each channel gets its group's mean
            grouped = ops.mean(ops.reshape(per_channel, (-1, groups, per_group)), axis=-1, keepdims=True)
            return ops.reshape(ops.broadcast_to(grouped, (ops.shape(grouped)[0], groups, per_group)), (-1, 1, channels))

        centred = flat - group_mean(ops.mean(flat, axis=1))
        scale = ops.rsqrt(group_mean(ops.mean(ops.square(centred), axis=1)) + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, scale.dtype)
        outputs = centred * scale
        if self.center:
            outputs = outputs + ops.cast(self.beta, outputs.dtype)
        return ops.cast(ops.reshape(outputs, ops.shape(inputs)), self.compute_dtype)
