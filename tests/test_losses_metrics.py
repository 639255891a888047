"""Losses and metrics against NumPy, scikit-survival and scikit-learn references."""

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from unicon_tf.tasks import losses, metrics, task_kind


def cox_reference(time, event, risk):
    """Negative Cox partial log-likelihood (Breslow) and its gradient, in NumPy."""
    n_events = max(event.sum(), 1)
    loss, grad = 0.0, np.zeros_like(risk)
    for i in np.nonzero(event)[0]:
        at_risk = time >= time[i]
        weights = np.exp(risk) * at_risk
        loss += np.log(weights.sum()) - risk[i]
        grad += weights / weights.sum()
        grad[i] -= 1.0
    return loss / n_events, grad / n_events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cox_loss_and_gradient_match_numpy(seed):
    rng = np.random.default_rng(seed)
    time = np.round(rng.exponential(10, 32), 0) + 1  # rounded: many tied times
    event = (rng.random(32) < 0.6).astype(np.float64)
    risk = rng.normal(size=32)
    expected_loss, expected_grad = cox_reference(time, event, risk)
    risk_t = tf.Variable(risk.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.cox_loss(np.stack([time, event], 1).astype(np.float32), risk_t)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss, risk_t).numpy(), expected_grad, rtol=1e-4, atol=1e-6)


def test_cox_loss_without_events_is_zero_with_zero_gradient():
    risk = tf.Variable([0.3, -1.0, 2.0])
    with tf.GradientTape() as tape:
        loss = losses.cox_loss(tf.constant([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]), risk)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(tape.gradient(loss, risk).numpy(), 0.0)


def test_cox_loss_is_stable_for_large_risks():
    loss = losses.cox_loss(tf.constant([[1.0, 1.0], [2.0, 1.0]]), tf.constant([500.0, -500.0]))
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_c_index_equals_scikit_survival(seed):
    rng = np.random.default_rng(seed)
    n = 60
    time = np.round(rng.exponential(5, n), 0) + 1
    event = rng.random(n) < 0.5
    risk = np.round(rng.normal(size=n), 1)  # rounded: tied risks
    expected = concordance_index_censored(event, time, risk)[0]
    assert float(metrics.c_index(time, event, risk)) == pytest.approx(expected, abs=1e-6)
    metric = metrics.ConcordanceIndex(capacity=128)
    for chunk in np.array_split(np.arange(n), 3):  # accumulated over batches
        metric.update_state(np.stack([time[chunk], event[chunk]], 1), risk[chunk])
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    assert int(metric.count) == 0


def test_perfect_predictions_score_one():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    assert float(metrics.c_index(time, [1, 1, 1, 0], -time)) == 1.0
    labels = np.array([0, 1, 1, 0])
    auc = metrics.LogitAUC(2)
    auc.update_state(labels, np.stack([-5.0 * labels + 2.5, 5.0 * labels - 2.5], 1))
    assert float(auc.result()) == pytest.approx(1.0)
    mask = np.zeros((1, 4, 4, 4), np.int32)
    mask[0, 1:3, 1:3, 1:3] = 1
    mask[0, 0, 0, :2] = 2
    dice = metrics.DiceScore(3)
    dice.update_state(mask, np.eye(3)[mask] * 10.0)
    np.testing.assert_allclose(dice.per_class().numpy(), [1.0, 1.0])
    assert float(dice.result()) == 1.0


def test_dice_score_counts_overlap_by_hand():
    truth = np.zeros((1, 4, 4, 4), np.int32)
    truth[0, :2] = 1  # 32 voxels
    predicted = np.zeros_like(truth)
    predicted[0, 1:3] = 1  # 32 voxels, 16 shared
    dice = metrics.DiceScore(2)
    dice.update_state(truth, np.eye(2)[predicted])
    assert float(dice.result()) == pytest.approx(2 * 16 / 64)


def test_training_dice_metrics_match_evaluation_per_patient_and_pooled():
    """Over batches, `<head>_dice` is the per-patient mean and `<head>_dice_pooled` the pooled
    Dice of `tasks.segmentation.segmentation_scores` (`dice`, `dice_pooled`); they differ when a
    small lesion is missed."""
    from unicon_tf.tasks.segmentation import segmentation_scores

    rng = np.random.default_rng(2)
    masks = np.zeros((6, 8, 8, 8), np.int32)
    masks[:3, 1:7, 1:7, 1:7] = 1  # large lesions, well found
    masks[3:, 4:6, 4:6, 4] = 1  # small lesions, mostly missed
    logits = np.stack([1.0 - masks, masks.astype(float)], -1) + rng.normal(0, 0.6, masks.shape + (2,))
    logits = logits.astype(np.float32)
    expected = segmentation_scores(masks, logits)
    per_patient, pooled = task_kind("segmentation").metrics("seg")
    assert (per_patient.name, pooled.name) == ("seg_dice", "seg_dice_pooled")
    for start in (0, 4):  # two batches
        for metric in (per_patient, pooled):
            metric.update_state(masks[start:start + 4], logits[start:start + 4])
    assert float(per_patient.result()) == pytest.approx(expected["dice"], abs=1e-5)
    assert float(pooled.result()) == pytest.approx(expected["dice_pooled"], abs=1e-5)
    assert expected["dice_pooled"] > expected["dice"] + 0.1
    per_patient.reset_state()
    per_patient.update_state(masks[3:], logits[3:])
    assert float(per_patient.result()) == pytest.approx(segmentation_scores(masks[3:], logits[3:])["dice"], abs=1e-5)


def test_auc_matches_scikit_learn_for_three_classes():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[labels]
    auc = metrics.LogitAUC(3, num_thresholds=2000)
    auc.update_state(labels, logits)
    probabilities = tf.nn.softmax(logits).numpy()
    expected = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert float(auc.result()) == pytest.approx(expected, abs=5e-3)


def test_dice_ce_loss_small_for_confident_truth_and_large_for_wrong():
    mask = np.zeros((2, 8, 8, 8), np.int32)
    mask[:, 2:5, 2:5, 2:5] = 1
    right, wrong = np.eye(2)[mask] * 20.0, np.eye(2)[1 - mask] * 20.0
    assert float(losses.dice_ce_loss(mask, right)) < 1e-3
    assert float(losses.dice_ce_loss(mask, wrong)) > 10.0


def test_distillation_losses_vanish_only_when_student_equals_teacher():
    logits = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    assert float(losses.softmax_kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.softmax_kl(logits, logits[::-1])) > 0.01
    assert float(losses.risk_mse(logits[:, 0], logits[:, 0])) == 0.0
    assert float(losses.risk_mse(logits[:, 0], logits[:, 0] + 1.0)) == pytest.approx(1.0)


def test_weighted_cox_loss_equals_duplicated_patients():
    rng = np.random.default_rng(4)
    time = np.round(rng.exponential(10, 12), 0) + 1
    event = (rng.random(12) < 0.6).astype(np.float32)
    risk = rng.normal(size=12).astype(np.float32)
    weight = rng.integers(0, 4, 12)
    survival = np.stack([time, event], -1).astype(np.float32)
    weighted = losses.cox_loss(survival, risk, sample_weight=weight.astype(np.float32))
    duplicated = losses.cox_loss(np.repeat(survival, weight, 0), np.repeat(risk, weight))
    assert float(weighted) == pytest.approx(float(duplicated), rel=1e-5)


def test_weighted_classification_and_segmentation_losses():
    rng = np.random.default_rng(5)
    logits, labels = rng.normal(size=(4, 3)).astype(np.float32), np.array([0, 2, 1, 2])
    weight = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    cross_entropy = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(4), labels]
    assert float(losses.classification_loss(labels, logits, sample_weight=weight)) == pytest.approx(
        float(np.mean(weight * cross_entropy)), rel=1e-5)
    mask = rng.integers(0, 2, (3, 4, 4, 4))
    seg_logits = rng.normal(size=(3, 4, 4, 4, 2)).astype(np.float32)
    ones = losses.dice_ce_loss(mask, seg_logits, sample_weight=np.ones(3, np.float32))
    assert float(ones) == pytest.approx(float(losses.dice_ce_loss(mask, seg_logits)), rel=1e-6)
    dropped = losses.dice_ce_loss(mask, seg_logits, sample_weight=np.array([1.0, 1.0, 0.0], np.float32))
    kept = losses.dice_ce_loss(mask[:2], seg_logits[:2])  # Dice equal; cross-entropy scaled by 2/3
    ce = float(tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(mask[:2], seg_logits[:2],
                                                                               from_logits=True)))
    assert float(dropped) == pytest.approx(float(kept) - ce + ce * 2 / 3, rel=1e-5)


def test_train_on_batch_honours_sample_weight():
    """(x, y, sample_weight) as Keras passes it: weights [2, 0] on two patients give the
    same SGD step as the first patient alone (mean over the batch of w * loss)."""
    import keras

    import unicon_tf
    from unicon_tf.train import ContinualModel

    keras.utils.set_random_seed(0)
    network = unicon_tf.foundation((16, 16, 16), width=8, depth=3)
    start = network.get_weights()
    x = {"ct": np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)}
    y = {"classification": np.array([1, 0])}
    after = {}
    for label, batch in (("weighted", (x, y, np.array([2.0, 0.0], np.float32))),
                         ("first only", ({"ct": x["ct"][:1]}, {"classification": y["classification"][:1]}))):
        network.set_weights(start)
        trainer = ContinualModel(network, {"classification": "classification"})
        trainer.compile(optimizer=keras.optimizers.SGD(0.1))
        logs = trainer.train_on_batch(*batch, return_dict=True)
        after[label] = (logs["loss"], [w.copy() for w in network.get_weights()])
    assert after["weighted"][0] == pytest.approx(after["first only"][0], rel=1e-5)
    assert any(not np.array_equal(a, b) for a, b in zip(after["weighted"][1], start))
    for weighted, alone in zip(after["weighted"][1], after["first only"][1]):
        np.testing.assert_allclose(weighted, alone, rtol=0, atol=1e-5)  # batch 2 vs 1: float32 reduction order
