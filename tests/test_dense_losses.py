"""Losses and sampling for small lesions (issue 17): per-patient soft Dice, lesion-weighted
cross-entropy, foreground-biased crop sampling in tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from unicon_tf import data
from unicon_tf.data.sampling import foreground_crop
from unicon_tf.tasks import task_kind
from unicon_tf.tasks.losses import dice_ce_loss, lesion_voxel_weights


def masks_and_logits(seed=0):
    """Two patients: a large lesion predicted well, a small one missed entirely."""
    mask = np.zeros((2, 8, 8, 8), "int32")
    mask[0, 1:7, 1:7, 1:7] = 1  # 216 voxels
    mask[1, 3:5, 3:5, 3] = 1  # 4 voxels
    logits = np.zeros((2, 8, 8, 8, 2), "float32")
    logits[0, ..., 1] = np.where(mask[0] == 1, 6.0, -6.0)
    logits[1, ..., 1] = -6.0  # the small lesion is missed
    return tf.constant(mask), tf.constant(logits)


def soft_dice(p, t, smooth=1e-5):
    return (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def test_per_patient_dice_counts_a_missed_small_lesion_as_a_missed_patient():
    mask, logits = masks_and_logits()
    probability = tf.nn.softmax(logits)[..., 1].numpy()
    truth = mask.numpy().astype("float32")
    ce = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(mask, logits, from_logits=True)).numpy()
    pooled = 1 - soft_dice(probability, truth) + ce
    per_patient = 1 - np.mean([soft_dice(probability[i], truth[i]) for i in range(2)]) + ce
    np.testing.assert_allclose(float(dice_ce_loss(mask, logits)), pooled, atol=1e-5)
    np.testing.assert_allclose(float(dice_ce_loss(mask, logits, dice="per_patient")), per_patient, atol=1e-5)
    assert per_patient - pooled > 0.4  # the pooled Dice barely sees the missed lesion
    weighted = float(dice_ce_loss(mask, logits, dice="per_patient", sample_weight=tf.constant([1.0, 0.0])))
    assert weighted < float(dice_ce_loss(mask, logits, dice="per_patient"))  # patient 2's Dice weighted out


def test_lesion_weighting_gives_each_lesion_half_its_patients_weight():
    mask, logits = masks_and_logits()
    weights = lesion_voxel_weights(mask).numpy()
    for patient in range(2):
        lesion = mask.numpy()[patient] > 0
        np.testing.assert_allclose(weights[patient][lesion].sum(), 256.0, rtol=1e-6)
        np.testing.assert_allclose(weights[patient].sum(), 512.0, rtol=1e-6)
    assert weights[1][mask.numpy()[1] > 0][0] == pytest.approx(64.0)  # 512 / (2 * 4): small lesion, large weight
    none = lesion_voxel_weights(tf.zeros((1, 4, 4, 4), "int32")).numpy()
    assert np.all(none == 1.0)
    plain = float(dice_ce_loss(mask, logits, dice="per_patient"))
    assert float(dice_ce_loss(mask, logits, dice="per_patient", ce_weighting="lesion")) > plain + 1.0


def test_trainer_uses_the_stage_loss_options():
    import keras

    import unicon_tf
    from unicon_tf.train.continual import ContinualModel

    network = unicon_tf.foundation((8, 8, 8), task="segmentation", width=4, depth=2)
    mask, logits = masks_and_logits()
    x = {"ct": np.random.default_rng(0).normal(size=(2, 8, 8, 8, 1)).astype("float32")}
    losses = {}
    for dice in ("pooled", "per_patient"):
        trainer = ContinualModel(network, {"segmentation": "segmentation"},
                                 loss_options={"segmentation": {"dice": dice}})
        trainer.compile(optimizer=keras.optimizers.AdamW(1e-3))
        losses[dice] = trainer.evaluate(x, {"segmentation": mask.numpy()}, verbose=0, return_dict=True)["loss"]
        expected = dice_ce_loss(mask, network(x)["segmentation"], dice=dice)
        assert losses[dice] == pytest.approx(float(expected), rel=1e-5)
    assert losses["pooled"] != losses["per_patient"]


def test_loss_options_are_checked():
    with pytest.raises(ValueError, match=r"loss option dice = 'mean' is not one of \['pooled', 'per_patient'\]"):
        task_kind("segmentation").check_loss_options({"dice": "mean"})
    with pytest.raises(ValueError, match=r"unknown loss option\(s\) \['dice'\] for a prognosis task \(it has none\)"):
        task_kind("prognosis").check_loss_options({"dice": "pooled"})


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_foreground_crop_centres_on_lesion_or_background_and_moves_images_with_the_mask(probability):
    mask = np.zeros((8, 8, 8), "int32")
    mask[1:3, 5:7, 2:4] = 1
    ct = np.where(mask[..., None] > 0, 0.5, 0.0).astype("float32")  # the image marks the lesion too
    centres = []
    for seed in range(20):
        out = foreground_crop({"ct": tf.constant(ct), "mask": tf.constant(mask)}, ["ct"], tf.constant([seed, 1]),
                              probability)
        moved, image = out["mask"].numpy(), out["ct"].numpy()[..., 0]
        assert moved.shape == (8, 8, 8) and image.shape == (8, 8, 8)
        np.testing.assert_array_equal(image == 0.5, moved > 0)  # still aligned
        assert set(np.unique(image)) <= {-1.0, 0.0, 0.5}  # outside the stored crop: the window's low value
        centres.append(moved[4, 4, 4])
    assert all(c == (1 if probability == 1.0 else 0) for c in centres)


def test_dataset_samples_training_patches_around_lesions(phantom_records):
    def centre_lesion_fraction(probability, seed):
        ds = data.dataset(phantom_records, "train", task="segmentation", batch_size=8, seed=seed,
                          foreground_probability=probability)
        masks = np.concatenate([m.numpy() for _, m in ds])
        return masks[:, 8, 8, 8].mean(), masks

    always, masks = centre_lesion_fraction(1.0, 0)
    never, _ = centre_lesion_fraction(0.0, 0)
    assert always == 1.0 and never == 0.0
    again, masks_again = centre_lesion_fraction(1.0, 0)
    np.testing.assert_array_equal(masks, masks_again)  # seeded: the same patches every run
    with pytest.raises(ValueError, match=r"foreground_probability = 2.0 must be a number in \[0, 1\]"):
        data.dataset(phantom_records, "train", task="segmentation", foreground_probability=2.0)
