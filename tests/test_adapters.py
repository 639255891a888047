"""AdaptableConv3D: equal to Conv3D without an adapter; adapters survive saving."""

import keras
import numpy as np

from unicon_tf.model import AdaptableConv3D, adapter_scope


def test_without_adapter_equals_conv3d():
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 8, 3)).astype("float32")
    plain = keras.layers.Conv3D(4, 3, padding="same")
    expected = np.asarray(plain(x))
    conv = AdaptableConv3D.from_conv3d(plain)
    conv.build(x.shape)
    conv.set_weights(plain.get_weights())
    conv.add_adapter("seg", rank=2)
    np.testing.assert_array_equal(np.asarray(conv(x)), expected)
    with adapter_scope("other"):  # an adapter this layer does not hold: base kernel
        np.testing.assert_array_equal(np.asarray(conv(x)), expected)
    with adapter_scope("seg"):  # B = 0: the update is exactly zero
        np.testing.assert_array_equal(np.asarray(conv(x)), expected)


def test_adapter_update_is_low_rank_and_scaled():
    conv = AdaptableConv3D(5, 3, padding="same")
    conv.build((1, 8, 8, 8, 3))
    conv.add_adapter("a", rank=2, alpha=4.0)
    down, up = conv.adapter_weights("a")
    assert tuple(down.shape) == (3, 3, 3, 3, 2) and tuple(up.shape) == (2, 5)
    up.assign(np.ones((2, 5), "float32"))
    with adapter_scope("a"):
        delta = np.asarray(conv.kernel) - conv._kernel.numpy()
    expected = 2.0 * (down.numpy().reshape(-1, 2) @ np.ones((2, 5))).reshape(3, 3, 3, 3, 5)
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.matrix_rank(delta.reshape(-1, 5)) <= 2


def test_adapters_round_trip_through_keras_file(tmp_path):
    x = np.random.default_rng(2).normal(size=(1, 8, 8, 8, 2)).astype("float32")
    inputs = keras.Input((8, 8, 8, 2))
    conv = AdaptableConv3D(3, 3, padding="same", name="conv")
    model = keras.Model(inputs, conv(inputs))
    conv.add_adapter("p", rank=1)
    conv.adapter_weights("p")[1].assign(np.full((1, 3), 0.5, "float32"))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras").get_layer("conv")
    assert loaded.adapters == {"p": {"rank": 1, "alpha": 1.0}}
    for original, restored in zip(conv.weights, loaded.weights):
        np.testing.assert_array_equal(original.numpy(), restored.numpy())
    with adapter_scope("p"):
        np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(conv(x)))
