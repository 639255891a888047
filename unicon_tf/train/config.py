"""A stage's training configuration: a frozen dataclass, each field with its default, its
meaning and its check side by side. Imports neither TensorFlow nor Keras, so a pipeline
file is read and checked without them (`unicon_tf.train.pipeline`).

A pipeline's `defaults:` and each stage's training keys fill one `TrainingConfig`;
`TrainingConfig.checked(task)` refuses a value out of range with a `ValueError` naming
the field, and stage code reads the fields as attributes (`config.learning_rate`).
`to_json` gives the same keys and values as the string-keyed dict it replaces, so stage
fingerprints and recorded `stage.json` specs are unchanged.

Example:
>>> config = TrainingConfig(epochs=3, loss={"dice": "per_patient"}).checked("segmentation")
>>> config.epochs, config.strategy, config.to_json()["loss"]
(3, 'frozen', {'dice': 'per_patient'})
>>> TrainingConfig(learning_rate=-1.0).checked("classification")
Traceback (most recent call last):
...
ValueError: learning_rate = -1.0 is out of range.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from unicon_tf.names import MONITOR, SELECT, check_distribute, check_precision, check_strategy
from unicon_tf.options import DENSE_TASKS, TASKS, complete_loss_options

LOSS_OPTIONS = {"segmentation": {"dice": ("pooled", "per_patient"), "ce_weighting": ("none", "lesion")}}
"""Task -> option -> accepted values (the first is the default); a stage's `loss:` keys
(each kind's `loss_options`, `unicon_tf.tasks`, declared here for checks without
TensorFlow; a test holds the two in step)."""

SAMPLING_OPTIONS = {"foreground_probability": None}
"""A stage's `sampling:` keys and their defaults (None: keep the stored crops; see
`unicon_tf.data.sampling`)."""

BLESS_KEYS = ("min_vs_baseline",)
"""A stage's `bless` options (`unicon_tf.evaluate.matrix.bless`)."""


@dataclasses.dataclass(frozen=True)
class KindDeclaration:
    """What checking a stage needs to know of its task kind.

    Args:
        loss_options: option -> accepted values, the default first (a stage's `loss:`).
        dense: whether the output is voxel-wise (a stage's `sampling:` applies).
    """

    loss_options: dict
    dense: bool


def kind_declaration(task: str) -> KindDeclaration:
    """The `KindDeclaration` of `task`: for the shipped kinds (`unicon_tf.options.TASKS`)
    from `LOSS_OPTIONS` and `DENSE_TASKS`, without TensorFlow; for a kind added as a module
    of `unicon_tf.tasks` only, from its `TaskKind` (importing the registry, and TensorFlow).

    Raises:
        ValueError: a task that is no kind (the message lists the kinds).

    Example:
    >>> kind_declaration("segmentation").dense
    True
    """
    if task in TASKS:
        return KindDeclaration(LOSS_OPTIONS.get(task, {}), task in DENSE_TASKS)
    from unicon_tf.tasks import TASKS as KINDS  # an added kind: its module is its declaration

    if task not in KINDS:
        raise ValueError(f"unknown task '{task}' (expected one of {sorted(KINDS)}).")
    return KindDeclaration(dict(KINDS[task].loss_options), bool(KINDS[task].dense))


def check_loss_options(task: str | None, options: dict | None) -> dict:
    """`options` completed with the defaults of `task`'s loss options (`kind_declaration`).

    Raises:
        ValueError: an option the task's loss does not have, or a value it does not take
            (the message names the option).

    Example:
    >>> check_loss_options("segmentation", {"dice": "per_patient"})
    {'dice': 'per_patient', 'ce_weighting': 'none'}
    """
    return complete_loss_options(kind_declaration(task).loss_options if task is not None else {}, options, task)


def check_sampling_options(options: dict | None) -> dict:
    """`options` completed with the defaults of `SAMPLING_OPTIONS`.

    Raises:
        ValueError: an unknown key, or a foreground_probability outside [0, 1] (the
            message names the key).

    Example:
    >>> check_sampling_options({"foreground_probability": 0.5})
    {'foreground_probability': 0.5}
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
    if unknown:
        raise ValueError(f"unknown sampling option(s) {unknown} (known: {sorted(SAMPLING_OPTIONS)}).")
    p = options.get("foreground_probability")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0):
        raise ValueError(f"sampling option foreground_probability = {p!r} must be a number in [0, 1] (or null).")
    return {**SAMPLING_OPTIONS, **options}


# Field checks: `check(value, task, name)` raises ValueError naming the field.
Check = Callable[[object, "str | None", str], None]


def _unchecked(value, task, name):
    """Any value (Keras and NumPy take what they are given)."""


def _number(rule: Callable[[float], bool]) -> Check:
    def check(value, task, name):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and _numeric(value) else ""
            raise ValueError(f"{name} = {value!r} must be a number{hint}.")
        if not rule(value):
            raise ValueError(f"{name} = {value!r} is out of range.")
    return check


def _numeric(text: str) -> bool:
    """Whether `text` reads as a number (YAML 1.1 leaves `1e-3` a string)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _whole(value):
    return int(value) >= 1 and int(value) == value


def _choice(check_name: Callable[[str], None]):
    return lambda value, task, name: check_name(value)


def _one_of(choices, optional=False):
    def check(value, task, name):
        if not (optional and value is None) and value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return check


def _epochs_count(optional=False):
    def check(value, task, name):
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of epochs >= 1, got {value!r}.")
    return check


def _profile_batch(value, task, name):
    """What Keras' TensorBoard callback takes as `profile_batch`."""
    def batch(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(value, (list, tuple)):
        valid = len(value) == 2 and all(batch(v) and v >= 1 for v in value) and value[0] <= value[1]
    else:
        valid = batch(value) and value >= 0
    if not valid:
        raise ValueError(f"profile_batch = {value!r} is not a batch number >= 0 or a pair [first, last] of "
                         "batch numbers >= 1.")


def _mapping(check_options):
    def check(value, task, name):
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ValueError(f"field '{name}' must be a mapping, got {value!r}.")
        try:
            check_options(value, task)
        except ValueError as error:
            raise ValueError(f"field '{name}': {error}") from error
    return check


def _sampling(value, task, name):
    if isinstance(value, dict) and value and task is not None and not kind_declaration(task).dense:
        raise ValueError(f"field 'sampling' re-centres patches on lesion masks: segmentation stages only "
                         f"(this one is {task}).")
    _mapping(lambda options, task: check_sampling_options(options))(value, task, name)


def _bless(value, task, name):
    """`{min_vs_baseline: delta >= 0}`."""
    if not isinstance(value, dict):
        raise ValueError(f"field 'bless' must be a mapping like {{min_vs_baseline: 0.02}}, got {value!r}.")
    unknown = set(value) - set(BLESS_KEYS)
    if unknown:
        raise ValueError(f"field 'bless': unknown key(s) {sorted(unknown)}; known: {list(BLESS_KEYS)}.")
    delta = value.get("min_vs_baseline")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0):
        raise ValueError("field 'bless': min_vs_baseline must be a number >= 0 (the largest allowed shortfall "
                         f"against the single-task baseline), got {delta!r}.")


def _field(default, check, optional=False):
    """A dataclass field with its check (and whether `to_json` leaves it out at its default)."""
    metadata = {"check": check, "optional": optional}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How one stage trains: its strategy, optimiser, model selection, plugins' weights,
    devices, blessing and task-loss options (a pipeline's `defaults:` and stage keys).

    Values are kept as the pipeline gives them (an `epochs: 2` stays an int), so that a
    config's JSON, and the stage's fingerprints computed from it, match earlier records.
    Construct, then `checked(task)`.
    """

    strategy: str = _field("frozen", _choice(check_strategy))  # frozen | adapters | finetune | naive
    epochs: int = _field(5, _number(_whole))  # the most epochs; fewer with patience
    # best_val | last: the weights kept, by every arm (unset: best_val with a val split, else last)
    select: str | None = _field(None, _one_of(SELECT, optional=True), optional=True)
    # stop after this many epochs without a better validation value (unset: never)
    patience: int | None = _field(None, _epochs_count(optional=True), optional=True)
    # auto | metric (the task's main one: AUC, C-index, per-patient Dice) | loss (the head's)
    monitor: str = _field("auto", _one_of(MONITOR), optional=True)
    min_epochs: int = _field(1, _epochs_count(), optional=True)  # the first epoch that may be kept
    # judge an epoch by the mean of the monitored value over it and the epochs before it
    smoothing: int = _field(1, _epochs_count(), optional=True)
    batch_size: int = _field(4, _number(_whole))
    learning_rate: float = _field(3e-4, _number(lambda v: v > 0))
    weight_decay: float = _field(1e-5, _number(lambda v: v >= 0))
    alpha: float = _field(1.0, _number(lambda v: v >= 0))  # distillation weight (finetune)
    temperature: float = _field(2.0, _number(lambda v: v > 0))
    beta: float = _field(0.0, _number(lambda v: v >= 0))  # L2-SP / EWC weight (finetune)
    penalty: str = _field("l2sp", _one_of(("l2sp", "ewc")))  # l2sp | ewc
    # online EWC: decay of the running Fisher at each stage's end (1: no decay)
    ewc_gamma: float = _field(1.0, _number(lambda v: 0 <= v <= 1))
    augment: bool = _field(True, _unchecked)
    seed: int = _field(0, _unchecked)
    # frozen: train the new head on cached encoder features
    cache_features: bool = _field(True, _unchecked)
    distribute: str = _field("none", _choice(check_distribute))  # none | mirrored | multiworker
    precision: str = _field("float32", _choice(check_precision))  # float32 | mixed_float16 | mixed_bfloat16 | auto (the machine's fastest)
    # TensorBoard profiler: a batch, or [first, last]; 0 profiles nothing
    profile_batch: int | list = _field(0, _profile_batch)
    tolerance: float = _field(0.01, _number(lambda v: v >= 0))  # blessing: largest drop of an earlier task's metric
    threshold: float = _field(0.0, _number(lambda v: True))  # blessing: smallest metric of the stage's own task
    # {min_vs_baseline: delta}: the new head must reach its single-task baseline minus delta
    bless: dict = _field({}, _bless, optional=True)
    # task-loss options (LOSS_OPTIONS), e.g. {dice: per_patient, ce_weighting: lesion}
    loss: dict = _field({}, _mapping(lambda options, task: check_loss_options(task, options)), optional=True)
    # {foreground_probability: p}: re-centre training patches (data.sampling)
    sampling: dict = _field({}, _sampling, optional=True)

    def checked(self, task: str | None = None) -> TrainingConfig:
        """This config, every field checked for a stage of `task` (None: task-free checks).

        Returns:
            `self`.

        Raises:
            ValueError: the first field out of range (the message names it).
        """
        for field in dataclasses.fields(self):
            field.metadata["check"](getattr(self, field.name), task, field.name)
        return self

    def replace(self, **overrides: object) -> TrainingConfig:
        """A copy with `overrides` (None values ignored); unchecked, see `checked`.

        Raises:
            TypeError: an override that is not a training key.
        """
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self, complete: bool = True) -> dict:
        """`{field: value}` in field order; `complete=False` leaves out the optional fields
        (`OPTIONAL_TRAINING_KEYS`) at their defaults, as stage specs record them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if complete or not f.metadata["optional"] or getattr(self, f.name) != TRAINING_DEFAULTS[f.name]}

    @classmethod
    def from_json(cls, config: dict) -> TrainingConfig:
        """The config `to_json` wrote (optional fields left out take their defaults).

        Raises:
            ValueError: a key that is not a training key (names it).
        """
        unknown = set(config) - set(TRAINING_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown training key(s) {sorted(unknown)}; known: {sorted(TRAINING_DEFAULTS)}.")
        return cls(**config)


TRAINING_DEFAULTS = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                     for f in dataclasses.fields(TrainingConfig)}
"""Every training key and its default (a pipeline's `defaults:` and stage keys)."""

OPTIONAL_TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainingConfig) if f.metadata["optional"])
"""Training keys left out of a spec's JSON at their defaults (runs from before them keep
their fingerprints and recorded parameters)."""

SELECTION_KEYS = ("select", "patience", "monitor", "min_epochs", "smoothing")
"""Training keys of model selection (`unicon_tf.train.selection`)."""
