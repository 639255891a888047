"""Paths that start at an encoder level (`expand(..., adapter_start=s)`): shared fine levels,
old heads bit-identical, fresh paths equal to the base path, saving, pipeline option."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SHAPE, run

import unicon_tf
from unicon_tf.model.adapters import AdaptableConv3D
from unicon_tf.train import PipelineError, load_pipeline

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
from common import graph_flops  # noqa: E402


def grown(start, width=8, depth=3):
    """A CT model grown like UNICON: +prognosis (same path), +segmentation (adapters),
    +PET segmentation (fused path with adapters), both new paths starting at `start`."""
    keras.utils.set_random_seed(0)
    model = unicon_tf.foundation(SHAPE, width=width, depth=depth)
    model = unicon_tf.expand(model, task="prognosis")
    model = unicon_tf.expand(model, task="segmentation", adapters=2, adapter_start=start)
    return unicon_tf.expand(model, modality="pet", task="segmentation", adapters=2, adapter_start=start)


@pytest.mark.parametrize("start", [1, 2])
def test_old_heads_stay_bit_identical_and_fine_levels_are_shared(start, volumes):
    keras.utils.set_random_seed(0)
    model = unicon_tf.expand(unicon_tf.foundation(SHAPE, width=8, depth=3), task="prognosis")
    before = run(model, volumes)
    weights = {id(w): np.array(w) for w in model.weights}
    model = unicon_tf.expand(model, task="segmentation", adapters=2, adapter_start=start)
    model = unicon_tf.expand(model, modality="pet", task="segmentation", adapters=2, adapter_start=start)
    after = run(model, volumes)
    for head, value in before.items():
        assert np.max(np.abs(after[head] - value)) == 0.0, head
    now = {id(w): w for w in model.weights}
    for key, old in weights.items():
        np.testing.assert_array_equal(np.array(now[key]), old)

    # The new paths read the classification path's own tensors for the levels below `start`.
    base = model.get_layer("classification").input
    for head in ("segmentation", "segmentation_ctpet"):
        features = model.get_layer(head).input
        assert all(features[level] is base[level] for level in range(start - 1))
        assert (features[start - 1] is base[start - 1]) == (head == "segmentation")  # PET is fused in there
    # Adapters exist only where the path computes: levels >= start.
    encoder = model.get_layer("encoder")
    adapted = {conv.name for conv in encoder.adaptable_layers if "segmentation" in conv.adapters}
    computed = {layer.name for layer in encoder.levels_from(start).layers if isinstance(layer, AdaptableConv3D)}
    assert adapted == computed and all(not name.startswith("level0_") for name in adapted)


@pytest.mark.parametrize("start", [1, 2])
def test_a_fresh_path_starting_later_computes_what_the_base_path_does(start, volumes):
    """Fresh adapters (B = 0) and a fresh fusion (identity on CT) leave every level equal to
    the base path's, so the new heads start from what the model already computes."""
    model = grown(start)
    base = model.get_layer("classification").input
    extract = keras.Model(model.input, {"base": base, "seg": model.get_layer("segmentation").input,
                                        "ctpet": model.get_layer("segmentation_ctpet").input})
    features = extract({m: volumes[m] for m in model.input})
    for path in ("seg", "ctpet"):
        for ours, theirs in zip(features[path], features["base"]):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_later_start_costs_fewer_flops_and_round_trips(volumes, tmp_path):
    def flops(model):
        inputs = {m: tf.constant(volumes[m]) for m in model.input}
        return graph_flops(tf.function(lambda x: model(x, training=False)).get_concrete_function(inputs))

    counts = [flops(grown(start)) for start in (0, 1, 2)]
    assert counts[0] > counts[1] > counts[2]

    model = grown(2)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    expected, got = run(model, volumes), run(loaded, volumes)
    for head in expected:
        assert np.max(np.abs(got[head] - expected[head])) == 0.0, head
    info = unicon_tf.describe(loaded)
    assert info["heads"]["segmentation_ctpet"]["adapter_start"] == 2
    assert info["fusions"]["ct+pet"]["level"] == 2
    assert flops(loaded) == counts[2]


def test_adapter_start_errors_name_the_problem(small_foundation):
    with pytest.raises(ValueError, match=r"adapter_start must be an encoder level in \[0, 2\] \(the residual encoder has 3 levels\), got 3"):
        unicon_tf.expand(small_foundation, task="segmentation", adapters=2, adapter_start=3)
    model = unicon_tf.expand(small_foundation, modality="pet", task="segmentation", adapter_start=1)
    with pytest.raises(ValueError, match=r"already fuses \['ct', 'pet'\] at encoder level 1"):
        unicon_tf.expand(model, task="prognosis", modalities=["ct", "pet"], adapters=2, adapter_start=2)
    vit = unicon_tf.foundation(SHAPE, encoder="vit", patch_size=4, hidden_size=32, num_layers=2, num_heads=4,
                               mlp_dim=64)
    with pytest.raises(ValueError, match=r"adapter_start=1 needs .*residual CNN.*use adapter_start=0"):
        unicon_tf.expand(vit, task="segmentation", adapters=2, adapter_start=1)
    assert unicon_tf.describe(vit)["encoder"]["adapters"] == {}  # refused before anything was added


def test_pipeline_stage_option(tmp_path):
    text = """
name: p
input_shape: [16, 16, 16]
encoder: {width: 8, depth: 3}
stages:
  - {name: classification, task: classification, data: d}
  - {name: segmentation, task: segmentation, data: d, strategy: adapters, adapters: 2, adapter_start: START}
"""
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("START", "2"))
    pipeline = load_pipeline(path)
    assert pipeline.stages[1].adapter_start == 2 and pipeline.stages[0].adapter_start == 0
    path.write_text(text.replace("START", "-1"))
    with pytest.raises(PipelineError, match="stage 'segmentation': adapter_start must be an encoder level"):
        load_pipeline(path)
    # a level the encoder lacks is refused when the file loads, not when that stage trains
    refused = {
        "3": r"adapter_start must be an encoder level in \[0, 2\] \(the residual encoder has 3 levels\), got 3",
        "1, adapter_levels: [0, 1]": r"adapter_levels must lie in \[adapter_start, 2\] = \[1, 2\]",
        "2, adapter_levels: [3]": r"adapter_levels must lie .* got \[3\]",
    }
    for start, message in refused.items():
        path.write_text(text.replace("START", start))
        with pytest.raises(PipelineError, match=f"p.yaml: stage 'segmentation': {message}"):
            load_pipeline(path)
    path.write_text(text.replace("START", "4").replace("{width: 8, depth: 3}", "{preset: astra_i3resnet152}"))
    assert load_pipeline(path).stages[1].adapter_start == 4  # the I3ResNet's five levels: stem, layer1-4
    path.write_text(text.replace("START", "5").replace("{width: 8, depth: 3}", "{preset: astra_i3resnet152}"))
    with pytest.raises(PipelineError, match=r"in \[0, 4\] \(the i3resnet encoder has 5 levels\), got 5"):
        load_pipeline(path)
    # the counts the level check reads are YAML whole numbers, refused by name before it
    for encoder, field in (("{depth: [3]}", "depth"), ("{depth: '3'}", "depth"), ("{depth: 0}", "depth"),
                           ("{width: 2.5}", "width"), ("{kind: i3resnet, layers: [1, 1, 1]}", "layers")):
        path.write_text(text.replace("START", "1").replace("{width: 8, depth: 3}", encoder))
        with pytest.raises(PipelineError, match=f"p.yaml: encoder.{field} must be"):
            load_pipeline(path)
    path.write_text(text.replace("START", "1").replace("{width: 8, depth: 3}", "{kind: vit}"))
    with pytest.raises(PipelineError, match="adapter_start=1 needs an encoder whose levels .* the vit encoder.s feature states"):
        load_pipeline(path)
