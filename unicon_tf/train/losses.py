"""Task losses and distillation losses, one pair per task kind (TensorFlow via keras.ops).

| task             | task loss                                  | distillation (student vs teacher) |
|------------------|--------------------------------------------|-----------------------------------|
| `classification` | cross-entropy on logits                    | KL, temperature T (times T^2)     |
| `prognosis`      | negative Cox partial log-likelihood        | mean squared error of the risks   |
| `segmentation`   | soft Dice (foreground) + cross-entropy     | voxel-wise KL, temperature T      |

Every task loss takes an optional per-patient `sample_weight` `(B,)` (as Keras passes it
from `fit(..., sample_weight=...)` or `train_on_batch(x, y, sample_weight)`); a weight of
one for every patient gives the unweighted loss.
"""

from keras import ops


def _weights(sample_weight, batch_like):
    """Per-patient weights `(B,)` as float32 (ones when `sample_weight` is None)."""
    if sample_weight is None:
        return ops.ones_like(ops.cast(batch_like, "float32"))
    return ops.cast(ops.reshape(sample_weight, (-1,)), "float32")


def classification_loss(labels, logits, sample_weight=None):
    """Cross-entropy of integer `labels` `(B,)` against `logits` `(B, C)`: the batch mean of
    `sample_weight * cross-entropy` (Keras' `sum_over_batch_size` reduction)."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    logits = ops.cast(logits, "float32")
    per_patient = ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return ops.mean(_weights(sample_weight, labels) * per_patient)


def cox_loss(survival, risk, sample_weight=None):
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    For every observed event i: -(r_i - log sum_{j: t_j >= t_i} exp(r_j)). Censored
    patients enter only the risk sets; tied times share one risk set (Breslow). A batch
    without events contributes 0 (and no gradient). With weights w, the weighted partial
    likelihood (as lifelines' `weights_col`): event i counts w_i times and patient j enters
    the risk sets as w_j exp(r_j); the sum is divided by the weighted number of events.

    Args:
        survival: `(B, 2)` of (time, event).
        risk: `(B,)` predicted log relative hazards.
        sample_weight: optional `(B,)` per-patient weights.

    Example:
    >>> float(cox_loss(ops.convert_to_tensor([[1.0, 1.0], [2.0, 0.0]]), ops.zeros((2,))))  # log 2
    0.6931471824645996
    """
    survival = ops.cast(survival, "float32")
    risk = ops.cast(ops.reshape(risk, (-1,)), "float32")
    time, event = survival[:, 0], survival[:, 1]
    at_risk = time[None, :] >= time[:, None]  # row i: the risk set of t_i (always holds i)
    row_max = ops.max(ops.where(at_risk, risk[None, :], -float("inf")), axis=1, keepdims=True)
    row_max = ops.stop_gradient(row_max)
    weight = _weights(sample_weight, time)
    terms = ops.where(at_risk, weight[None, :] * ops.exp(risk[None, :] - row_max), 0.0)
    # A risk set of zero-weight patients only has sum 0: its (zero-weighted) event must not give 0 * inf.
    log_risk_set = ops.log(ops.maximum(ops.sum(terms, axis=1), 1e-30)) + row_max[:, 0]
    events = ops.sum(weight * event)
    return ops.sum(weight * event * (log_risk_set - risk)) / ops.maximum(events, 1.0)


def dice_ce_loss(mask, logits, smooth=1e-5, sample_weight=None):
    """Soft Dice over the foreground classes plus voxel-wise cross-entropy.

    Args:
        mask: `(B, D, H, W)` integer label map.
        logits: `(B, D, H, W, C)` voxel logits.
        smooth: added to numerator and denominator of each class's Dice.
        sample_weight: optional `(B,)` per-patient weights: each patient's voxels count
            w times in the batch Dice's sums and in the mean cross-entropy.
    """
    classes = logits.shape[-1]
    logits = ops.cast(logits, "float32")
    mask = ops.cast(mask, "int32")
    weight = ops.reshape(_weights(sample_weight, mask[:, 0, 0, 0]), (-1,) + (1,) * (len(logits.shape) - 1))
    probabilities = ops.softmax(logits, axis=-1)
    truth = ops.one_hot(mask, classes)
    axes = tuple(range(len(logits.shape) - 1))
    intersection = ops.sum(weight * probabilities * truth, axis=axes)
    total = ops.sum(weight * probabilities, axis=axes) + ops.sum(weight * truth, axis=axes)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    cross_entropy = ops.mean(weight[..., 0] * ops.sparse_categorical_crossentropy(mask, logits, from_logits=True))
    return 1.0 - ops.mean(dice[1:]) + cross_entropy


def softmax_kl(teacher_logits, student_logits, temperature=2.0):
    """KL(teacher || student) of temperature-softened softmaxes, times T^2, averaged over
    every position (patients, or voxels for segmentation)."""
    teacher_logits, student_logits = ops.cast(teacher_logits, "float32"), ops.cast(student_logits, "float32")
    t = ops.softmax(teacher_logits / temperature, axis=-1)
    log_t = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_s = ops.log_softmax(student_logits / temperature, axis=-1)
    return ops.mean(ops.sum(t * (log_t - log_s), axis=-1)) * temperature**2


def risk_mse(teacher_risk, student_risk, temperature=None):
    """Mean squared difference of risk scores (temperature unused: risks are not softmaxed)."""
    return ops.mean(ops.square(ops.cast(student_risk, "float32") - ops.cast(teacher_risk, "float32")))


TASK_LOSSES = {"classification": classification_loss, "prognosis": cox_loss, "segmentation": dice_ce_loss}
DISTILLATION_LOSSES = {"classification": softmax_kl, "prognosis": risk_mse, "segmentation": softmax_kl}
