"""tf.data pipelines: per-task targets, joint augmentation, determinism, clear refusals."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import PREP_8, patient_row, write_manifest

from unicon_tf import data
from unicon_tf.data.augment import augment_example


def batches(ds):
    return [tf.nest.map_structure(lambda t: t.numpy(), element) for element in ds]


def test_targets_per_task(phantom_records):
    schema = data.read_schema(phantom_records)
    n_train = schema["splits"]["train"]["count"]
    x, y = next(iter(data.dataset(phantom_records, "train", task="classification", batch_size=3)))
    assert set(x) == {"ct", "pet"} and x["ct"].shape == (3, 16, 16, 16, 1) and x["ct"].dtype == tf.float32
    assert y.shape == (3,) and y.dtype == tf.int32
    _, y = next(iter(data.dataset(phantom_records, "train", task="prognosis", batch_size=3)))
    assert y.shape == (3, 2) and np.all(y[:, 0] > 0) and set(np.unique(y[:, 1])) <= {0.0, 1.0}
    ds = data.dataset(phantom_records, "train", task="segmentation", batch_size=4, modalities=["pet"])
    x, y = next(iter(ds))
    assert list(x) == ["pet"] and y.shape == (4, 16, 16, 16) and y.dtype == tf.int32
    assert int(ds.cardinality()) == -(-n_train // 4)
    assert sum(int(b[1].shape[0]) for b in ds) == n_train


def test_same_seed_same_batches_other_seed_differs(phantom_records):
    def make(seed):
        return batches(data.dataset(phantom_records, "train", task="segmentation", batch_size=2,
                                    augment=True, seed=seed))

    first, again, other = make(7), make(7), make(8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0]["ct"], b[0]["ct"])
        np.testing.assert_array_equal(a[1], b[1])
    assert any(not np.array_equal(a[0]["ct"], c[0]["ct"]) for a, c in zip(first, other))
    # A second epoch over the same dataset is shuffled and augmented anew.
    ds = data.dataset(phantom_records, "train", task="segmentation", batch_size=2, augment=True, seed=7)
    epoch1, epoch2 = batches(ds), batches(ds)
    assert any(not np.array_equal(a[0]["ct"], b[0]["ct"]) for a, b in zip(epoch1, epoch2))


def test_augmentation_moves_images_and_mask_together():
    shape = (16, 16, 16)
    zz, yy, xx = np.indices(shape)
    mask = (((zz - 6) ** 2 + (yy - 9) ** 2 + (xx - 7) ** 2) <= 16).astype(np.int32)
    example = {"ct": tf.constant(mask[..., None] * 2.0 - 1.0, tf.float32),
               "pet": tf.constant(mask[..., None] * 1.0, tf.float32), "mask": tf.constant(mask)}
    for s in range(5):
        seed = tf.constant([s, 1], tf.int64)
        flipped = augment_example(example, ["ct", "pet"], seed, max_rotation=0.0, max_scale=0.0, intensity=0.0)
        np.testing.assert_array_equal(flipped["ct"].numpy()[..., 0] > 0, flipped["mask"].numpy() == 1)
        warped = augment_example(example, ["ct", "pet"], seed, max_rotation=10.0, max_scale=0.1)
        image, label = warped["pet"].numpy()[..., 0] > 0.5, warped["mask"].numpy() == 1
        dice = 2 * np.sum(image & label) / (image.sum() + label.sum())
        assert dice > 0.85 and label.sum() > 0.7 * mask.sum()
    assert not np.array_equal(warped["mask"].numpy(), mask)  # it did move


def test_refusals_name_the_field(phantom_records, tmp_path):
    with pytest.raises(data.DataError, match=r"field mri: the cohort has no modality \['mri'\]"):
        data.dataset(phantom_records, "train", modalities=["mri"])
    with pytest.raises(data.DataError, match="schema.json, field splits: no split 'holdout'"):
        data.dataset(phantom_records, "holdout")
    with pytest.raises(ValueError, match="Unknown task 'detection'"):
        data.dataset(phantom_records, "train", task="detection")
    with pytest.raises(data.DataError, match="schema.json is missing"):
        data.dataset(tmp_path, "train")


def test_prognosis_refused_without_survival_columns(tmp_path):
    manifest = write_manifest(tmp_path, [patient_row(tmp_path, "A", label=1)])
    data.ingest(manifest, tmp_path / "out", PREP_8, verbose=False)
    with pytest.raises(data.DataError, match=r"field time/event: the cohort has no \['time', 'event'\]"):
        data.dataset(tmp_path / "out", "train", task="prognosis")
