"""The foundation model and `expand`: old outputs bit-identical, shapes, saving, errors."""

import json

import keras
import numpy as np
import pytest
from conftest import SHAPE, run

import unicon_tf
from unicon_tf.model import SharedEncoder


def snapshot(model):
    """Every variable of the model by identity, as NumPy copies."""
    return {id(v): (v.path, np.array(v.numpy())) for v in model.weights}


def assert_variables_unchanged(before, model):
    now = {id(v): v for v in model.weights}
    for key, (path, value) in before.items():
        assert key in now, f"variable {path} is no longer part of the model"
        np.testing.assert_array_equal(now[key].numpy(), value, err_msg=path)


def test_every_expansion_keeps_old_heads_bit_identical(small_foundation, volumes):
    expansions = [
        dict(task="prognosis"),
        dict(task="segmentation", num_classes=3),
        dict(modality="pet", task="segmentation", name="segmentation_ctpet"),
        dict(task="classification", name="classification_lora", num_classes=4, adapters=2),
        dict(task="prognosis", name="prognosis_ctpet", modalities=["ct", "pet"], adapters=2),
    ]
    model = small_foundation
    for options in expansions:
        before_outputs, before_vars = run(model, volumes), snapshot(model)
        model = unicon_tf.expand(model, **options)
        after = run(model, volumes)
        for head, value in before_outputs.items():
            assert np.max(np.abs(after[head] - value)) == 0.0, f"{head} changed after expand({options})"
        assert_variables_unchanged(before_vars, model)
        assert len(after) == len(before_outputs) + 1
    assert set(model.input) == {"ct", "pet"}


def test_output_shapes_per_task(small_foundation, volumes):
    model = unicon_tf.expand(small_foundation, task="prognosis")
    model = unicon_tf.expand(model, task="segmentation", num_classes=3)
    model = unicon_tf.expand(model, modality="pet", task="segmentation")
    outputs = run(model, volumes)
    assert outputs["classification"].shape == (2, 2)
    assert outputs["prognosis"].shape == (2,)
    assert outputs["segmentation"].shape == (2,) + SHAPE + (3,)
    assert outputs["segmentation_ctpet"].shape == (2,) + SHAPE + (2,)


def test_new_modality_head_reads_pet_and_old_heads_do_not(small_foundation, volumes):
    model = unicon_tf.expand(small_foundation, modality="pet", task="segmentation")
    fusion = model.get_layer("fusion_ct_pet")
    # Train-like change of the fusion weights so the PET stem contributes.
    fusion.mixing.assign(fusion.mixing.numpy() + 0.1)
    base = run(model, volumes)
    other_pet = dict(volumes, pet=volumes["pet"] * -3.0)
    changed = run(model, other_pet)
    assert np.max(np.abs(changed["classification"] - base["classification"])) == 0.0
    assert np.max(np.abs(changed["segmentation_ctpet"] - base["segmentation_ctpet"])) > 0.0


def test_fresh_modality_and_adapter_paths_start_from_the_ct_path(small_foundation, volumes):
    model = unicon_tf.expand(small_foundation, modality="pet", task="prognosis", adapters=2)
    encoder = model.get_layer("encoder")
    stem_ct = model.get_layer("stem_ct")(volumes["ct"])
    fused = model.get_layer("fusion_ct_pet")([stem_ct, model.get_layer("stem_pet")(volumes["pet"])])
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(stem_ct))
    base = encoder(stem_ct)
    adapted = encoder(stem_ct, adapter="prognosis_ctpet")
    for b, a in zip(base, adapted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Once the adapter's B factor moves, only the adapter path changes.
    for conv in encoder.adaptable_layers:
        _, up = conv.adapter_weights("prognosis_ctpet")
        up.assign(np.full(up.shape, 0.01, "float32"))
    moved = encoder(stem_ct, adapter="prognosis_ctpet")
    assert np.max(np.abs(np.asarray(moved[-1]) - np.asarray(base[-1]))) > 0.0
    for b, again in zip(base, encoder(stem_ct)):
        np.testing.assert_array_equal(np.asarray(again), np.asarray(b))


def test_keras_round_trip_keeps_outputs_and_registry(small_foundation, volumes, tmp_path):
    model = unicon_tf.expand(small_foundation, task="prognosis", adapters=2)
    model = unicon_tf.expand(model, modality="pet", task="segmentation", num_classes=3)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    expected, got = run(model, volumes), run(loaded, volumes)
    assert set(got) == set(expected)
    for head in expected:
        assert np.max(np.abs(got[head] - expected[head])) == 0.0, head
    assert unicon_tf.describe(loaded) == unicon_tf.describe(model)
    # A loaded model keeps growing, and its encoder is still one shared layer.
    grown = unicon_tf.expand(loaded, task="classification", name="grade", num_classes=3)
    assert [type(layer) for layer in grown.layers].count(SharedEncoder) == 1
    assert "grade" in run(grown, volumes)


def test_unicon_order_describes_four_heads_two_stems(tmp_path):
    model = unicon_tf.foundation((32, 32, 32), modality="ct", task="classification", width=8, depth=4)
    model = unicon_tf.expand(model, task="prognosis")
    model = unicon_tf.expand(model, task="segmentation", num_classes=3)
    model = unicon_tf.expand(model, modality="pet", task="segmentation", name="segmentation_ctpet")
    info = unicon_tf.describe(model)
    assert list(info["heads"]) == ["classification", "prognosis", "segmentation", "segmentation_ctpet"]
    assert set(info["stems"]) == {"ct", "pet"}
    assert [h["stage"] for h in info["heads"].values()] == [0, 1, 2, 3]
    assert info["heads"]["segmentation_ctpet"]["modalities"] == ["ct", "pet"]
    assert info["heads"]["segmentation"]["output_shape"] == [32, 32, 32, 3]
    parts = info["encoder"]["params"] + sum(s["params"] for s in info["stems"].values())
    parts += sum(f["params"] for f in info["fusions"].values()) + sum(h["params"] for h in info["heads"].values())
    assert parts == info["params"] == model.count_params()
    json.dumps(info)  # plain data


@pytest.mark.parametrize("task", ["classification", "prognosis"])
def test_rank_8_adapters_and_head_add_under_ten_percent_of_encoder(task):
    model = unicon_tf.foundation((32, 32, 32))
    before = unicon_tf.describe(model)
    grown = unicon_tf.expand(model, task=task, name=f"{task}_new", adapters=8)
    after = unicon_tf.describe(grown)
    added = after["params"] - before["params"]
    assert after["encoder"]["adapters"][f"{task}_new"]["rank"] == 8
    assert after["encoder"]["params"] == before["encoder"]["params"]
    assert 0 < added < 0.10 * before["encoder"]["params"]


def user_encoder(channels=1):
    """A user's own backbone: plain Keras Conv3D layers, the finest level at stride 2."""
    volume = keras.Input((None, None, None, channels))
    x = keras.layers.Conv3D(8, 3, strides=2, padding="same", activation="relu")(volume)
    fine = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(x)
    coarse = keras.layers.Conv3D(16, 3, strides=2, padding="same", activation="relu")(fine)
    return keras.Model(volume, [fine, coarse], name="my_pretrained")


def test_user_encoder_plugs_in_with_its_weights(volumes):
    mine = user_encoder()
    model = unicon_tf.foundation(SHAPE, encoder=mine, task="prognosis")
    model = unicon_tf.expand(model, task="segmentation", adapters=2)
    outputs = run(model, volumes)
    assert outputs["prognosis"].shape == (2,)
    assert outputs["segmentation"].shape == (2,) + SHAPE + (2,)
    # The stem passes the one-channel volume through; the encoder computes what mine does.
    encoder = model.get_layer("encoder")
    for theirs, ours in zip(mine(volumes["ct"]), encoder(volumes["ct"])):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-6)
    assert unicon_tf.describe(model)["encoder"]["adapters"]["segmentation"]["rank"] == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: unicon_tf.expand(m, task="classification"), "head or layer named 'classification' already"),
        (lambda m: unicon_tf.expand(m, task="prognosis", name="encoder"), "named 'encoder' already"),
        (lambda m: unicon_tf.expand(m, modality="ct", task="segmentation"), "Modality 'ct' is already present"),
        (lambda m: unicon_tf.expand(m, task="detection"), "Unknown task 'detection'"),
        (lambda m: unicon_tf.expand(m, task="segmentation", num_classes=1), "num_classes must be >= 2"),
        (lambda m: unicon_tf.expand(m, task="classification", name="c", num_classes=1), "num_classes must be >= 2"),
        (lambda m: unicon_tf.expand(m, modality="pet"), "needs a task"),
        (lambda m: unicon_tf.expand(m, task="prognosis", depth=3), r"Unknown option\(s\) \['depth'\]"),
        (lambda m: unicon_tf.expand(m, task="prognosis", adapters=0), "adapters must be a rank >= 1"),
        (lambda m: unicon_tf.expand(m, task="prognosis", modalities=["mri"]), r"modalities \['mri'\]"),
    ],
)
def test_expand_errors_name_the_problem(small_foundation, call, message):
    with pytest.raises(ValueError, match=message):
        call(small_foundation)


def test_foundation_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"not divisible by the encoder's total stride 4"):
        unicon_tf.foundation((16, 18, 16), width=8, depth=3)
    with pytest.raises(ValueError, match=r"does not fit the encoder .*: use multiples of \[\d+, \d+, \d+\] voxels"):
        unicon_tf.foundation((18, 18, 18), encoder=user_encoder())
    for shape in ((30, 30, 15), (36, 32, 16), (64, 48, 24)):  # the I3ResNet's stride is anisotropic: (32, 32, 16)
        with pytest.raises(ValueError, match=rf"input_shape \({shape[0]}, .* use multiples of \[32, 32, 16\] voxels"):
            unicon_tf.foundation(shape, encoder="i3resnet", layers=(1, 1, 1, 1), width=4)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        unicon_tf.foundation(SHAPE, num_classes=1, width=8, depth=2)
    with pytest.raises(ValueError, match="Unknown task 'survival'"):
        unicon_tf.foundation(SHAPE, task="survival", width=8, depth=2)
    with pytest.raises(ValueError, match="three positive spatial dims"):
        unicon_tf.foundation((16, 16), width=8, depth=2)


def test_foundation_can_start_from_fused_modalities(volumes):
    model = unicon_tf.foundation(SHAPE, modality=["ct", "pet"], task="segmentation", width=8, depth=3,
                                 head_name="segmentation_ctpet")
    info = unicon_tf.describe(model)
    assert info["heads"]["segmentation_ctpet"]["modalities"] == ["ct", "pet"]
    assert info["fusions"]["ct+pet"]["stage"] == 0
    assert run(model, volumes)["segmentation_ctpet"].shape == (2,) + SHAPE + (2,)
    with pytest.raises(ValueError, match="distinct modalities"):
        unicon_tf.foundation(SHAPE, modality=["ct", "ct"], width=8, depth=3)
