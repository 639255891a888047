"""The torch-free checkpoint reader and the Keras I3ResNet port (fixtures: tests/fixtures/make_i3resnet.py).

The fixtures were made with torch; these tests need neither torch nor the weights package.
"""

import collections
import io
import os
import pathlib
import pickle
import re
import sys
import types
import zipfile

import keras
import numpy as np
import pytest

import unicon_tf
from unicon_tf.model import PretrainedWeightsError, model_parts
from unicon_tf.model.i3resnet import (FrozenBatchNormalization, i3resnet_backbone, i3resnet_targets,
                                      load_i3resnet_weights, read_i3resnet_state)
from unicon_tf.serving.export import export_model
from unicon_tf.train.strategies import configure_trainable
from unicon_tf.model.torch_checkpoint import bfloat16_to_float32, read_torch_checkpoint, torch_state_dict

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SMALL = FIXTURES / "i3resnet_small.pt"
DTYPES = FIXTURES / "i3resnet_dtypes.pt"
LAYERS, WIDTH = (1, 2, 1, 1), 4


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "i3resnet_expected.npz") as archive:
        return dict(archive)


@pytest.fixture(scope="module")
def loaded():
    backbone = i3resnet_backbone(layers=LAYERS, width=WIDTH)
    load_i3resnet_weights(backbone, SMALL)
    return backbone


def rewrite(source, target, change):
    """Copy a torch.save zip, passing each (name, bytes) through `change` (None drops it)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


# --- the reader ---------------------------------------------------------------------------

def test_reader_reads_each_dtype_exactly(expected):
    content = read_torch_checkpoint(DTYPES)
    for key in ("bf16", "f16", "f32", "i64"):
        np.testing.assert_array_equal(content[key], expected[f"dtype_{key}"])
    assert content["bf16"].dtype == np.float32 and content["i64"].dtype == np.int64
    assert not content["f32"].flags.f_contiguous or content["f32"].shape == (4, 3)  # a transposed tensor
    assert bfloat16_to_float32(np.array([0x3F80, 0xC000, 0x7F80], np.uint16)).tolist() == [1.0, -2.0, np.inf]


def test_reader_finds_the_state_dict_and_its_meta():
    content = read_torch_checkpoint(SMALL)
    assert content["meta"]["layers"] == list(LAYERS)
    state = torch_state_dict(SMALL)
    assert state["conv1.weight"].shape == (WIDTH, 3, 3, 7, 7)
    assert state["bn1.num_batches_tracked"].dtype == np.int64


class Exploit:
    def __reduce__(self):
        return os.system, ("touch exploited",)


def test_reader_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = rewrite(SMALL, tmp_path / "evil.pt",
                   lambda name, data: pickle.dumps({"state_dict": Exploit()}, protocol=2)
                   if name.endswith("data.pkl") else data)
    with pytest.raises(PretrainedWeightsError, match=r"evil\.pt: refused pickle record '(posix|nt)\.system'"):
        read_torch_checkpoint(evil)
    assert not (tmp_path / "exploited").exists()


def test_reader_refuses_other_storage_dtypes_by_name(tmp_path):
    double = rewrite(DTYPES, tmp_path / "double.pt",
                     lambda name, data: data.replace(b"FloatStorage", b"DoubleStorage")
                     if name.endswith("data.pkl") else data)
    with pytest.raises(PretrainedWeightsError, match=r"double\.pt: storage class 'torch\.DoubleStorage' is not read"):
        read_torch_checkpoint(double)


def write_tensor_view(path, monkeypatch, numel, size, stride, offset):
    """A torch.save zip of one float32 storage of `numel` elements and one tensor viewing it,
    pickled as torch would (stand-in `torch` modules: the test needs no torch)."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        pass

    FloatStorage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
    FloatStorage.__qualname__, _rebuild_tensor_v2.__qualname__ = "FloatStorage", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    storage = object()

    class Tensor:
        def __reduce__(self):
            return _rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", numel) if obj is storage else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"weight": Tensor()})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes())
    return path


@pytest.mark.parametrize("size, stride, offset", [
    ((100000,), (-1,), 0),           # a negative stride reads before the storage
    ((4,), (-100000000,), 3),        # ... far before it
    ((4,), (1,), -1),                # a negative offset
    ((3, 4), (4, 1), 1),             # past the storage's end by one element
    ((5, 12), (0, 1), 0),            # a broadcast view larger than its storage
    ((12,), (1, 1), 0),              # a stride list that does not match the size
    ((2.9,), (1,), 0),               # not whole numbers: never rounded or parsed
    (("5",), (1,), 0),
    ((True, True), (1, 1), 0),
    ((3,), (2.5,), 0),
    ((3,), (1,), "2"),
])
def test_reader_refuses_a_tensor_that_is_not_a_view_inside_its_storage(tmp_path, monkeypatch, size, stride, offset):
    path = write_tensor_view(tmp_path / "view.pt", monkeypatch, 12, size, stride, offset)
    with pytest.raises(PretrainedWeightsError, match=r"view\.pt: unreadable pickle .*storage data/0"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("size, stride, offset, values", [
    ((3, 4), (4, 1), 0, np.arange(12).reshape(3, 4)),
    ((4, 3), (1, 4), 0, np.arange(12).reshape(3, 4).T),   # a transposed view
    ((2, 2), (4, 1), 6, [[6, 7], [10, 11]]),              # a view ending on the storage's last element
    ((0, 4), (4, 1), 12, np.zeros((0, 4))),               # an empty tensor at the end
])
def test_reader_rebuilds_views_inside_their_storage(tmp_path, monkeypatch, size, stride, offset, values):
    path = write_tensor_view(tmp_path / "view.pt", monkeypatch, 12, size, stride, offset)
    np.testing.assert_array_equal(read_torch_checkpoint(path)["weight"], np.asarray(values, np.float32))


@pytest.mark.parametrize("fault, message", [
    ("corrupt", r"corrupt\.pt: not a torch\.save zip checkpoint"),
    ("truncated", r"truncated\.pt: not a torch\.save zip checkpoint"),
    ("foreign", r"foreign\.pt: not a torch\.save checkpoint \(a zip without one '<name>/data\.pkl'"),
    ("missing_storage", r"missing_storage\.pt: record .*data/0 is missing"),
    ("short_storage", r"^\S*short_storage\.pt: record \S*data/0 holds \d+ bytes, its storage record says"),
    ("absent", r"absent\.pt: checkpoint file does not exist"),
    ("folder", r"folder\.pt: checkpoint file is a folder"),
])
def test_reader_names_the_file_and_the_fault(tmp_path, fault, message):
    path = tmp_path / f"{fault}.pt"
    raw = SMALL.read_bytes()
    if fault == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif fault == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif fault == "foreign":
        np.savez(path, weights=np.zeros(3))  # a zip, but not torch's
        path = path.with_suffix(".pt.npz").rename(path) if not path.exists() else path
    elif fault == "missing_storage":
        rewrite(SMALL, path, lambda name, data: None if name.endswith("/data/0") else data)
    elif fault == "folder":
        path.mkdir()
    elif fault == "short_storage":
        rewrite(SMALL, path, lambda name, data: data[:-4] if name.endswith("/data/0") else data)
    with pytest.raises(PretrainedWeightsError, match=message):
        read_torch_checkpoint(path)


# --- the port's parity with the PyTorch reference ---------------------------------------------

@pytest.mark.parametrize("tag", ["even", "odd"])
def test_port_matches_pytorch_on_every_feature_map(loaded, expected, tag):
    features = loaded(expected[f"{tag}_input"])
    assert len(features) == 5
    for index, feature in enumerate(features):
        reference = expected[f"{tag}_feature{index}"]
        assert tuple(feature.shape) == reference.shape
        error = np.abs(keras.ops.convert_to_numpy(feature) - reference).max() / np.abs(reference).max()
        assert error < 1e-5, (tag, index, error)


def test_batchnorm_stays_in_inference_mode(loaded, expected):
    volume = expected["even_input"]
    before = [keras.ops.convert_to_numpy(v).copy() for v in loaded.non_trainable_weights]
    trained = loaded(volume, training=True)[-1]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(trained),
                                  keras.ops.convert_to_numpy(loaded(volume, training=False)[-1]))
    for old, new in zip(before, loaded.non_trainable_weights):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(new))
    assert all(isinstance(layer, FrozenBatchNormalization) for layer in loaded.layers if "bn" in layer.name)


# --- what load refuses: each tensor fault by name, nothing assigned --------------------------

@pytest.mark.parametrize("layers, width, message", [
    ((1, 2, 1, 2), WIDTH, r"missing: layer4\.1\.conv1\.weight"),
    ((1, 1, 1, 1), WIDTH, r"unexpected: layer2\.1\.conv1\.weight"),
    (LAYERS, 8, r"wrong shape: conv1\.weight: file \(4, 3, 3, 7, 7\), model \(8, 3, 3, 7, 7\)"),
])
def test_load_names_each_bad_tensor_and_assigns_nothing(layers, width, message):
    backbone = i3resnet_backbone(layers=layers, width=width)
    before = [keras.ops.convert_to_numpy(w).copy() for w in backbone.weights]
    with pytest.raises(PretrainedWeightsError, match=rf"(?s)i3resnet_small\.pt: the state dict does not fit .*{message}"):
        load_i3resnet_weights(backbone, SMALL)
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(new))


def test_a_checkpoint_of_another_network_is_summarised_not_listed_whole():
    with pytest.raises(PretrainedWeightsError) as error:
        load_i3resnet_weights(i3resnet_backbone(layers=(2, 2, 2, 2), width=8), SMALL)
    lines = str(error.value).splitlines()
    total = int(re.search(r"\((\d+) problem\(s\): (\d+) missing, (\d+) wrong shape\)", lines[0]).group(1))
    assert total > 25 and len(lines) == 1 + 20 + 1 and lines[-1] == f"  ... and {total - 20} more"


def test_load_refuses_a_non_finite_tensor(tmp_path):
    state = read_i3resnet_state(SMALL)
    targets, _ = i3resnet_targets(i3resnet_backbone(layers=LAYERS, width=WIDTH))
    assert set(targets) == {k for k in state if not k.endswith("num_batches_tracked")}
    raw = SMALL.read_bytes()
    nan = np.float32(np.nan).tobytes()

    def poison(name, data):
        return nan + data[4:] if name.endswith("/data/0") else data

    with pytest.raises(PretrainedWeightsError, match=r"(?s)poisoned\.pt: .*not finite \(NaN or Inf\): "):
        load_i3resnet_weights(i3resnet_backbone(layers=LAYERS, width=WIDTH), rewrite(SMALL, tmp_path / "poisoned.pt",
                                                                                     poison))
    assert raw == SMALL.read_bytes()


# --- UNICON growth on the pretrained encoder ----------------------------------------------------

@pytest.fixture(scope="module")
def grown(expected):
    """A tiny pretrained I3ResNet grown through the four kinds of stage, outputs kept per stage."""
    volume = expected["even_input"][:1]
    inputs = {"ct": volume, "pet": np.flip(volume, axis=1).copy()}
    model = unicon_tf.foundation(volume.shape[1:4], encoder="i3resnet", layers=LAYERS, width=WIDTH, weights=SMALL,
                                 task="classification")
    history = []
    steps = [dict(task="prognosis", adapters=2),
             dict(task="segmentation", side_encoder=2, decoder_channels=8),
             dict(task="segmentation", modality="pet", adapters=2, adapter_start=2, name="segmentation_ctpet")]
    for step in steps:
        before = model.predict({k: inputs[k] for k in model.input}, verbose=0)
        model = unicon_tf.expand(model, **step)
        after = model.predict({k: inputs[k] for k in model.input}, verbose=0)
        history.append((before, after))
    return model, inputs, history


def test_expand_keeps_old_heads_bit_identical(grown):
    model, _, history = grown
    for before, after in history:
        for name, value in before.items():
            np.testing.assert_array_equal(value, after[name], err_msg=name)
    info = unicon_tf.describe(model)
    assert info["encoder"]["kind"] == "i3resnet" and info["encoder"]["levels"][-1][-1] == 32 * WIDTH
    assert info["encoder"]["adapters"]["prognosis"]["params"] > 0
    assert model.output["segmentation_ctpet"].shape[1:4] == model.input["ct"].shape[1:4]
    capped, full = (info["heads"][h]["params"] for h in ("segmentation", "segmentation_ctpet"))
    assert capped < full / 3  # decoder_channels=8 (and a side encoder) against the skips' 16 to 128 channels


def test_pretrained_weights_reach_the_grown_encoder(grown, loaded):
    encoder = model_parts(grown[0])["encoder"]
    for mine, reference in zip(encoder.base_weights(), loaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(reference))


def test_keras_round_trip(grown, tmp_path):
    model, inputs, _ = grown
    expected_outputs = model.predict(inputs, verbose=0)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    for name, value in restored.predict(inputs, verbose=0).items():
        np.testing.assert_array_equal(value, expected_outputs[name], err_msg=name)


def test_savedmodel_export_parity(expected, tmp_path):
    volume = expected["even_input"][:1]
    model = unicon_tf.foundation(volume.shape[1:4], encoder="i3resnet", layers=LAYERS, width=WIDTH, weights=SMALL)
    model = unicon_tf.expand(model, task="prognosis", adapters=2)
    folder = export_model(model, tmp_path / "saved_models", "i3resnet", parity_batch={"ct": volume})  # checks parity
    assert (folder / "saved_model.pb").is_file()


# --- training on the frozen pretrained encoder: features extracted once ------------------------

@pytest.mark.slow
def test_frozen_pretrained_encoder_trains_heads_on_cached_multiscale_features(phantom_cohort, tmp_path):
    """Stage 0 caches all five levels; the CT+PET stage (`adapter_start: 4`, no augmentation)
    caches CT levels 0-3 and both volumes, trains the fusion, layer4's path and the head, and
    leaves the CT head's outputs bit-identical."""
    import yaml

    from unicon_tf import data, train
    from unicon_tf.model.paths import head_path
    from unicon_tf.train.baselines import train_single_task

    records = tmp_path / "ct32"
    data.ingest(phantom_cohort, records, data.Preprocessing(shape=(32, 32, 16), spacing=(6.0, 6.0, 12.0)),
                workers=1, verbose=False)
    spec = {"name": "tiny_i3", "input_shape": [32, 32, 16],
            "encoder": {"kind": "i3resnet", "layers": list(LAYERS), "width": WIDTH, "weights": str(SMALL)},
            "defaults": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "seed": 1, "strategy": "frozen"},
            "stages": [{"name": "segmentation", "task": "segmentation", "decoder_channels": 8, "data": str(records)},
                       {"name": "pet", "task": "segmentation", "modality": "pet", "head": "segmentation_ctpet",
                        "adapter_start": 4, "side_encoder": 4, "augment": False, "decoder_channels": 8,
                        "data": str(records)}]}
    path = tmp_path / "tiny_i3.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    record = train.train_stage(train.load_pipeline(path), "segmentation", tmp_path / "run", verbose=0)
    assert record["cached_features"] is True  # stage 0: the pretrained encoder stays frozen under `frozen`
    splits = data.read_schema(records)["splits"]
    patients = splits["train"]["count"] + splits["val"]["count"]
    levels = [(16, 16, 16, 4), (8, 8, 8, 16), (4, 4, 4, 32), (2, 2, 2, 64), (1, 1, 1, 128)]  # all five, float32
    assert record["cache_bytes"] == 4 * sum(np.prod(s) for s in levels) * patients
    trained = keras.models.load_model(tmp_path / "run/stages/00-segmentation/model.keras")
    reference = i3resnet_backbone(layers=LAYERS, width=WIDTH)
    load_i3resnet_weights(reference, SMALL)
    for mine, published in zip(model_parts(trained)["encoder"].base_weights(), reference.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(published))

    record = train.train_stage(train.load_pipeline(path), "pet", tmp_path / "run", verbose=0)
    grown = keras.models.load_model(tmp_path / "run/stages/01-pet/model.keras")
    assert record["cached_features"] is True
    assert record["cache_bytes"] == 4 * (sum(np.prod(s) for s in levels[:4]) + 2 * 32 * 32 * 16) * patients
    configure_trainable(grown, 1, "frozen", pretrained=True)
    assert [node.operation.name for node in head_path(grown, "segmentation_ctpet").nodes] == [
        "stem_pet", "fusion_ct_pet_level4", "encoder", "segmentation_ctpet"]
    x = {m: np.random.default_rng(5).uniform(0, 1, (2, 32, 32, 16, 1)).astype("float32") for m in ("ct", "pet")}
    np.testing.assert_array_equal(grown(x)["segmentation"].numpy(), trained({"ct": x["ct"]})["segmentation"].numpy())
    mixing = keras.ops.convert_to_numpy(model_parts(grown)["fusions"][("ct", "pet")].mixing)
    assert np.abs(mixing[mixing.shape[1]:]).max() > 0  # PET's rows trained away from their zero start

    # Its single-task baseline fuses PET at the same level, so it trains on a cached prefix too.
    alone = train_single_task(train.load_pipeline(path), tmp_path / "run", "pet")
    assert alone.record()["cached_features"] is True
    assert model_parts(keras.models.load_model(alone.model))["fusions"][("ct", "pet")].level == 4


@pytest.mark.parametrize("strategy, pretrained, trains", [("frozen", True, False), ("adapters", True, False),
                                                          ("finetune", True, True), ("adapters", False, True)])
def test_stage_0_trains_a_pretrained_encoder_only_when_the_strategy_fine_tunes(strategy, pretrained, trains):
    """The CT+PET single-task baseline of an `adapters` stage once fine-tuned the whole published
    encoder (BatchNorm in inference mode) at the head's learning rate, and went NaN."""
    model = unicon_tf.foundation((16, 32, 32), modality=["ct", "pet"], encoder="i3resnet", layers=LAYERS,
                                 width=WIDTH, weights=SMALL, task="classification")
    configure_trainable(model, 0, strategy, pretrained=pretrained)
    parts = model_parts(model)
    assert bool(parts["encoder"].trainable_weights) is trains
    assert all(part.trainable_weights for group in ("fusions", "heads") for part in parts[group].values())
