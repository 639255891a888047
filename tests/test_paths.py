"""A head's path split at its frozen prefix (`unicon_tf.model.paths`): the trainable rest run
on the cached frontier computes the network's output and gradients, on the residual CNN and
on the pretrained I3ResNet (a new modality fused at a deep level trains without
backpropagating through the frozen levels)."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import unicon_tf
from unicon_tf.model import model_parts
from unicon_tf.model.paths import head_path
from unicon_tf.train.strategies import configure_trainable

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ENCODERS = {
    "residual": ((16, 16, 16), {"width": 4, "depth": 3}, 2),
    "i3resnet": ((32, 32, 16), {"encoder": "i3resnet", "layers": (1, 2, 1, 1), "width": 4,
                                "weights": FIXTURES / "i3resnet_small.pt"}, 4),
}


def grown(family, adapters=None, side_encoder=4):
    """Stage 0 CT segmentation, then a CT+PET head from level `start` (frozen strategy,
    or the path's adapters), trainability set for stage 1."""
    shape, options, start = ENCODERS[family]
    keras.utils.set_random_seed(3)
    model = unicon_tf.foundation(shape, task="segmentation", num_classes=2, decoder_channels=8, **options)
    model = unicon_tf.expand(model, modality="pet", task="segmentation", num_classes=2, adapter_start=start,
                             adapters=adapters, side_encoder=side_encoder, decoder_channels=8)
    configure_trainable(model, 1, "adapters" if adapters else "frozen", pretrained=family == "i3resnet")
    return model, shape, start


def volumes(shape, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.uniform(0, 1, (2, *shape, 1)).astype("float32") for m in ("ct", "pet")}


@pytest.mark.parametrize("family", sorted(ENCODERS))
@pytest.mark.parametrize("adapters", [None, 2])
def test_trainable_rest_on_the_frontier_gives_the_networks_output_and_gradients(family, adapters):
    model, shape, start = grown(family, adapters)
    path = head_path(model, "segmentation_ctpet")
    assert path.runs_encoder and path.reads_volumes
    assert [node.operation.name for node in path.nodes] == ["stem_pet", f"fusion_ct_pet_level{start}", "encoder",
                                                            "segmentation_ctpet"]
    encoder = model_parts(model)["encoder"]
    levels = encoder.feature_shapes(shape)
    # The first modality's base maps of levels < start, and both volumes (the side encoder's and the PET stem's).
    assert sorted(tuple(t.shape[1:]) for t in path.frontier) == sorted(
        [tuple(s[1:]) for s in levels[:start]] + [(*shape, 1)] * 2)
    x = volumes(shape)
    weights = tf.constant(np.random.default_rng(1).normal(size=(2, *shape, 2)).astype("float32"))
    variables = model.trainable_variables
    frontier = path.extractor()(x)
    with tf.GradientTape(persistent=True) as tape:
        full = model(x, training=True)["segmentation_ctpet"]
        rest = path(frontier, training=True)
        full_loss, rest_loss = tf.reduce_sum(full * weights), tf.reduce_sum(rest * weights)
    np.testing.assert_allclose(rest.numpy(), full.numpy(), rtol=1e-5, atol=1e-5)
    trained = [(v.path, g_full, g_rest) for v, g_full, g_rest in
               zip(variables, tape.gradient(full_loss, variables), tape.gradient(rest_loss, variables))]
    assert all(g is not None for _, g, _ in trained) and all(g is not None for _, _, g in trained)
    assert any("fusion" in name for name, _, _ in trained)  # (the I3ResNet's PET stem is the identity)
    assert any("adapter" in name or "lora" in name for name, _, _ in trained) is bool(adapters)
    for name, g_full, g_rest in trained:
        np.testing.assert_allclose(g_rest.numpy(), g_full.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_head_alone_on_a_frozen_encoder_reads_its_used_features():
    model = unicon_tf.foundation((16, 16, 16), width=4, depth=3, task="segmentation", num_classes=2)
    model = unicon_tf.expand(model, task="classification", num_classes=2)
    configure_trainable(model, 1, "frozen")
    path = head_path(model, "classification")
    assert [node.operation.name for node in path.nodes] == ["classification"]
    assert [tuple(t.shape[1:]) for t in path.frontier] == [(4, 4, 4, 16)]  # the coarsest map only
    assert path.runs_encoder and not path.reads_volumes
    x = {"ct": volumes((16, 16, 16))["ct"]}
    np.testing.assert_allclose(path(path.extractor()(x)).numpy(), model(x)["classification"].numpy(), rtol=1e-6)


def test_nothing_frozen_upstream_leaves_no_prefix_to_cache():
    """Stage 0 trains the stem and encoder; an adapter path from level 0 trains from the stem
    on: neither path's frozen prefix runs the encoder."""
    model = unicon_tf.foundation((16, 16, 16), width=4, depth=3, task="segmentation", num_classes=2)
    configure_trainable(model, 0, "frozen")
    assert not head_path(model, "segmentation").runs_encoder
    model = unicon_tf.expand(model, task="segmentation", num_classes=2, adapters=2, name="adapted")
    configure_trainable(model, 1, "adapters")
    path = head_path(model, "adapted")
    assert not path.runs_encoder
    assert [node.operation.name for node in path.nodes] == ["stem_ct", "encoder", "adapted"]  # the stem re-runs



def test_a_multi_modality_foundation_fused_deep_trains_on_a_cached_prefix():
    """`foundation(fusion_level=s)`: a CT+PET single-task model on a frozen pretrained encoder
    computes levels < s from CT alone, so its head trains on the cached CT maps."""
    shape, options, start = ENCODERS["i3resnet"]
    model = unicon_tf.foundation(shape, modality=["ct", "pet"], task="segmentation", num_classes=2,
                                 decoder_channels=8, side_encoder=4, fusion_level=start, **options)
    configure_trainable(model, 0, "frozen", pretrained=True)
    path = head_path(model, "segmentation_ctpet")
    assert path.runs_encoder
    assert [node.operation.name for node in path.nodes] == ["stem_pet", f"fusion_ct_pet_level{start}", "encoder",
                                                            "segmentation_ctpet"]
    x = volumes(shape)
    np.testing.assert_allclose(path(path.extractor()(x)).numpy(), model(x)["segmentation_ctpet"].numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modality, options, message", [
    ("ct", {"width": 4, "depth": 3}, "name two or more"),
    (["ct", "pet"], {"width": 4, "depth": 3, "fusion_level": 3}, r"in \[0, 2\]"),
    (["ct", "pet"], {"encoder": "vit", "patch_size": 8, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
                     "mlp_dim": 16}, "one token grid"),
])
def test_fusion_level_is_checked(modality, options, message):
    options = {"fusion_level": 1, **options}
    with pytest.raises(ValueError, match=message):
        unicon_tf.foundation((16, 16, 16), modality=modality, **options)


def test_a_checkpoint_holds_only_what_the_stage_can_change(tmp_path):
    """A frozen stage's checkpoint (`save_stage_weights`) holds the new head's path, not the
    encoder; loading it restores them, refuses another network, and reads Keras' older files."""
    from unicon_tf.train.checkpoints import load_stage_weights, save_stage_weights, stage_variables

    model, _, _ = grown("i3resnet")
    saved = [keras.ops.convert_to_numpy(v) for v in model.weights]
    save_stage_weights(tmp_path / "stage.npz", model)
    changing = stage_variables(model)
    assert {v.path for v in changing} == {v.path for v in model.trainable_weights}
    parts = model_parts(model)
    left_out = {v.path for v in model.weights} - {v.path for v in changing}
    assert {v.path for v in parts["encoder"].base_weights() + parts["heads"]["segmentation"].weights} <= left_out
    for variable in changing:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    load_stage_weights(tmp_path / "stage.npz", model)
    for variable, array in zip(model.weights, saved):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), array)
    other, _, _ = grown("residual")
    before = [keras.ops.convert_to_numpy(v) for v in other.weights]
    with pytest.raises(ValueError, match="stage.npz: variable .* is not the network's"):
        load_stage_weights(tmp_path / "stage.npz", other)
    assert all((keras.ops.convert_to_numpy(v) == b).all() for v, b in zip(other.weights, before))  # nothing assigned
    model.save_weights(tmp_path / "network.weights.h5")  # a checkpoint written before stage variables
    for variable in changing:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    load_stage_weights(tmp_path / "network.weights.h5", model)
    for variable, array in zip(model.weights, saved):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), array)


def test_a_deep_fusion_runs_under_mixed_float16():
    """The fusion at level s > 0 average-pools PET; TensorFlow has no float16 AvgPool3D on the CPU."""
    from unicon_tf.train.precision import set_precision

    model, shape, _ = grown("residual", side_encoder=0)
    x = volumes(shape)
    reference = model(x)["segmentation_ctpet"].numpy()
    mixed = set_precision(model, "mixed_float16")(x)["segmentation_ctpet"]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mixed).astype("float32"), reference, rtol=0.03, atol=0.05)
