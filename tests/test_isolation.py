"""Isolation options for a new dense head (issue 17): adapter placement (levels, shortcut
convolutions), per-path GroupNorm, a side encoder; each keeps every old head bit-identical
through expand, training, `.keras` saving and SavedModel export."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SHAPE, run, write_pipeline

import unicon_tf
from unicon_tf import serving, train
from unicon_tf.model.adapters import AdaptableConv3D, PathGroupNormalization
from unicon_tf.model.heads import SegmentationHead
from unicon_tf.train import PipelineError, load_pipeline
from unicon_tf.train.continual import ContinualModel
from unicon_tf.train.strategies import configure_trainable

OPTIONS = {
    "adapters_level2_no_shortcuts": dict(adapters=2, adapter_levels=[2], adapter_shortcuts=False),
    "path_norm_start1": dict(path_norm=True, adapter_start=1),
    "side_encoder": dict(side_encoder=4),
}
ALL = dict(adapters=2, adapter_levels=[1, 2], path_norm=True, side_encoder=4)


def base_model():
    keras.utils.set_random_seed(0)
    model = unicon_tf.foundation(SHAPE, width=8, depth=3)
    return unicon_tf.expand(model, task="prognosis")


def train_new_head(model, head, volumes, strategy, steps=2):
    """A few optimizer steps on the new head (and its path's own parameters) only."""
    stage = unicon_tf.describe(model)["heads"][head]["stage"]
    configure_trainable(model, stage, strategy)
    trainer = ContinualModel(model, {head: "segmentation"}, loss_options={head: {"dice": "per_patient"}})
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-2))
    mask = (np.abs(volumes["ct"][..., 0]) > 1.0).astype("int32")
    data = tf.data.Dataset.from_tensors(({m: volumes[m] for m in model.input}, {head: mask})).repeat(steps)
    trainer.fit(data, epochs=1, verbose=0)


def strategy_for(options):
    return "adapters" if options.get("adapters") or options.get("path_norm") else "frozen"


def expanded_and_trained(options, volumes):
    """(model, old outputs, outputs after expand, outputs after training), old heads checked."""
    model = base_model()
    before = run(model, volumes)
    old_weights = {w.path: np.array(w) for w in model.weights}
    model = unicon_tf.expand(model, task="segmentation", **options)
    expanded = run(model, volumes)
    train_new_head(model, "segmentation", volumes, strategy_for(options))
    trained = run(model, volumes)
    for head, value in before.items():
        np.testing.assert_array_equal(expanded[head], value)
        np.testing.assert_array_equal(trained[head], value)
    assert np.max(np.abs(trained["segmentation"] - expanded["segmentation"])) > 0  # the new head did train
    for weight in model.weights:  # every variable that existed before is untouched
        if weight.path in old_weights:
            np.testing.assert_array_equal(np.array(weight), old_weights[weight.path], err_msg=weight.path)
    return model, trained


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_keeps_old_heads_bit_identical_through_expand_and_training(name, volumes):
    expanded_and_trained(OPTIONS[name], volumes)


@pytest.mark.slow
def test_all_options_through_saving_export_and_a_later_stage(volumes, tmp_path):
    model, trained = expanded_and_trained(ALL, volumes)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert unicon_tf.describe(loaded)["heads"]["segmentation"] == unicon_tf.describe(model)["heads"]["segmentation"]
    assert unicon_tf.describe(loaded)["encoder"]["path_norms"] == unicon_tf.describe(model)["encoder"]["path_norms"]
    reloaded = run(loaded, volumes)
    for head, value in trained.items():
        np.testing.assert_array_equal(reloaded[head], value)

    version = serving.export_model(loaded, tmp_path / "sm", "iso")  # checks signature parity itself
    served = tf.saved_model.load(str(version)).signatures["serving_default"](
        **{m: tf.constant(volumes[m]) for m in loaded.input})
    np.testing.assert_allclose(served["classification_probabilities"].numpy(),
                               tf.nn.softmax(trained["classification"]).numpy(), atol=1e-6)
    np.testing.assert_allclose(served["segmentation_probabilities"].numpy(),
                               tf.nn.softmax(trained["segmentation"]).numpy(), atol=1e-5)

    # A later stage's path with the same options leaves this stage's head bit-identical too.
    grown = unicon_tf.expand(loaded, modality="pet", task="segmentation", **ALL)
    after = run(grown, volumes)
    for head, value in trained.items():
        np.testing.assert_array_equal(after[head], value)


def test_adapter_levels_and_shortcuts_choose_the_layers():
    model = unicon_tf.expand(base_model(), task="segmentation", adapters=2, adapter_levels=[1], adapter_shortcuts=False,
                             path_norm=True)
    encoder = model.get_layer("encoder")
    adapted = {layer.name for layer in encoder.adaptable_layers if "segmentation" in layer.adapters}
    assert adapted == {"level1_down", "level1_conv1", "level1_conv2"}  # not level1_shortcut (1x1x1)
    normed = {layer.name for layer in encoder.path_layers
              if isinstance(layer, PathGroupNormalization) and "segmentation" in layer.paths}
    assert normed == {"level1_norm1", "level1_norm2"}
    head = model.get_layer("segmentation")
    assert (head.adapter, head.adapter_levels, head.adapter_shortcuts, head.path_norm) == (
        "segmentation", [1], False, True)
    # Only the path's own variables train under `adapters`; the shared gamma/beta stay frozen.
    configure_trainable(model, head.stage, "adapters")
    encoder_trainable = {v.path for v in encoder.trainable_variables}
    assert encoder_trainable and all("segmentation" in path for path in encoder_trainable)
    assert sum("gamma" in p for p in encoder_trainable) == 2


def test_shortcut_convolutions_can_be_left_without_adapters():
    """The built-in encoder's blocks have no 1x1x1 shortcut (its stride-2 convolutions change
    the channels); a backbone whose first block changes them has one."""
    from unicon_tf.model import SharedEncoder, residual_backbone

    encoder = SharedEncoder(residual_backbone(input_channels=4, width=8, depth=2))
    encoder(np.zeros((1, 8, 8, 8, 4), "float32"))
    encoder.add_adapter("with", rank=2)
    encoder.add_adapter("without", rank=2, shortcuts=False)
    layers = {layer.name: layer for layer in encoder.adaptable_layers}
    assert "with" in layers["level0_shortcut"].adapters and "without" not in layers["level0_shortcut"].adapters
    assert all("without" in layer.adapters for name, layer in layers.items() if name != "level0_shortcut")


def test_fresh_path_options_start_as_the_base_path(volumes):
    """Fresh adapters, norm copies and zero-initialised side projections: the new head reads
    exactly the features the base path computes."""
    model = base_model()
    model = unicon_tf.expand(model, task="segmentation", name="plain")
    model = unicon_tf.expand(model, task="segmentation", name="isolated", adapters=2, path_norm=True,
                             side_encoder=4)
    plain, isolated = model.get_layer("plain"), model.get_layer("isolated")
    probe = keras.Model(model.input["ct"], [plain.input, isolated.input])
    base, own = probe(volumes["ct"])
    for level, feature in enumerate(base):
        np.testing.assert_array_equal(np.array(own[level]), np.array(feature))
    side = isolated._with_side_features(list(own[:3]), [volumes["ct"]])
    for level, feature in enumerate(base):
        np.testing.assert_array_equal(np.array(side[level]), np.array(feature))


def test_layer_configs_round_trip(volumes):
    norm = PathGroupNormalization(groups=2, path_norms=["a"], name="n")
    norm.build((None, 4, 4, 4, 4))
    clone = PathGroupNormalization.from_config(norm.get_config())
    clone.build((None, 4, 4, 4, 4))
    assert clone.paths == ["a"] and clone.get_config() == norm.get_config()
    head = SegmentationHead(num_classes=2, side_encoder=4, modalities=["ct"], path_norm=True, adapter_levels=[2],
                            adapter_shortcuts=False, adapter_rank=2, name="seg")
    again = SegmentationHead.from_config(head.get_config())
    assert again.get_config() == head.get_config() and again.reads_volumes
    assert "side_encoder" not in SegmentationHead(num_classes=2).get_config()  # old configs unchanged


def test_option_errors_name_the_problem(small_foundation):
    with pytest.raises(ValueError, match="pass adapters=r .* or path_norm=True"):
        unicon_tf.expand(small_foundation, task="segmentation", adapter_levels=[1])
    with pytest.raises(ValueError, match=r"adapter_levels must lie in \[adapter_start, 2\] = \[1, 2\] \(the residual encoder has 3 levels\), got \[0\]"):
        unicon_tf.expand(small_foundation, task="segmentation", adapters=2, adapter_start=1, adapter_levels=[0])
    with pytest.raises(ValueError, match="side_encoder must be a channel count"):
        unicon_tf.expand(small_foundation, task="segmentation", side_encoder=-1)
    # An encoder whose GroupNorms are plain (as saved before path_norm existed) is refused, nothing added.
    inputs = keras.Input((None, None, None, 8))
    x = AdaptableConv3D(8, 3, padding="same")(inputs)
    x = keras.layers.GroupNormalization(groups=2)(x)
    old = unicon_tf.foundation(SHAPE, encoder=keras.Model(inputs, [x]))
    with pytest.raises(ValueError, match="no GroupNorm that can hold a per-path copy"):
        unicon_tf.expand(old, task="segmentation", path_norm=True)
    assert unicon_tf.describe(old)["encoder"]["path_norms"] == {}


def test_pipeline_keys(tmp_path):
    stages = [{"name": "classification", "task": "classification"},
              {"name": "segmentation", "task": "segmentation", "strategy": "adapters", "adapters": 2,
               "adapter_levels": [1, 2], "adapter_shortcuts": False, "path_norm": True, "side_encoder": 4,
               "loss": {"dice": "per_patient", "ce_weighting": "lesion"}, "sampling": {"foreground_probability": 0.5}}]
    spec = load_pipeline(write_pipeline(tmp_path, tmp_path / "d", stages=stages))
    seg = spec.stages[1]
    assert seg.path_options == {"adapter_levels": [1, 2], "adapter_shortcuts": False, "path_norm": True}
    assert seg.head_options == {"side_encoder": 4}
    assert seg.training.loss == {"dice": "per_patient", "ce_weighting": "lesion"}
    assert spec.stages[0].path_options == {} and spec.stages[0].training.loss == {}
    plain = load_pipeline(write_pipeline(tmp_path, tmp_path / "d", stages=[stages[0], {
        "name": "segmentation", "task": "segmentation", "strategy": "adapters", "adapters": 2}], name="plain"))
    assert plain.stages[1].fingerprint() != seg.fingerprint()

    bad = [
        ({"adapter_levels": 1}, "field 'adapter_levels' must be a non-empty list"),
        ({"path_norm": "yes"}, "field 'path_norm' must be true or false"),
        ({"loss": {"dice": "mean"}}, r"field 'loss': loss option dice = 'mean' is not one of"),
        ({"loss": {"focal": True}}, r"field 'loss': unknown loss option\(s\) \['focal'\]"),
        ({"sampling": {"foreground_probability": 1.5}}, "field 'sampling': .*must be a number in"),
        ({"sampling": "p"}, "field 'sampling' must be a mapping"),
    ]
    for change, message in bad:
        path = write_pipeline(tmp_path, tmp_path / "d", stages=[stages[0], {**stages[1], **change}], name="bad")
        with pytest.raises(PipelineError, match=f"bad.yaml: stage 'segmentation': {message}"):
            load_pipeline(path)
    path = write_pipeline(tmp_path, tmp_path / "d", name="cls", stages=[
        {**stages[0], "sampling": {"foreground_probability": 0.5}}])
    with pytest.raises(PipelineError, match="stage 'classification': field 'sampling' .* segmentation stages only"):
        load_pipeline(path)


@pytest.mark.slow
def test_stage_trains_with_isolation_loss_and_sampling(phantom_records, tmp_path, volumes):
    """Through the pipeline: the segmentation stage with every option trains, records them,
    and leaves stage 0's head bit-identical."""
    stages = [{"name": "classification", "task": "classification", "num_classes": 2, "epochs": 1},
              {"name": "segmentation", "task": "segmentation", "strategy": "adapters", "adapters": 2,
               "adapter_levels": [1, 2], "path_norm": True, "side_encoder": 4, "epochs": 1,
               "loss": {"dice": "per_patient", "ce_weighting": "lesion"}, "sampling": {"foreground_probability": 0.7}}]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages)
    records = [train.train_stage(pipeline, s["name"], tmp_path / "run", verbose=0) for s in stages]
    assert records[1]["spec"]["training"]["loss"]["ce_weighting"] == "lesion"
    first = keras.models.load_model(tmp_path / "run" / "stages" / "00-classification" / "model.keras")
    second = keras.models.load_model(tmp_path / "run" / "stages" / "01-segmentation" / "model.keras")
    np.testing.assert_array_equal(run(second, volumes)["classification"], run(first, volumes)["classification"])
    head = unicon_tf.describe(second)["heads"]["segmentation"]
    assert (head["path_norm"], head["side_encoder"], head["adapter_levels"]) == (True, 4, [1, 2])
