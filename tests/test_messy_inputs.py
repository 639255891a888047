"""Messy clinical inputs found by trying the CLI as a new user: each test is one member of a
kind of fault, asserting the right value or a refusal naming the file and the field."""

import csv
import pathlib

import nibabel as nib
import numpy as np
import pytest

from conftest import PREP_8, patient_row, write_manifest, write_nifti

from unicon_tf import data
from unicon_tf.data.suv import MAX_DELAY_HALF_LIVES, F18_HALF_LIFE_S, SUVInputError, suv_bw_factor


def test_cells_beyond_the_header_are_refused_not_dropped(tmp_path):
    # "12,0" unquoted in a ',' file: time 12, event 0 and the real event 1 beyond the header.
    rows = [patient_row(tmp_path, "A", time="12", event="1"), patient_row(tmp_path, "B", time="7", event="0")]
    path = write_manifest(tmp_path, rows)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",12,1", ",12,0,1")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match="column 6 holds '1' but has no name") as caught:
        data.read_manifest(path)
    assert caught.value.patient == "A" and caught.value.field == "column 6" and caught.value.file == path
    read = data.read_manifest(path, skip_bad=True)  # a row's own fault: --skip-bad leaves it out
    assert [p.patient_id for p in read.patients] == ["B"] and read.rejected[0][0] == "A"
    lines[0] += ",,"  # blank header cells: a value under one is refused too, empty cells are fine
    lines[1] = lines[1].replace(",12,0,1", ",12,1,,x")
    lines[2] += ",,"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match="column 7 holds 'x'"):
        data.read_manifest(path)
    path.write_text("\n".join(lines).replace(",,x", ",,") + "\n")
    assert [(p.time, p.event) for p in data.read_manifest(path).patients] == [(12.0, 1), (7.0, 0)]


@pytest.mark.parametrize("pid", ["site1/P01", "..", "a\\b", "P\t01"])
def test_patient_id_that_cannot_name_a_file_is_refused(tmp_path, pid):
    rows = [patient_row(tmp_path, "A"), {**patient_row(tmp_path, "B"), "patient_id": pid}]
    path = write_manifest(tmp_path, rows)
    with pytest.raises(data.DataError, match="cannot name a file") as caught:
        data.read_manifest(path)
    assert caught.value.field == "patient_id" and caught.value.file == path
    assert [p.patient_id for p in data.read_manifest(path, skip_bad=True).patients] == ["A"]


GOOD_SUV = {"weight_kg": "70", "injected_dose_bq": "3.7e8", "injection_time": "09:00", "acquisition_time": "10:00",
            "scan_delay_s": "3600"}


def suv_cohort(tmp_path, cells):
    """Patient A with the SUV `cells`, B with good values in the same columns."""
    pet = np.full((8, 8, 8), 5000.0, np.float32)
    rows = [{**patient_row(tmp_path, "A", pet=pet), **cells},
            {**patient_row(tmp_path, "B", pet=pet), **{k: GOOD_SUV[k] for k in cells}}]
    return write_manifest(tmp_path, rows)


@pytest.mark.parametrize("cells, field, message", [
    ({"weight_kg": "70000", "injected_dose_bq": "3.7e8"}, "weight_kg", r"in g or lb\? give kg"),
    ({"weight_kg": "70", "injected_dose_bq": "370"}, "injected_dose_bq", r"in MBq or mCi\? give Bq"),
    ({"weight_kg": "70", "injected_dose_bq": "0"}, "injected_dose_bq", r"must lie in \[1e\+06"),
    ({"weight_kg": "70", "injected_dose_bq": "3.7e8", "injection_time": "10:00", "acquisition_time": "09:00"},
     "acquisition_time", "acquisition before the injection"),  # a time of day wraps to the next day: 23 h
    ({"weight_kg": "70", "injected_dose_bq": "3.7e8", "injection_time": "2024-03-01T09:00",
      "acquisition_time": "2024-03-04T10:00"}, "acquisition_time", "a wrong date"),
    ({"weight_kg": "70", "injected_dose_bq": "3.7e8", "scan_delay_s": "360000"}, "scan_delay_s", "100.0 h"),
])
def test_implausible_suv_inputs_are_refused_with_their_field(tmp_path, cells, field, message):
    path = suv_cohort(tmp_path, cells)
    with pytest.raises(data.DataError, match=message) as caught:
        data.read_manifest(path)
    assert caught.value.patient == "A" and caught.value.field == field
    assert [p.patient_id for p in data.read_manifest(path, skip_bad=True).patients] == ["B"]


def test_suv_across_midnight_and_at_the_delay_bound_is_right(tmp_path):
    path = suv_cohort(tmp_path, {"weight_kg": "70", "injected_dose_bq": "3.7e8", "injection_time": "23:30",
                                 "acquisition_time": "003000"})
    patient = data.read_manifest(path).patients[0]
    assert patient.scales["pet"] == pytest.approx(70000.0 / (3.7e8 * 2 ** (-3600 / F18_HALF_LIFE_S)), rel=1e-12)
    longest = MAX_DELAY_HALF_LIVES * F18_HALF_LIFE_S
    assert suv_bw_factor(70.0, 3.7e8, longest) == pytest.approx(70000.0 / 3.7e8 * 2 ** MAX_DELAY_HALF_LIVES)
    with pytest.raises(SUVInputError) as caught:
        suv_bw_factor(70.0, 3.7e8, longest + 1.0)
    assert caught.value.field == "scan_delay_s"


def test_suv_from_dicom_date_times_spans_days_and_time_zones(tmp_path):
    """DICOM DT (RadiopharmaceuticalStartDateTime, AcquisitionDateTime) as clinical exports write it."""
    path = suv_cohort(tmp_path, {"weight_kg": "70", "injected_dose_bq": "3.7e8",
                                 "injection_time": "20240301233000.000000+0100",
                                 "acquisition_time": "20240301233000+0000"})
    patient = data.read_manifest(path).patients[0]
    assert patient.scales["pet"] == pytest.approx(70000.0 / (3.7e8 * 2 ** (-3600 / F18_HALF_LIFE_S)), rel=1e-12)
    (tmp_path / "bad").mkdir()
    bad = suv_cohort(tmp_path / "bad", {"weight_kg": "70", "injected_dose_bq": "3.7e8",
                                        "injection_time": "20241301093000", "acquisition_time": "20240301103000"})
    with pytest.raises(data.DataError, match="DICOM 20240301093000") as caught:
        data.read_manifest(bad)
    assert caught.value.patient == "A"


def test_image_without_sform_or_qform_warns_that_its_position_is_a_guess(tmp_path):
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), None)  # no affine: both codes 0
    image.header.set_zooms((2.0, 2.0, 2.0))
    nib.save(image, tmp_path / "bare.nii.gz")
    with pytest.warns(data.DataWarning, match=r"bare.nii.gz.*no sform or qform"):
        data.load_volume(tmp_path / "bare.nii.gz", patient="A", field="ct")


def test_image_with_an_empty_dimension_is_named(tmp_path):
    write_nifti(tmp_path / "empty.nii.gz", np.zeros((8, 0, 8), np.float32))
    with pytest.raises(data.DataError, match=r"empty: a dimension of size 0 \(shape \(8, 0, 8\)\)") as caught:
        data.load_volume(tmp_path / "empty.nii.gz", patient="A", field="ct")
    assert caught.value.field == "ct" and caught.value.file == tmp_path / "empty.nii.gz"


PIPELINE = """name: {name}
input_shape: [16, 16, 16]
stages:
  - {{name: {stage}, task: classification, data: ct16}}
"""


@pytest.mark.parametrize("name", ["'chest ct/../x'", "c" * 65, "'ségmentation'", "'../seg'", ".hidden"])
def test_pipeline_and_stage_names_that_cannot_name_a_folder_are_refused(tmp_path, name):
    from unicon_tf.train.pipeline import PipelineError, load_pipeline

    for pipeline_name, stage_name, what in ((name, "grade", "pipeline"), ("tiny", name, "stage")):
        path = tmp_path / "p.yaml"
        path.write_text(PIPELINE.format(name=pipeline_name, stage=stage_name))
        with pytest.raises(PipelineError, match=f"field 'name': {what} name .* it names a folder"):
            load_pipeline(path)


def test_pipeline_and_stage_names_in_any_case_with_hyphens_or_digits_are_kept(tmp_path):
    from unicon_tf.train.pipeline import load_pipeline

    path = tmp_path / "p.yaml"
    for name, stage in (("Chest-CT", "Grade-2"), ("2024", "2024.1")):
        path.write_text(PIPELINE.format(name=name, stage=stage))
        spec = load_pipeline(path)
        assert (spec.name, spec.stages[0].name) == (name, stage)


def test_export_refuses_a_model_name_that_cannot_name_a_folder(tmp_path):
    import unicon_tf
    from unicon_tf import serving

    model = unicon_tf.foundation((16, 16, 16), width=4, depth=2)
    with pytest.raises(serving.ExportError, match="model name '../escape' is not allowed"):
        serving.export_model(model, tmp_path / "base", "../escape")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "base").exists()


@pytest.mark.parametrize("fault", ["empty_safetensors", "truncated_safetensors", "junk_npz", "pickled_npz", "nan"])
def test_corrupt_or_non_finite_pretrained_weights_are_named_and_nothing_assigned(tmp_path, fault):
    import unicon_tf
    from unicon_tf.model.pretrained import PretrainedWeightsError, load_pretrained

    model = unicon_tf.foundation((16, 16, 16), encoder="vit", patch_size=4, hidden_size=32, num_layers=2,
                                 num_heads=2, mlp_dim=64, task="classification")
    before = [w.copy() for w in model.get_weights()]
    state = {"patch_embedding.position_embeddings": np.ones((1, 64, 32), np.float32)}
    if fault.endswith("safetensors"):
        safetensors = pytest.importorskip("safetensors.numpy")
        path = tmp_path / "w.safetensors"
        safetensors.save_file(state, str(path))
        path.write_bytes(b"" if fault.startswith("empty") else path.read_bytes()[:40])
        message = r"unreadable or truncated safetensors state dict \(SafetensorError"
    elif fault == "nan":
        path = tmp_path / "w.npz"
        state["patch_embedding.position_embeddings"][0, 3, 1] = np.nan
        np.savez(path, **state)
        message = r"1 tensor\(s\) hold NaN or Inf: patch_embedding.position_embeddings"
    else:
        path = tmp_path / "w.npz"
        if fault == "junk_npz":
            path.write_bytes(b"PK\x03\x04 not a zip")
        else:
            np.savez(path, a=np.array([{"x": 1}], dtype=object))
        message = r"unreadable or truncated npz state dict"
    with pytest.raises(PretrainedWeightsError, match=f"{path}: {message}"):
        load_pretrained(model, path)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("options, named", [({"num_classes": "two"}, "num_classes"), ({"num_classes": 2.5}, "num_classes"),
                                            ({"num_classes": True}, "num_classes"), ({"num_classes": 1}, "num_classes"),
                                            ({"blocks_per_level": 0}, "blocks_per_level"),
                                            ({"side_encoder": "wide"}, "side_encoder")])
def test_head_options_of_the_wrong_type_or_range_are_refused_at_load_naming_the_field(tmp_path, options, named):
    import yaml
    from click.testing import CliRunner

    from unicon_tf.cli import main
    from unicon_tf.train.pipeline import PipelineError, load_pipeline

    spec = yaml.safe_load((pathlib.Path(__file__).parents[1] / "pipelines" / "chest_ct.yaml").read_text())
    spec["stages"][2].update(options)  # the segmentation stage
    pipeline = tmp_path / "chest_ct.yaml"
    pipeline.write_text(yaml.safe_dump(spec))
    with pytest.raises(PipelineError, match=rf"{pipeline}: stage 'segmentation'.*{named}"):
        load_pipeline(pipeline)
    result = CliRunner().invoke(main, ["compile", str(pipeline), "--output", str(tmp_path / "out.json")])
    assert result.exit_code == 1 and "Traceback" not in result.output and named in result.output
    assert not (tmp_path / "out.json").exists()
