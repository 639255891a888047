"""Client-side inference on NIfTI files, DICOM series and ITK files with an exported SavedModel.

`predict_nifti` prepares a patient's images exactly as ingestion did (RAS, resampling to
the model's spacing, intensity windows; the metadata of the export says how), runs the
patient-level heads on a crop of the model's input shape, runs each segmentation head by
sliding window over the whole resampled volume (overlapping patches blended with
Gaussian weights, as MONAI's `sliding_window_inference`), and writes label maps back on
the grid of the original CT: as NIfTI always, and as DICOM SEG referencing the source
series when the CT is a DICOM series.
"""

import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import tensorflow as tf

from unicon_tf.data import dicom
from unicon_tf.data.errors import DataError
from unicon_tf.data.manifest import SUV_MODALITY
from unicon_tf.data.preprocess import Preprocessing, crop_or_pad, crop_start, resample, resample_patient
from unicon_tf.data.suv import SUVInputError
from unicon_tf.files import write_json_atomic
from unicon_tf.tasks import task_kind


def check_request(signature: Callable, inputs: Mapping[str, np.ndarray]) -> None:
    """Raise a ValueError naming the input whose rank, shape or dtype the signature refuses.

    Args:
        signature: a concrete function from `loaded.signatures[...]`.
        inputs: `{name: array}` about to be sent.
    """
    specs = signature.structured_input_signature[1]
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise ValueError(f"request lacks input(s) {missing}; the signature takes {sorted(specs)}.")
    for name, spec in specs.items():
        value = np.asarray(inputs[name])
        if value.ndim != spec.shape.rank:
            raise ValueError(f"input '{name}': rank {value.ndim} (shape {value.shape}), expected rank "
                             f"{spec.shape.rank} {tuple(spec.shape)}.")
        if not spec.shape.is_compatible_with(value.shape):
            raise ValueError(f"input '{name}': shape {value.shape} does not match {tuple(spec.shape)}.")
        if value.dtype != spec.dtype.as_numpy_dtype:
            raise ValueError(f"input '{name}': dtype {value.dtype}, expected {spec.dtype.name}.")


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights of a patch: a Gaussian centred on it (sigma = patch * sigma_scale)."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / max(n * sigma_scale, 1e-6)) ** 2) for n in patch]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def _starts(size, patch, step):
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch, step)) + [size - patch]
    return sorted(set(starts))


def sliding_window(predict: Callable[[dict[str, np.ndarray]], np.ndarray], volumes: Mapping[str, np.ndarray],
                   patch: Sequence[int], overlap: float = 0.5, batch_size: int = 4,
                   fill: float = -1.0) -> np.ndarray:
    """Blend a patch-wise predictor over volumes larger (or smaller) than its patch.

    Args:
        predict: callable `{modality: (n, *patch, 1)} -> (n, *patch, C)` probabilities.
        volumes: `{modality: (D, H, W)}` arrays on one grid.
        patch: the predictor's spatial patch `(d, h, w)`.
        overlap: fraction of a patch shared with its neighbour (0 <= overlap < 1).
        batch_size: patches per `predict` call.
        fill: padding value where a volume is smaller than the patch.

    Returns:
        `(D, H, W, C)` blended probabilities.

    Example:
    >>> probabilities = sliding_window(lambda x: np.ones(x["ct"].shape[:4] + (2,)) / 2,
    ...                                {"ct": np.zeros((40, 40, 40))}, patch=(32, 32, 32))
    >>> probabilities.shape
    (40, 40, 40, 2)
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    shape = next(iter(volumes.values())).shape
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch))
    padded = {m: crop_or_pad(v.astype(np.float32), (0, 0, 0), padded_shape, fill) for m, v in volumes.items()}
    steps = [max(1, int(round(p * (1 - overlap)))) for p in patch]
    corners = [(i, j, k) for i in _starts(padded_shape[0], patch[0], steps[0])
               for j in _starts(padded_shape[1], patch[1], steps[1])
               for k in _starts(padded_shape[2], patch[2], steps[2])]
    weights = gaussian_weights(patch)
    total, norm = None, np.zeros(padded_shape, np.float32)
    for first in range(0, len(corners), batch_size):
        group = corners[first:first + batch_size]
        batch = {m: np.stack([v[i:i + patch[0], j:j + patch[1], k:k + patch[2]] for i, j, k in group])[..., None]
                 for m, v in padded.items()}
        probabilities = np.asarray(predict(batch))
        if total is None:
            total = np.zeros(padded_shape + (probabilities.shape[-1],), np.float32)
        for (i, j, k), p in zip(group, probabilities):
            region = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
            total[region] += p * weights[..., None]
            norm[region] += weights
    blended = total / norm[..., None]
    return blended[: shape[0], : shape[1], : shape[2]]


def signature_predictor(signature: Callable, output: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A `predict(batch)` for `sliding_window` from a SavedModel signature and output name."""

    def predict(batch):
        check_request(signature, batch)
        return signature(**{m: tf.constant(v) for m, v in batch.items()})[output].numpy()

    return predict


def predict_nifti(saved_model_dir: pathlib.Path | str, images: Mapping[str, pathlib.Path | str | dicom.SeriesRef],
                  out: pathlib.Path | str, overlap: float = 0.5,
                  scales: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Predict every head of an exported model for one patient's NIfTI images.

    Args:
        saved_model_dir: a version folder written by `export_model`.
        images: `{modality: path}`: a NIfTI or ITK file, or a DICOM series (a folder or a
            `unicon_tf.data.dicom.SeriesRef`); the first modality of the export is the grid.
        out: output folder (created): `prediction.json` and `<head>.nii.gz` label maps on
            the original grid of the reference image, and `<head>.seg.dcm` (DICOM SEG
            referencing the series) when that image is a DICOM series.
        overlap: sliding-window overlap for segmentation heads.
        scales: `{modality: factor}` for this patient's raw values, as the manifest's
            per-patient scaling at ingestion (e.g. `{"pet": SUVbw factor}`, see
            `unicon_tf.data.suv`). A PET given as a DICOM series without a factor gets
            its SUVbw factor from its own tags (`unicon_tf.data.dicom.suv_from_tags`),
            reported under `scales` in the result.

    Returns:
        The prediction dict (also in `prediction.json`): `model`, `version`, `stage` and
        `heads`, `{head: outputs}`: a patient-level head's serving outputs (its task kind's
        `serving_outputs`, e.g. classification `probabilities` and `class`, prognosis `risk`);
        a dense (segmentation) head's `label_map` (the NIfTI file's
        path), `seg` (the DICOM SEG's path, for a DICOM series) and `voxels` per class;
        `{"skipped": reason}` for a head whose modalities were not given.

    Raises:
        DataError: an image ingestion would refuse (unreadable, not 3D, not overlapping
            the reference image, ...), or a reference series a DICOM SEG cannot reference
            (`unicon_tf.data.dicom.seg_sources`), named by file and field.
        ValueError: the reference modality is missing.
    """
    saved_model_dir, out = pathlib.Path(saved_model_dir), pathlib.Path(out)
    info = json.loads((saved_model_dir / "unicon.json").read_text())
    prep = Preprocessing.from_json(info["preprocessing"])
    reference_modality = info["modalities"][0]
    if reference_modality not in images:
        raise ValueError(f"the model's grid is defined by '{reference_modality}': pass --{reference_modality}.")
    scales = dict(scales or {})
    for modality in scales:
        prep.check_per_patient_scale(modality, "predict --scale")
    from_tags = {}
    for modality, how in info.get("scaling", {}).items():
        suv = modality == SUV_MODALITY and "SUVbw" in how  # trained on SUV: a PET series' tags give it
        if suv and modality in images and modality not in scales and dicom.kind_of(images[modality]) == "series":
            try:
                scales[modality] = dicom.suv_from_tags(dicom.suv_tags(images[modality], field=modality))[0]
            except SUVInputError as error:
                raise DataError(f"body-weight SUV from the tags: {error}", file=images[modality],
                                field=modality) from error
            from_tags[modality] = {"factor": scales[modality], "source": dicom.SUV_SOURCE}
        elif modality in images and modality not in scales:
            raise ValueError(f"the model was trained on '{modality}' scaled per patient ({how}): give this "
                             f"patient's factor (--scale {modality} F; see unicon_tf.data.suv.suv_bw_factor).")
    ordered = {reference_modality: images[reference_modality], **images}
    grid = resample_patient(ordered, prep, scales=scales)  # the same loading and checks as ingestion
    volumes, grid_affine = grid.images, grid.affine
    loaded = tf.saved_model.load(str(saved_model_dir))
    patch = tuple(info["input_shape"])
    start = crop_start(grid.body, grid.shape, patch)
    source_shape, source_affine = dicom.native_grid(images[reference_modality])  # label maps go back on it
    series = dicom.kind_of(images[reference_modality]) == "series"
    if series and any(task_kind(spec["task"]).dense for spec in info["heads"].values()):
        dicom.seg_sources(images[reference_modality], field=reference_modality)  # refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": info["model_name"], "version": info["version"], "stage": info.get("stage"), "heads": {}}
    if from_tags:
        result["scales"] = from_tags
    for head, spec in info["heads"].items():
        lacking = [m for m in spec["modalities"] if m not in volumes]
        if lacking:
            result["heads"][head] = {"skipped": f"needs {lacking}"}
            continue
        signature = loaded.signatures[head]
        if task_kind(spec["task"]).dense:
            probabilities = sliding_window(signature_predictor(signature, "probabilities"),
                                           {m: volumes[m] for m in spec["modalities"]}, patch, overlap)
            label_map = np.argmax(probabilities, axis=-1).astype(np.uint8)
            original = resample(label_map, grid_affine, source_affine, source_shape, 0, 0).astype(np.uint8)
            image = nib.Nifti1Image(original, source_affine)
            image.header.set_xyzt_units("mm")
            file = out / f"{head}.nii.gz"
            nib.save(image, str(file))
            values, counts = np.unique(original, return_counts=True)
            result["heads"][head] = {"label_map": str(file), "voxels": {int(v): int(c) for v, c in zip(values, counts)}}
            if series:
                result["heads"][head]["seg"] = str(dicom.write_seg(
                    original, images[reference_modality], out / f"{head}.seg.dcm", classes=probabilities.shape[-1],
                    model_name=info["model_name"], version=info["version"], description=f"{head} (unicon-tf)"))
            continue
        batch = {m: crop_or_pad(volumes[m], start, patch, -1.0)[None, ..., None] for m in spec["modalities"]}
        check_request(signature, batch)
        served = signature(**{m: tf.constant(v) for m, v in batch.items()})
        result["heads"][head] = {key: served[key].numpy()[0].tolist() for key in sorted(served)}
    write_json_atomic(out / "prediction.json", result)
    return result
