"""Segmentation: voxel logits at input resolution, soft Dice + cross-entropy, per-patient Dice.

| piece          | value                                                                  |
|----------------|------------------------------------------------------------------------|
| target         | the cohort's `mask`, a label map `(D, H, W)` int32                     |
| head           | `SegmentationHead` (UNet decoder); `UNETRHead` on a ViT                |
| loss           | soft Dice + cross-entropy (`loss_options`: `dice`, `ce_weighting`);    |
|                | distillation: voxel-wise KL at temperature T                           |
| metrics        | `dice` (main: per-patient mean), `dice_pooled` (over every voxel)      |
| serving        | `probabilities` `(batch, D, H, W, classes)`, `label_map` `(batch, D, H, W)` |

`dice` is the mean over patients of each patient's Dice (mean over foreground classes);
`dice_pooled` is one Dice over every voxel of the split (see `unicon_tf.tasks.metrics`).

Example:
>>> import numpy as np
>>> masks = np.zeros((2, 4, 4, 4), int); masks[0, :2] = 1; masks[1, 0, 0, 0] = 1
>>> logits = np.stack([1 - masks, masks], -1).astype(float); logits[1] = [1.0, 0.0]  # patient 1 missed
>>> scores = segmentation_scores(masks, logits)
>>> scores["dice"], round(scores["dice_pooled"], 3), scores["dice_per_patient"]
(0.5, 0.985, [1.0, 0.0])
"""

from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from unicon_tf.model.heads import SegmentationHead
from unicon_tf.model.unetr import UNETRHead
from unicon_tf.tasks.base import TaskKind, classes_problem, register
from unicon_tf.tasks.losses import CE_WEIGHTINGS, DICE_MODES, dice_ce_loss, softmax_kl
from unicon_tf.tasks.metrics import DiceScore

if TYPE_CHECKING:
    from unicon_tf.model.encoder import SharedEncoder


def _overlaps(masks, logits):
    """`(overlap, total)` per patient and foreground class, `(patients, classes - 1)` each."""
    classes = logits.shape[-1]
    predicted = np.argmax(logits, axis=-1)
    overlap, total = np.zeros((2, len(masks), classes - 1))
    for c in range(1, classes):
        truth, guess = masks == c, predicted == c
        axes = tuple(range(1, truth.ndim))
        total[:, c - 1] = truth.sum(axes) + guess.sum(axes)
        overlap[:, c - 1] = (truth & guess).sum(axes)
    return overlap, total


def _dice(overlap, total):
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)


def dice_per_patient(masks: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Dice per patient and foreground class, `(patients, classes - 1)`; empty vs empty is 1."""
    return _dice(*_overlaps(masks, logits))


def segmentation_scores(masks: np.ndarray, logits: np.ndarray) -> dict:
    """`dice`: mean over foreground classes of the per-patient mean Dice; `dice_pooled`:
    mean over foreground classes of the Dice pooled over every voxel of every patient;
    `dice_per_class` (per-patient mean) and `dice_per_patient` (mean over foreground classes).

    Args:
        masks: `(patients, D, H, W)` label maps.
        logits: `(patients, D, H, W, classes)` voxel logits.
    """
    overlap, total = _overlaps(np.asarray(masks), np.asarray(logits))
    per_patient = _dice(overlap, total)
    per_class = per_patient.mean(axis=0)
    return {"dice": float(per_class.mean()), "dice_pooled": float(_dice(overlap.sum(0), total.sum(0)).mean()),
            "dice_per_class": [float(d) for d in per_class],
            "dice_per_patient": [float(d) for d in per_patient.mean(axis=1)]}


class Segmentation(TaskKind):
    """Segmentation (see the module docstring)."""

    name = "segmentation"
    targets = ("mask",)
    head = SegmentationHead
    family_heads = {"vit": UNETRHead}
    main_metric = "dice"
    metric_names = {"dice": "Dice (per-patient mean)", "dice_pooled": "Dice (pooled over voxels)"}
    loss_options = {"dice": DICE_MODES, "ce_weighting": CE_WEIGHTINGS}
    uses_classes = True
    dense = True
    per_patient = "dice_per_patient"
    figure = "overlays"

    def head_options(self, options: dict, head_class: type, encoder: "SharedEncoder",
                     input_shape: tuple[int, int, int]) -> dict:
        """Also `final_upsampling`, from the finest feature map to the input grid (UNet decoder)."""
        options = super().head_options(options, head_class, encoder, input_shape)
        if head_class is SegmentationHead:
            finest = encoder.feature_shapes(input_shape)[0]
            factors = [size // grid for size, grid in zip(input_shape, finest[1:4])]
            options["final_upsampling"] = factors[0] if len(set(factors)) == 1 else factors
        return options

    def target(self, example: dict) -> tf.Tensor:
        return example["mask"]

    def loss_function(self, target: tf.Tensor, output: tf.Tensor, sample_weight: tf.Tensor | None = None,
                      dice: str = "pooled", ce_weighting: str = "none") -> tf.Tensor:
        return dice_ce_loss(target, output, sample_weight=sample_weight, dice=dice, ce_weighting=ce_weighting)

    def distillation_loss(self, teacher_output: tf.Tensor, student_output: tf.Tensor,
                          temperature: float = 2.0) -> tf.Tensor:
        return softmax_kl(teacher_output, student_output, temperature)

    def metrics(self, head: str, num_classes: int = 2) -> list:
        return [DiceScore(num_classes, "patient", name=f"{head}_dice"),
                DiceScore(num_classes, "pooled", name=f"{head}_dice_pooled")]

    def scores(self, target: np.ndarray, output: np.ndarray) -> dict:
        return segmentation_scores(target, output)

    def chance(self, target: np.ndarray) -> float:
        """Predicting background everywhere: Dice 1 for a patient and class with nothing to
        find, else 0, averaged like `dice`."""
        target = np.asarray(target)
        if target.ndim < 2 or len(target) == 0:
            return float("nan")
        axes = tuple(range(1, target.ndim))
        classes = max(int(target.max()), 1)
        empty = np.stack([~(target == c).any(axis=axes) for c in range(1, classes + 1)], axis=-1)
        return float(empty.mean())

    def serving_outputs(self, output: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": tf.nn.softmax(output, axis=-1),
                "label_map": tf.argmax(output, axis=-1, output_type=tf.int32)}

    def split_value(self, target: np.ndarray) -> int:
        """The largest label of the patient's mask (0: empty)."""
        return int(target.max()) if target.size else 0

    def split_problems(self, values: list, num_classes: int | None) -> tuple[str | None, list[str]]:
        """Refused: only empty masks, or a label outside the head's classes.

        Example:
        >>> SEGMENTATION.split_problems([0, 0], 2)[0]
        'has only empty masks (2 patients, no foreground voxel): a segmentation head would learn to predict background everywhere'
        """
        if max(values) == 0:
            return (f"has only empty masks ({len(values)} patients, no foreground voxel): a segmentation head would "
                    "learn to predict background everywhere"), []
        if num_classes and max(values) >= num_classes:
            return (f"holds mask value {max(values)}, outside the head's {num_classes} classes "
                    f"(num_classes: {num_classes})"), []
        return None, []

    def schema_classes_problem(self, features: dict, num_classes: int | None) -> str | None:
        """The masks' classes (`features.mask.classes`, declared at ingestion: every one may
        appear) other than the head's."""
        classes = features.get("mask", {}).get("classes")
        if classes is not None and classes != num_classes:
            return classes_problem("mask", "masks", num_classes, classes)
        return None


SEGMENTATION = register(Segmentation())
