"""FusedAdamW: Keras's AdamW, one fused kernel per variable update."""

import keras
import numpy as np
import pytest

from unicon_tf.train.optimizers import FusedAdamW


def run(optimizer, steps=25):
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=shape).astype(np.float32)) for shape in ((3, 3, 3, 2, 4), (4,), (7, 2))]
    for _ in range(steps):
        optimizer.apply([rng.normal(size=v.shape).astype(np.float32) for v in variables], variables)
    return [v.numpy() for v in variables], optimizer


@pytest.mark.parametrize("options", [dict(learning_rate=3e-3, weight_decay=0.01),
                                     dict(learning_rate=1e-2, weight_decay=0.0, beta_1=0.8, epsilon=1e-5)])
def test_fused_adamw_updates_as_keras_adamw(options):
    fused, optimizer = run(FusedAdamW(**options))
    reference, _ = run(keras.optimizers.AdamW(**options))
    start, _ = run(keras.optimizers.AdamW(**options), steps=0)
    for a, b, w0 in zip(fused, reference, start):
        assert np.max(np.abs(a - w0)) > 1e-2  # the weights moved
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
    assert int(optimizer.iterations.numpy()) == 25


def test_fused_adamw_saves_as_keras_adamw():
    _, optimizer = run(FusedAdamW(learning_rate=3e-3, weight_decay=0.01), steps=3)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is FusedAdamW and restored.get_config() == optimizer.get_config()
    assert optimizer.get_config() == {**keras.optimizers.AdamW(learning_rate=3e-3, weight_decay=0.01).get_config(),
                                      "name": optimizer.name}
