"""The stages' optimizer: AdamW whose per-variable update is TensorFlow's fused Adam kernel.

Keras 3's `AdamW` on the TensorFlow backend builds each variable's Adam update from about
twenty small ops (casts, two powers, moment updates, the step), so a step of the residual
CNN (46 variables) runs some 900 optimizer ops, about a tenth of a 32^3 training step on a
2-core CPU. `FusedAdamW` updates each variable with one `ResourceApplyAdam` (the kernel
`tf.keras` 2 used) after its two bias-correction powers: the same function,

    m <- m + (g - m)(1 - beta_1),   v <- v + (g^2 - v)(1 - beta_2),
    w <- w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon),

after Keras's decoupled weight decay (w <- w - lr * weight_decay * w; Loshchilov & Hutter
2019, "Decoupled Weight Decay Regularization", arXiv 1711.05101; Adam: Kingma & Ba 2015,
arXiv 1412.6980). Same variables, configuration and checkpoints as `keras.optimizers.AdamW`,
same updates to float32 round-off; `amsgrad=True` and backends other than TensorFlow take
Keras's own update. Works under `tf.distribute` strategies and inside
`keras.optimizers.LossScaleOptimizer`.
"""

from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="unicon_tf")
class FusedAdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with one fused kernel per variable update (see the module).

    Args:
        **kwargs: any `keras.optimizers.AdamW` argument (learning_rate, weight_decay, beta_1,
            beta_2, epsilon, amsgrad, clipnorm, ...).

    Example:
    >>> import numpy as np
    >>> fused, reference = FusedAdamW(1e-2, weight_decay=0.1), keras.optimizers.AdamW(1e-2, weight_decay=0.1)
    >>> a, b = keras.Variable(np.ones(3, np.float32)), keras.Variable(np.ones(3, np.float32))
    >>> for _ in range(3):
    ...     fused.apply([np.array([0.5, -1.0, 2.0], np.float32)], [a])
    ...     reference.apply([np.array([0.5, -1.0, 2.0], np.float32)], [b])
    >>> bool(np.allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6))
    True
    """

    def update_step(self, gradient: tf.Tensor, variable: tf.Variable, learning_rate: Any) -> None:
        if self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype

        def cast(value):
            return tf.cast(value, dtype)

        step = cast(self.iterations + 1)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(cast(self.beta_1), step), beta2_power=tf.pow(cast(self.beta_2), step), lr=cast(learning_rate),
            beta1=cast(self.beta_1), beta2=cast(self.beta_2), epsilon=cast(self.epsilon), grad=cast(gradient))


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (in a strategy's update, the
    current replica's component)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle
