"""The ViT encoder family: MONAI parity, LoRA on attention, UNETR, a new modality's patch
embedding, saving, serving and a two-stage pipeline on a tiny ViT (16^3, patch 4)."""

import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

import unicon_tf
from conftest import run
from unicon_tf import train
from unicon_tf.model import PositionEmbedding, PretrainedWeightsError, load_pretrained, model_parts
from unicon_tf.serving.export import export_model
from unicon_tf.train.strategies import configure_trainable

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY = dict(encoder="vit", patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
# The fixtures' MONAI ViTs (tests/fixtures/make_monai_vit.py).
MONAI = {
    "learned": ("monai_vit_small.npz", dict(patch_size=4, num_layers=2, qkv_bias=True)),
    "sincos": ("monai_vit_sincos.npz", dict(patch_size=(4, 4, 2), num_layers=1, position="sincos")),
}


def monai_like(kind, **extra):
    file, options = MONAI[kind]
    layers = list(range(1, options["num_layers"] + 1))
    return unicon_tf.foundation((16, 16, 16), encoder="vit", hidden_size=48, num_heads=4, mlp_dim=96,
                                feature_layers=layers, **options, **extra), FIXTURES / file


def hidden_states(model, volume):
    parts = model_parts(model)
    stem = min(parts["stems"].values(), key=lambda s: s.stage)
    return [np.asarray(f).reshape(volume.shape[0], -1, f.shape[-1]) for f in parts["encoder"](stem(volume))]


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "monai_vit_expected.npz") as archive:
        return {k: archive[k] for k in archive.files}


@pytest.mark.parametrize("kind", sorted(MONAI))
def test_monai_state_dict_reproduces_monai_hidden_states(kind, expected):
    model, file = monai_like(kind)
    report = load_pretrained(model, file)
    assert "patch_embedding.patch_embeddings.weight" in report["loaded"] and report["ignored"] == []
    volume = np.transpose(expected["input"], (0, 2, 3, 4, 1))  # MONAI is channels-first
    *states, final = hidden_states(model, volume)
    monai_states = sorted(k for k in expected if k.startswith(f"{kind}_hidden_"))
    assert len(states) == len(monai_states)
    for got, key in zip(states, monai_states):
        np.testing.assert_allclose(got, expected[key], atol=1e-4, rtol=0)
    np.testing.assert_allclose(final, expected[f"{kind}_final"], atol=1e-4, rtol=0)


def test_learned_position_embedding_is_interpolated_as_torch_does(expected):
    with np.load(FIXTURES / "monai_vit_small.npz") as state:
        table = state["patch_embedding.position_embeddings"][0]
    layer = PositionEmbedding((4, 4, 4))
    layer.build((None, 4, 4, 4, 48))
    layer.embedding.assign(table)
    np.testing.assert_array_equal(np.asarray(layer.table((4, 4, 4), 48)), table.reshape(4, 4, 4, 48))
    np.testing.assert_allclose(np.asarray(layer.table((6, 5, 3), 48)), expected["learned_position_resized"],
                               atol=1e-5)
    # A model on a 24^3 grid starts from the 16^3 weights (position_grid = the pretraining grid).
    model, file = monai_like("learned", position_grid=(4, 4, 4))
    bigger = unicon_tf.foundation((24, 24, 20), encoder="vit", hidden_size=48, num_heads=4, mlp_dim=96,
                                  feature_layers=[1, 2], patch_size=4, num_layers=2, qkv_bias=True,
                                  position_grid=(4, 4, 4), weights=str(file))
    assert tuple(bigger.output["classification"].shape) == (None, 2)
    position = bigger.get_layer("encoder").backbone.get_layer("position_embedding")
    np.testing.assert_array_equal(position.embedding.numpy(), table)


def test_bad_state_dicts_name_every_tensor_and_change_nothing(tmp_path):
    model, file = monai_like("learned")
    with np.load(file) as archive:
        state = {k: archive[k] for k in archive.files}
    state.pop("blocks.1.mlp.linear2.bias")
    state["blocks.0.attn.out_proj.weight"] = state["blocks.0.attn.out_proj.weight"][:, :40]
    state["cls_token"] = np.zeros((1, 1, 48), np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **state)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(model, bad)
    message = str(error.value)
    assert "missing: blocks.1.mlp.linear2.bias" in message
    assert "wrong shape: blocks.0.attn.out_proj.weight: file (48, 40), model (48, 48)" in message
    assert "unexpected: cls_token" in message and str(bad) in message
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    # A CNN model, an unknown format and a missing file are refused by name too.
    with pytest.raises(PretrainedWeightsError, match="not a 'vit'"):
        load_pretrained(unicon_tf.foundation((16, 16, 16), width=8, depth=2), file)
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(PretrainedWeightsError, match="unknown weights format 'pt'"):
        load_pretrained(model, tmp_path / "model.pt")
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_pretrained(model, tmp_path / "none.npz")


def test_safetensors_and_unetr_checkpoints_load(tmp_path, expected):
    safetensors = pytest.importorskip("safetensors.numpy")
    _, file = monai_like("learned")
    with np.load(file) as archive:
        state = {k: archive[k] for k in archive.files}
    # A whole MONAI UNETR checkpoint: the ViT under `vit.`, the decoder ignored.
    unetr = {f"vit.{k}": v for k, v in state.items()} | {"decoder2.conv.weight": np.zeros((2, 2), np.float32)}
    safetensors.save_file(unetr, str(tmp_path / "unetr.safetensors"))
    model, _ = monai_like("learned")
    report = load_pretrained(model, tmp_path / "unetr.safetensors")
    assert report["ignored"] == ["decoder2.conv.weight"]
    volume = np.transpose(expected["input"], (0, 2, 3, 4, 1))
    np.testing.assert_allclose(hidden_states(model, volume)[-1], expected["learned_final"], atol=1e-4, rtol=0)
    # The encoder alone takes everything but the patch embedding, which belongs to the stem.
    encoder_only = load_pretrained(monai_like("learned")[0].get_layer("encoder"), file)
    assert "patch_embedding.patch_embeddings.weight" in encoder_only["skipped"]


@pytest.fixture(scope="module")
def grown():
    """A tiny ViT grown through every kind of expand, with each old head's outputs on the way."""
    rng = np.random.default_rng(0)
    volumes = {m: rng.normal(size=(2, 16, 16, 16, 1)).astype("float32") for m in ("ct", "pet")}
    model = unicon_tf.foundation((16, 16, 16), task="classification", **TINY)
    history = [run(model, volumes)]
    steps = [
        dict(task="prognosis"),  # a head on the same path
        dict(task="segmentation", adapters=8),  # LoRA on query and value, UNETR decoder
        dict(task="prognosis", name="prognosis_lora", adapters=2, adapter_targets=["query", "value", "mlp"]),
        dict(modality="pet", task="segmentation", adapters=8),  # PET patch embedding + skip encoder
    ]
    for step in steps:
        model = unicon_tf.expand(model, **step)
        history.append(run(model, volumes))
    return model, volumes, history


def test_every_expand_keeps_old_heads_bit_identical(grown):
    model, volumes, history = grown
    for before, after in zip(history, history[1:]):
        for head, output in before.items():
            assert np.max(np.abs(after[head] - output)) == 0.0, head
    info = unicon_tf.describe(model)
    assert info["encoder"]["kind"] == "vit" and info["encoder"]["patch_size"] == [4, 4, 4]
    assert info["encoder"]["adapters"]["segmentation"]["targets"] == ["query", "value"]
    assert sorted(info["encoder"]["adapters"]["prognosis_lora"]["targets"]) == ["mlp", "query", "value"]
    assert info["heads"]["segmentation_ctpet"]["decoder"] == "unetr"
    assert info["stems"]["pet"]["kind"] == "patch"
    assert history[-1]["segmentation_ctpet"].shape == (2, 16, 16, 16, 2)
    # Adapters that moved change only their own path.
    encoder = model.get_layer("encoder")
    for layer in encoder.adaptable_layers:
        if "segmentation" in layer.adapters:
            layer.adapter_weights("segmentation")[1].assign(np.full(layer.adapter_weights("segmentation")[1].shape,
                                                                    0.05, "float32"))
    moved = run(model, volumes)
    assert np.max(np.abs(moved["segmentation"] - history[-1]["segmentation"])) > 0.0
    for head in ("classification", "prognosis", "prognosis_lora", "segmentation_ctpet"):
        assert np.max(np.abs(moved[head] - history[-1][head])) == 0.0, head
    for layer in encoder.adaptable_layers:
        if "segmentation" in layer.adapters:
            layer.adapter_weights("segmentation")[1].assign(np.zeros(layer.adapter_weights("segmentation")[1].shape))


def test_new_modality_starts_as_the_ct_path(grown):
    model, volumes, _ = grown
    ct_tokens = model.get_layer("stem_ct")(volumes["ct"])
    pet_tokens = model.get_layer("stem_pet")(volumes["pet"])
    assert tuple(pet_tokens.shape) == (2, 4, 4, 4, 32)  # its own patch embedding
    fused = model.get_layer("fusion_ct_pet")([ct_tokens, pet_tokens])
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(ct_tokens))
    head = model.get_layer("segmentation_ctpet")
    assert [p.name for p in head.modality_projections] == ["skip_pet"]
    assert not np.any(head.modality_projections[0].kernel.numpy())  # the PET skip starts at zero


def test_adapters_strategy_trains_only_the_new_head_and_its_attention_adapters(grown):
    model, _, _ = grown
    head = model_parts(model)["heads"]["segmentation_ctpet"]
    configure_trainable(model, head.stage, "adapters")
    names = {v.path for v in model.trainable_variables}
    assert names and all("segmentation_ctpet" in n or "stem_pet" in n or "fusion_ct_pet" in n for n in names)
    lora = {n for n in names if "lora" in n}
    assert lora and all(("_query/" in n or "_value/" in n) for n in lora)
    configure_trainable(model, 0, "frozen")  # stage 0 trains everything again


def test_keras_round_trip(grown, tmp_path):
    model, volumes, history = grown
    model.save(tmp_path / "vit.keras")
    loaded = keras.models.load_model(tmp_path / "vit.keras")
    again = run(loaded, volumes)
    for head, output in history[-1].items():
        assert np.max(np.abs(again[head] - output)) == 0.0, head
    assert unicon_tf.describe(loaded) == unicon_tf.describe(model)


def test_savedmodel_export_matches_keras(tmp_path):
    model = unicon_tf.foundation((16, 16, 16), task="prognosis", **TINY)
    model = unicon_tf.expand(model, modality="pet", task="segmentation", adapters=8, feature_size=4)
    rng = np.random.default_rng(5)
    volumes = {m: rng.normal(size=(2, 16, 16, 16, 1)).astype("float32") for m in ("ct", "pet")}
    version = export_model(model, tmp_path / "saved_models", "vit", parity_batch=volumes)
    info = json.loads((version / "unicon.json").read_text())
    assert info["parity_max_abs_diff"] <= 1e-5  # every signature, checked by export_model itself
    served = tf.saved_model.load(str(version)).signatures["segmentation_ctpet"](
        ct=tf.constant(volumes["ct"]), pet=tf.constant(volumes["pet"]))
    expected = np.argmax(run(model, volumes)["segmentation_ctpet"], axis=-1)
    np.testing.assert_array_equal(served["label_map"].numpy(), expected)


@pytest.mark.slow
def test_pipeline_vit_encoder_from_weights_trains_two_stages(phantom_records, tmp_path):
    spec = {
        "name": "tiny_vit", "input_shape": [16, 16, 16], "modality": "ct",
        "encoder": {"kind": "vit", "patch_size": 4, "hidden_size": 48, "num_layers": 2, "num_heads": 4,
                    "mlp_dim": 96, "qkv_bias": True, "feature_layers": [1, 2],
                    "weights": str(FIXTURES / "monai_vit_small.npz")},
        "defaults": {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "seed": 1},
        "stages": [
            {"name": "classification", "task": "classification", "data": str(phantom_records)},
            {"name": "segmentation", "task": "segmentation", "strategy": "adapters", "adapters": 8,
             "feature_size": 4, "data": str(phantom_records)},
        ],
    }
    path = tmp_path / "tiny_vit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    pipeline = train.load_pipeline(path)
    assert pipeline.encoder["encoder"] == "vit"
    stage0 = unicon_tf.foundation((16, 16, 16), **pipeline.encoder)  # stage 0 starts from the MONAI weights
    with np.load(FIXTURES / "monai_vit_small.npz") as state:
        np.testing.assert_array_equal(stage0.get_layer("stem_ct").conv.kernel.numpy(),
                                      np.transpose(state["patch_embedding.patch_embeddings.weight"], (2, 3, 4, 1, 0)))
    for stage in ("classification", "segmentation"):
        train.train_stage(pipeline, stage, tmp_path / "run", verbose=0)
    first = keras.models.load_model(tmp_path / "run/stages/00-classification/model.keras")
    second = keras.models.load_model(tmp_path / "run/stages/01-segmentation/model.keras")
    batch = {"ct": np.random.default_rng(3).normal(size=(2, 16, 16, 16, 1)).astype("float32")}
    assert np.max(np.abs(run(second, batch)["classification"] - run(first, batch)["classification"])) == 0.0
    assert unicon_tf.describe(second)["heads"]["segmentation"]["decoder"] == "unetr"
    bad = dict(spec, encoder={"kind": "vit", "width": 8})
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(train.PipelineError, match=r"unknown encoder key\(s\) \['width'\] for kind 'vit'"):
        train.load_pipeline(path)
