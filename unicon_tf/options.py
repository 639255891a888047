"""What heads and encoder families accept, declared without TensorFlow.

A pipeline file is checked against these declarations (`unicon_tf.train.pipeline`), so
loading and checking one imports neither TensorFlow nor Keras; the head classes
(`unicon_tf.model.heads`, `unicon_tf.model.unetr`) and the encoder families
(`unicon_tf.model.families`) take the same options, and a test holds the two in step
(every head's constructor defaults, every family's option names).

- `HEAD_OPTIONS`: head kind -> option -> `HeadOption` (its default, which fixes its type,
  and the check of its value, in the order the head's constructor checks them).
- `head_kind(task, family)`: the head kind a task's head has on an encoder family
  (segmentation: the family's own decoder, UNETR on a ViT).
- `ENCODER_OPTIONS`: encoder family -> its `foundation` keyword options.

Example:
>>> head_kind("segmentation", "vit"), sorted(HEAD_OPTIONS["prognosis"])
('unetr', ['dropout', 'pooling'])
>>> check_head_options("classification", {"num_classes": 1})
Traceback (most recent call last):
...
ValueError: num_classes must be >= 2 for a classification head, got 1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

TASKS = ("classification", "prognosis", "segmentation")
"""The shipped task kinds of `unicon_tf.tasks`, declared here so that a pipeline file is
checked without TensorFlow (a test holds the two in step); a kind added as a module of
`unicon_tf.tasks` only is checked through its registry (`unicon_tf.train.config.kind_declaration`)."""

DENSE_TASKS = ("segmentation",)
"""The task kinds whose output is voxel-wise (`TaskKind.dense`): the stages `sampling:` applies to."""

POOLINGS = ("avg", "max", "avgmax")
"""A pooled head's `pooling`: global average, global max, or both concatenated."""


@dataclasses.dataclass(frozen=True)
class HeadOption:
    """One constructor option of a head.

    Args:
        default: the constructor's default; a value given must have its type (an int
            option refuses `2.5`, `true` and `two`).
        complaint: `complaint(value, task)` -> the head's refusal of a well-typed value
            (the message its constructor raises), or None when the value is accepted.
    """

    default: object
    complaint: Callable[[object, str], str | None] = lambda value, task: None

    def type_complaint(self, name: str, value: object) -> str | None:
        """Why `value` has the wrong type for this option (None when it has the right one)."""
        default = self.default
        if isinstance(default, bool):
            valid = isinstance(value, bool)
        elif isinstance(default, int):
            valid = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            valid = isinstance(value, str)
        else:
            valid = True
        if valid:
            return None
        return f"field '{name}' must be a {type(default).__name__} like its default {default!r}, got {value!r}."


def _num_classes(value, task):
    return None if int(value) >= 2 else f"num_classes must be >= 2 for a {task} head, got {value}."


def _dropout(value, task):
    return None if 0.0 <= value < 1.0 else f"dropout must be in [0, 1), got {value}."


def _pooling(value, task):
    return None if value in POOLINGS else f"pooling must be one of {list(POOLINGS)}, got '{value}'."


def _at_least_one(name):
    return lambda value, task: None if int(value) >= 1 else f"{name} must be >= 1, got {value}."


def _channels(name, zero):
    return lambda value, task: None if int(value) >= 0 else \
        f"{name} must be a channel count >= 0 (0: {zero}), got {value!r}."


_POOLED = {"dropout": HeadOption(0.0, _dropout), "pooling": HeadOption("avgmax", _pooling)}

HEAD_OPTIONS: dict[str, dict[str, HeadOption]] = {
    "classification": {"num_classes": HeadOption(2, _num_classes), **_POOLED},
    "prognosis": dict(_POOLED),
    "segmentation": {"num_classes": HeadOption(2, _num_classes),
                     "blocks_per_level": HeadOption(2, _at_least_one("blocks_per_level")),
                     "final_upsampling": HeadOption(1),
                     "side_encoder": HeadOption(0, _channels("side_encoder", "none")),
                     "decoder_channels": HeadOption(0, _channels("decoder_channels", "the skips'"))},
    "unetr": {"num_classes": HeadOption(2, _num_classes),
              "feature_size": HeadOption(16, _at_least_one("feature_size")),
              "modality_skips": HeadOption(True)},
}
"""Head kind -> option -> `HeadOption`: `ClassificationHead`, `PrognosisHead`,
`SegmentationHead` and `UNETRHead` (a ViT's segmentation head)."""

SEGMENTATION_HEADS = {"vit": "unetr"}
"""Encoder family -> the head kind of its segmentation head (others: `segmentation`)."""

VIT_OPTIONS = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "position", "position_grid",
               "feature_layers", "qkv_bias", "adapter_targets", "weights", "weights_format")
"""`foundation(encoder="vit", ...)` options: `vit_backbone`'s, the patch size, the default
LoRA targets, and pretrained weights to load (`unicon_tf.model.load_pretrained`)."""

ENCODER_OPTIONS: dict[str, tuple[str, ...]] = {
    "residual": ("width", "depth"),
    "vit": VIT_OPTIONS,
    "i3resnet": ("layers", "width", "weights"),
}
"""Encoder family -> its `foundation` keyword options (a pipeline's `encoder: {kind: ...}`)."""

RESIDUAL_DEPTH = 4
"""Levels of the built-in residual encoder where `depth` is not given."""

ENCODER_LEVELS: dict[str, Callable[[dict], int]] = {
    "residual": lambda options: RESIDUAL_DEPTH if options.get("depth") is None else int(options["depth"]),
    "i3resnet": lambda options: 5,  # the stem, then layer1-4
}
"""The families whose levels are computed one from the previous (`EncoderFamily.levels`)
-> the number of levels an encoder built with given options has: a new path can start at
any of them (`adapter_start`) and place adapters on those after it (`adapter_levels`).
On a family not listed (the ViT) a path starts at level 0."""


def encoder_levels(family: str, encoder_options: dict) -> int | None:
    """The levels of an encoder of `family` built with `encoder_options` (`ENCODER_LEVELS`),
    without building it; None for a family whose levels are not computed one from the
    previous (the ViT).

    Example:
    >>> encoder_levels("residual", {"depth": 3}), encoder_levels("i3resnet", {}), encoder_levels("vit", {})
    (3, 5, None)
    """
    return ENCODER_LEVELS[family](encoder_options) if family in ENCODER_LEVELS else None


def check_path_levels(family: str, depth: int | None, adapter_start: int,
                      adapter_levels: list[int] | None = None) -> None:
    """Refuse a new path's `adapter_start` or `adapter_levels` that its encoder does not have:
    `expand` checks them against the built encoder, a pipeline file against `encoder_levels`.

    Args:
        family: the encoder family (for the message).
        depth: the encoder's levels, None where they are not computed one from the previous.
        adapter_start: the first level the path computes.
        adapter_levels: the levels whose layers get the path's adapters (None: all from the start).

    Raises:
        ValueError: a level the encoder does not have; a start > 0 or `adapter_levels` on an
            encoder without levels.

    Example:
    >>> check_path_levels("i3resnet", 5, 4, [4])
    >>> check_path_levels("residual", 3, 3)
    Traceback (most recent call last):
    ...
    ValueError: adapter_start must be an encoder level in [0, 2] (the residual encoder has 3 levels), got 3.
    """
    if depth is None:
        if adapter_start:
            raise ValueError(f"adapter_start={adapter_start} needs an encoder whose levels are computed one from the "
                             f"previous (the residual CNN, the I3ResNet); the {family} encoder's feature states all "
                             "come from one token grid: use adapter_start=0.")
        if adapter_levels:
            raise ValueError(f"adapter_levels needs an encoder of levels (the residual CNN, the I3ResNet); the {family} "
                             "encoder's blocks all work on one token grid: use adapter_targets.")
        return
    if not 0 <= adapter_start < depth:
        raise ValueError(f"adapter_start must be an encoder level in [0, {depth - 1}] (the {family} encoder has "
                         f"{depth} levels), got {adapter_start}.")
    if adapter_levels and (min(adapter_levels) < adapter_start or max(adapter_levels) >= depth):
        raise ValueError(f"adapter_levels must lie in [adapter_start, {depth - 1}] = [{adapter_start}, {depth - 1}] "
                         f"(the {family} encoder has {depth} levels), got {sorted(adapter_levels)}.")


def head_kind(task: str, family: str = "residual") -> str:
    """The kind of `task`'s head on an encoder of `family` (a key of `HEAD_OPTIONS`).

    Raises:
        ValueError: an unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task '{task}': expected one of {sorted(TASKS)}.")
    return SEGMENTATION_HEADS.get(family, task) if task in DENSE_TASKS else task


def check_head_options(task: str, options: dict, family: str = "residual") -> None:
    """Refuse head options that `task`'s head on `family` would refuse, without building it.

    Args:
        task: the head's task (`TASKS`).
        options: `{option: value}` as a pipeline stage gives them.
        family: the encoder family (`ENCODER_OPTIONS`, or `custom`).

    Raises:
        KeyError: an option the head does not take (the argument names them).
        TypeError: a value of the wrong type (the message names the field).
        ValueError: a value the head refuses (its constructor's message).

    Example:
    >>> check_head_options("segmentation", {"num_classes": 3, "blocks_per_level": 1})
    """
    kind = head_kind(task, family)
    accepted = HEAD_OPTIONS[kind]
    unknown = set(options) - set(accepted)
    if unknown:
        raise KeyError(sorted(unknown))
    for name, value in options.items():
        complaint = accepted[name].type_complaint(name, value)
        if complaint:
            raise TypeError(complaint)
    for name, option in accepted.items():
        complaint = option.complaint(options[name], task) if name in options else None
        if complaint:
            raise ValueError(complaint)


def default_head_name(task: str, modalities: list[str]) -> str:
    """A head's name when none is given: the task, suffixed with the modalities when it
    reads several.

    Example:
    >>> default_head_name("segmentation", ["ct"]), default_head_name("segmentation", ["ct", "pet"])
    ('segmentation', 'segmentation_ctpet')
    """
    modalities = list(modalities)
    return task if len(modalities) == 1 else f"{task}_{''.join(modalities)}"


def default_modalities(primary: str, modality: str | None = None) -> list[str]:
    """The modalities a new head reads when none are given: the model's first modality,
    plus the new `modality` when the stage adds one.

    Example:
    >>> default_modalities("ct"), default_modalities("ct", "pet")
    (['ct'], ['ct', 'pet'])
    """
    return [primary] + ([modality] if modality else [])


def complete_loss_options(known: dict, options: dict | None, task: str | None) -> dict:
    """`options` (a stage's `loss:`) completed with the defaults of `known`, a kind's loss
    options (option -> accepted values, the default first).

    Raises:
        ValueError: an option the kind's loss does not have, or a value it does not take
            (the message names the option and the task).

    Example:
    >>> complete_loss_options({"error": ("huber", "squared")}, {}, "regression")
    {'error': 'huber'}
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = f"it has {sorted(known)}" if known else "it has none"
        raise ValueError(f"unknown loss option(s) {unknown} for a {task} task ({accepted}).")
    for key, value in options.items():
        if value not in known[key]:
            raise ValueError(f"loss option {key} = {value!r} is not one of {list(known[key])}.")
    return {key: options.get(key, values[0]) for key, values in known.items()}
