"""Stage files by reference to a base weights file (unicon_tf.model.storage), on the tiny I3ResNet fixture."""

import io
import pathlib
import shutil
import zipfile

import click
import h5py
import keras
import numpy as np
import pytest

import unicon_tf
from unicon_tf.files import sha256
from unicon_tf.model.storage import StorageError, load_model, read_manifest, save_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SMALL = FIXTURES / "i3resnet_small.pt"


def dataset_bytes(tree):
    sizes = []
    tree.visititems(lambda _, item: sizes.append(item.nbytes) if isinstance(item, h5py.Dataset) else None)
    return sum(sizes)


def weights_by_path(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A run folder with two stages of the pretrained tiny I3ResNet saved by reference (forced)."""
    run = tmp_path_factory.mktemp("run")  # its run.json is written once the first stage is saved, as a run does
    first = unicon_tf.foundation((16, 32, 32), encoder="i3resnet", layers=(1, 2, 1, 1), width=4, weights=SMALL,
                                 task="classification")
    second = unicon_tf.expand(first, task="prognosis", adapters=2)
    models, saved = [first, second], []
    for index, model in enumerate(models):
        path = run / "stages" / f"0{index}-stage" / "model.keras"
        path.parent.mkdir(parents=True)
        saved.append((path, save_model(model, path, by_reference=True)))
        (run / "run.json").write_text("{}")
    return run, models, saved


def test_reload_is_bit_identical_and_later_stages_store_only_what_they_added(stages):
    run, models, saved = stages
    (first, info0), (second, info1) = saved
    base = run / "weights" / f"{sha256(info0['base'])}.weights.h5"
    assert info0["base"] == info1["base"] == base
    assert info0["stored"] == 0 and info1["referenced"] >= info0["referenced"] > len(models[0].weights) / 2
    assert 0 < info1["stored"] < len(models[1].weights) - len(models[0].weights)  # the prognosis head and adapters
    with zipfile.ZipFile(second) as archive, h5py.File(io.BytesIO(archive.read("delta.weights.h5"))) as delta:
        added = dataset_bytes(delta)
    with h5py.File(base) as shared:
        assert 0 < added < 0.1 * dataset_bytes(shared)
    for model, (path, _) in zip(models, saved):
        restored = load_model(path)
        original, reloaded = weights_by_path(model), weights_by_path(restored)
        assert original.keys() == reloaded.keys()
        for name, value in original.items():
            assert reloaded[name].dtype == value.dtype
            np.testing.assert_array_equal(reloaded[name], value, err_msg=name)
    assert read_manifest(first)["bases"] == {sha256(base): {"path": "../../weights/" + base.name}}
    with pytest.raises(ValueError, match="model.weights.h5"):  # Keras alone cannot read it: no silent wrong model
        keras.models.load_model(second)


def copied_run(stages, folder):
    """`(stage 1's file, the base file)` in a copy of the stages' run folder in `folder`."""
    run, _, saved = stages
    shutil.copytree(run, folder / "run")
    return folder / "run" / saved[1][0].relative_to(run), next((folder / "run" / "weights").glob("*.weights.h5"))


def test_moved_base_is_an_error_naming_stage_base_and_hash(stages, tmp_path):
    stage, base = copied_run(stages, tmp_path)
    load_model(stage)  # the whole run moved: relative references still hold
    copy = stage.parents[2] / "baselines" / "single_task" / "x" / "stages" / "00-x" / "model.keras"
    shutil.copytree(stage.parent, copy.parent)
    load_model(copy)  # a stage folder copied within its run finds the base in the run's weights/
    base.rename(tmp_path / base.name)
    with pytest.raises(StorageError) as error:
        load_model(stage)
    assert all(str(part) in str(error.value) for part in (stage, base, base.name.split(".")[0], "missing"))


def test_the_cli_reports_a_moved_base_in_one_line(stages, tmp_path):
    """Every command that loads a stage goes through `user_errors`: the message, exit 1, no traceback."""
    from click.testing import CliRunner

    from unicon_tf.cli import user_errors

    stage, base = copied_run(stages, tmp_path)
    base.rename(tmp_path / base.name)
    command = click.command()(user_errors(lambda: load_model(stage)))
    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: ") and str(base) in result.output and "missing" in result.output


def test_altered_base_is_an_error_with_expected_and_actual_hash(stages, tmp_path):
    stage, base = copied_run(stages, tmp_path)
    data = bytearray(base.read_bytes())
    data[-100] ^= 0xFF
    base.write_bytes(bytes(data))
    with pytest.raises(StorageError) as error:
        load_model(stage)
    expected = base.name.split(".")[0]
    assert all(str(part) in str(error.value) for part in (stage, base, expected, sha256(base)))


def test_a_small_model_stays_a_plain_keras_file(tmp_path):
    model = unicon_tf.foundation((16, 16, 16), width=4, depth=2, task="classification")
    info = save_model(model, tmp_path / "model.keras")
    assert not info["by_reference"] and read_manifest(tmp_path / "model.keras") is None
    assert not (tmp_path.parent / "weights").exists()
    restored = keras.models.load_model(tmp_path / "model.keras")
    for name, value in weights_by_path(model).items():
        np.testing.assert_array_equal(weights_by_path(restored)[name], value, err_msg=name)


def test_a_copied_run_shares_its_base_weights_file_and_copies_the_rest(tmp_path):
    from unicon_tf.experiment.runner import _copy_run

    run = tmp_path / "foundation"
    base = run / "weights" / f"{'a' * 64}.weights.h5"
    stage = run / "stages" / "00-classification" / "model.keras"
    for path, content in ((base, b"base"), (stage, b"stage"), (run / "weights" / "notes.h5", b"other")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    _copy_run(run, tmp_path / "cell")
    copied = tmp_path / "cell" / base.relative_to(run)
    assert copied.read_bytes() == b"base" and copied.stat().st_ino == base.stat().st_ino  # one file on disk
    for other in (stage, run / "weights" / "notes.h5"):
        twin = tmp_path / "cell" / other.relative_to(run)
        assert twin.read_bytes() == other.read_bytes() and twin.stat().st_ino != other.stat().st_ino
