"""`unicon_tf.model.GroupNormalization` computes what `keras.layers.GroupNormalization` does."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from unicon_tf.model.group_norm import GroupNormalization


def _pair(groups, shape, dtype="float32"):
    fast = GroupNormalization(groups=groups, dtype=dtype)
    reference = keras.layers.GroupNormalization(groups=groups, dtype=dtype)
    fast.build(shape)
    reference.build(shape)
    rng = np.random.default_rng(1)
    weights = [rng.normal(1.0, 0.5, shape[-1:]).astype("float32"), rng.normal(0.0, 0.5, shape[-1:]).astype("float32")]
    fast.set_weights(weights)
    reference.set_weights(weights)
    return fast, reference


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("groups, shape", [(8, (2, 6, 5, 4, 16)), (1, (1, 4, 4, 4, 8)), (4, (3, 7, 12)),
                                           (16, (2, 3, 3, 3, 16))])
def test_outputs_and_gradients_match_keras(groups, shape, graph):
    """Outputs and the hand-written gradients (input, gamma, beta) against Keras' layer and
    automatic differentiation, eagerly and traced as in a training step."""
    x = tf.constant(np.random.default_rng(0).normal(3.0, 2.0, shape).astype("float32"))
    fast, reference = _pair(groups, shape)
    results = []
    for layer in (fast, reference):
        def step(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                ramp = tf.reshape(tf.range(tf.size(y), dtype=y.dtype), tf.shape(y)) / tf.cast(tf.size(y), y.dtype)
                loss = tf.reduce_sum(tf.square(y) * ramp)  # every output weighted differently: no zero gradient
            return (y, *tape.gradient(loss, [x, *layer.trainable_variables]))

        results.append((tf.function(step) if graph else step)(x))
    for mine, theirs in zip(*results):
        assert float(tf.reduce_max(tf.abs(theirs))) > 1e-3
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_mixed_bfloat16_keeps_float32_statistics():
    shape = (2, 4, 4, 4, 8)
    x = np.random.default_rng(0).normal(100.0, 1.0, shape).astype("float32")  # large mean: bfloat16 moments would fail
    fast, reference = _pair(4, shape, dtype="mixed_bfloat16")
    y = fast(x)
    assert y.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(reference(x), tf.float32), atol=0.05)
