"""Task losses and distillation losses of the task kinds (`unicon_tf.tasks`; TensorFlow via keras.ops).

| task             | task loss                                  | distillation (student vs teacher) |
|------------------|--------------------------------------------|-----------------------------------|
| `classification` | cross-entropy on logits                    | KL, temperature T (times T^2)     |
| `prognosis`      | negative Cox partial log-likelihood        | mean squared error of the risks   |
| `segmentation`   | soft Dice (foreground) + cross-entropy     | voxel-wise KL, temperature T      |

Every task loss takes an optional per-patient `sample_weight` `(B,)` (as Keras passes it
from `fit(..., sample_weight=...)` or `train_on_batch(x, y, sample_weight)`); a weight of
one for every patient gives the unweighted loss.

The segmentation loss has options (its kind's `loss_options`, a stage's `loss:` mapping) for small
lesions, which a Dice pooled over the batch's voxels and a plain voxel cross-entropy
under-weight (a lesion of 30 voxels beside one of 3000 barely moves either):

- `dice: per_patient` computes the soft Dice of each patient and averages it over
  patients (what evaluation reports, the per-patient mean Dice), instead of one Dice of
  the voxels pooled over the batch (`pooled`, the default; as MONAI's `DiceLoss` with
  `batch=True` vs `batch=False`);
- `ce_weighting: lesion` weights each patient's voxels by inverse class volume, so that
  the lesion and the background each carry half of the patient's cross-entropy weight
  (foreground voxels n / (2 n_lesion), background n / (2 (n - n_lesion)); a patient
  without lesion keeps weight 1 everywhere): a small lesion counts as much as a large
  one (inverse-frequency class weighting, per image).
"""

from typing import TYPE_CHECKING

from keras import ops

if TYPE_CHECKING:
    import tensorflow as tf

DICE_MODES = ("pooled", "per_patient")
"""`dice_ce_loss(dice=...)` values, the default first."""
CE_WEIGHTINGS = ("none", "lesion")
"""`dice_ce_loss(ce_weighting=...)` values, the default first."""


def patient_weights(sample_weight: "tf.Tensor | None", batch_like: "tf.Tensor") -> "tf.Tensor":
    """Per-patient weights `(B,)` as float32 (ones when `sample_weight` is None)."""
    if sample_weight is None:
        return ops.ones_like(ops.cast(batch_like, "float32"))
    return ops.cast(ops.reshape(sample_weight, (-1,)), "float32")


def classification_loss(labels: "tf.Tensor", logits: "tf.Tensor",
                        sample_weight: "tf.Tensor | None" = None) -> "tf.Tensor":
    """Cross-entropy of integer `labels` `(B,)` against `logits` `(B, C)`: the batch mean of
    `sample_weight * cross-entropy` (Keras' `sum_over_batch_size` reduction)."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    logits = ops.cast(logits, "float32")
    per_patient = ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return ops.mean(patient_weights(sample_weight, labels) * per_patient)


def cox_loss(survival: "tf.Tensor", risk: "tf.Tensor", sample_weight: "tf.Tensor | None" = None) -> "tf.Tensor":
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
    weight = patient_weights(sample_weight, time)
    terms = ops.where(at_risk, weight[None, :] * ops.exp(risk[None, :] - row_max), 0.0)
    # A risk set of zero-weight patients only has sum 0: its (zero-weighted) event must not give 0 * inf.
    log_risk_set = ops.log(ops.maximum(ops.sum(terms, axis=1), 1e-30)) + row_max[:, 0]
    events = ops.sum(weight * event)
    return ops.sum(weight * event * (log_risk_set - risk)) / ops.maximum(events, 1.0)


def dice_ce_loss(mask: "tf.Tensor", logits: "tf.Tensor", smooth: float = 1e-5, sample_weight: "tf.Tensor | None" = None,
                 dice: str = "pooled", ce_weighting: str = "none") -> "tf.Tensor":
    """Soft Dice over the foreground classes plus voxel-wise cross-entropy.

    Args:
        mask: `(B, D, H, W)` integer label map.
        logits: `(B, D, H, W, C)` voxel logits.
        smooth: added to numerator and denominator of each class's Dice.
        sample_weight: optional `(B,)` per-patient weights: each patient's voxels count
            w times in the batch Dice's sums (`pooled`; `per_patient`: each patient's Dice
            counts w times in the mean) and in the mean cross-entropy.
        dice: `pooled` (one Dice of the batch's voxels) or `per_patient` (the mean of
            each patient's Dice).
        ce_weighting: `none` or `lesion` (inverse class volume per patient, see the
            module docstring).

    Returns:
        A scalar: 1 - mean foreground Dice + cross-entropy.

    Example:
    >>> mask = ops.convert_to_tensor([[[[0, 1], [0, 0]]], [[[1, 1], [1, 0]]]])  # (2, 1, 2, 2)
    >>> logits = ops.stack([ops.zeros((2, 1, 2, 2)), 4.0 * ops.cast(mask, "float32") - 2.0], axis=-1)
    >>> [round(float(dice_ce_loss(mask, logits, dice=d)), 4) for d in ("pooled", "per_patient")]
    [0.2461, 0.2748]
    """
    for option, value, values in (("dice", dice, DICE_MODES), ("ce_weighting", ce_weighting, CE_WEIGHTINGS)):
        if value not in values:
            raise ValueError(f"loss option {option} = {value!r} is not one of {list(values)}.")
    classes = logits.shape[-1]
    logits = ops.cast(logits, "float32")
    mask = ops.cast(mask, "int32")
    patient_weight = patient_weights(sample_weight, mask[:, 0, 0, 0])
    weight = ops.reshape(patient_weight, (-1,) + (1,) * (len(logits.shape) - 1))
    probabilities = ops.softmax(logits, axis=-1)
    truth = ops.one_hot(mask, classes)
    spatial = tuple(range(1, len(logits.shape) - 1))
    if dice == "per_patient":
        intersection = ops.sum(probabilities * truth, axis=spatial)  # (B, C)
        total = ops.sum(probabilities, axis=spatial) + ops.sum(truth, axis=spatial)
        per_patient = ops.mean(((2.0 * intersection + smooth) / (total + smooth))[:, 1:], axis=-1)
        mean_dice = ops.sum(patient_weight * per_patient) / ops.maximum(ops.sum(patient_weight), 1e-12)
    else:
        axes = (0,) + spatial
        intersection = ops.sum(weight * probabilities * truth, axis=axes)
        total = ops.sum(weight * probabilities, axis=axes) + ops.sum(weight * truth, axis=axes)
        mean_dice = ops.mean(((2.0 * intersection + smooth) / (total + smooth))[1:])
    voxel_weight = weight[..., 0]
    if ce_weighting == "lesion":
        voxel_weight = voxel_weight * lesion_voxel_weights(mask)
    cross_entropy = ops.mean(voxel_weight * ops.sparse_categorical_crossentropy(mask, logits, from_logits=True))
    return 1.0 - mean_dice + cross_entropy


def lesion_voxel_weights(mask: "tf.Tensor") -> "tf.Tensor":
    """Per-voxel weights `(B, D, H, W)` that give each patient's lesion (label > 0) and
    background half of its cross-entropy weight each: n / (2 n_lesion) on the lesion,
    n / (2 (n - n_lesion)) elsewhere, 1 everywhere for a patient without lesion; each
    patient's weights sum to n, its voxel count.

    Example:
    >>> w = lesion_voxel_weights(ops.convert_to_tensor([[[[0, 0], [0, 1]]]]))  # 1 of 4 voxels
    >>> [round(float(v), 3) for v in ops.reshape(w, (-1,))]
    [0.667, 0.667, 0.667, 2.0]
    """
    lesion = ops.cast(mask > 0, "float32")
    spatial = tuple(range(1, len(mask.shape)))
    count = ops.sum(ops.ones_like(lesion), axis=spatial, keepdims=True)
    n_lesion = ops.sum(lesion, axis=spatial, keepdims=True)
    n_background = count - n_lesion
    weights = lesion * count / (2.0 * ops.maximum(n_lesion, 1.0)) \
        + (1.0 - lesion) * count / (2.0 * ops.maximum(n_background, 1.0))
    has_both = ops.logical_and(n_lesion > 0, n_background > 0)
    return ops.where(has_both, weights, ops.ones_like(weights))


def softmax_kl(teacher_logits: "tf.Tensor", student_logits: "tf.Tensor", temperature: float = 2.0) -> "tf.Tensor":
    """KL(teacher || student) of temperature-softened softmaxes, times T^2, averaged over
    every position (patients, or voxels for segmentation)."""
    teacher_logits, student_logits = ops.cast(teacher_logits, "float32"), ops.cast(student_logits, "float32")
    t = ops.softmax(teacher_logits / temperature, axis=-1)
    log_t = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_s = ops.log_softmax(student_logits / temperature, axis=-1)
    return ops.mean(ops.sum(t * (log_t - log_s), axis=-1)) * temperature**2


def risk_mse(teacher_risk: "tf.Tensor", student_risk: "tf.Tensor", temperature: float | None = None) -> "tf.Tensor":
    """Mean squared difference of risk scores (temperature unused: risks are not softmaxed)."""
    return ops.mean(ops.square(ops.cast(student_risk, "float32") - ops.cast(teacher_risk, "float32")))
