"""Model selection on validation: which epoch's weights a stage keeps, and when it stops.

Every arm of a comparison (a continual stage and its single-task and naive baselines)
follows the same rule, so a table never pits one model's last epoch against another's
best one. A stage's `epochs` is a maximum. After every epoch the monitored validation
value is compared with the best so far; `patience` epochs in a row without a better one
stop the stage early, and `select: best_val` (the default where the data has a `val`
split) keeps the weights of the best epoch; `select: last` keeps the last epoch's (the
default without a `val` split, and an option). The monitored value (`monitor`):

| `monitor`        | quantity                                                | better |
|------------------|---------------------------------------------------------|--------|
| `auto` (default) | `loss` for AUC and C-index on fewer than `COARSE_BELOW` |        |
|                  | validation patients, `metric` otherwise                 |        |
| `metric`         | `val_<head>_auc`, `val_<head>_c_index`, or              | higher |
|                  | `val_<head>_dice` (per-patient mean Dice)               |        |
| `loss`           | `val_<head>_loss`, the head's task loss                 | lower  |

A ranking metric (AUC, C-index) over a handful of patients moves in coarse steps: on 10
validation patients a prognosis model's best C-index can be epoch 1's by chance (an
untrained model kept, scoring 0.5 on test). The loss is continuous and is what `auto`
watches there. Two more guards for small splits: `min_epochs` (no epoch before it is
kept, and patience does not count before it) and `smoothing: k` (an epoch is judged by
the mean of the monitored value over it and the k - 1 epochs before it, so one lucky
epoch does not win; an epoch is judged only once k values exist). A value that is NaN
(e.g. a C-index without a comparable pair) is never an improvement; a tie is not one
either (the earlier epoch stays), except at a *flat start*: while every judged value so
far is the same (a metric that has not moved off where it started, e.g. a per-patient
Dice of 0 while a segmentation head still misses every small lesion), the later epoch is
kept and patience does not count. The values compared are the judged ones (the smoothed
means under `smoothing`); a NaN epoch is skipped by that comparison and, being no
improvement, still counts towards patience. Without that rule, patience on a metric stuck at 0
stopped a head whose loss was still falling and kept its first, barely trained epoch.

Keras' `EarlyStopping(restore_best_weights=True)` does the same inside one `fit` call, but
a stage calls `fit` once per epoch (to checkpoint and check for non-finite values between
epochs) and must resume after an interruption, and the callback resets its best value and
counter at every `fit`; `Selection` keeps that state in the stage's checkpoint instead.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

from unicon_tf.names import MONITOR, SELECT
from unicon_tf.tasks import task_kind
from unicon_tf.train.config import TrainingConfig

COARSE_BELOW = 50
"""Validation patients below which `monitor: auto` watches the loss of an AUC or C-index task."""


def resolve_select(select: str | None, has_val: bool) -> str:
    """The rule a stage follows: `select` if set, else `best_val` with a `val` split, `last` without.

    Example:
    >>> resolve_select(None, True), resolve_select(None, False), resolve_select("last", True)
    ('best_val', 'last', 'last')
    """
    return select or ("best_val" if has_val else "last")


def resolve_monitor(monitor: str, task: str, val_patients: int | None) -> str:
    """`metric` or `loss`: `monitor`, with `auto` resolved for the task and validation size.

    Example:
    >>> resolve_monitor("auto", "prognosis", 10), resolve_monitor("auto", "segmentation", 10)
    ('loss', 'metric')
    """
    if monitor != "auto":
        return monitor
    coarse = task_kind(task).ranking and (val_patients or 0) < COARSE_BELOW
    return "loss" if coarse else "metric"


class Selection:
    """The model-selection state of one stage: best value and epoch so far, patience counter.

    Args:
        head: the stage's head.
        task: the head's task.
        select: `best_val` or `last` (resolved: see `resolve_select`).
        patience: epochs without improvement before stopping; None never stops early.
        monitor: `auto`, `metric` or `loss` (see the module docstring).
        max_epochs: the stage's `epochs`.
        state: a previous `state()` (resuming); None starts afresh.
        min_epochs: the first epoch (1-based) that may be kept.
        smoothing: epochs averaged (the epoch and the ones before it) to judge an epoch.
        val_patients: patients in the validation split (for `auto` and the record).

    Example:
    >>> selection = Selection("seg", "segmentation", "best_val", patience=2, monitor="metric", max_epochs=10)
    >>> [selection.update(e, {"val_seg_dice": v}) for e, v in enumerate([0.3, 0.5, 0.4, 0.5], start=1)]
    [True, True, False, False]
    >>> selection.stop(), selection.record(epochs_run=4)["epoch"]
    (True, 2)
    """

    def __init__(self, head: str, task: str, select: str, patience: int | None, monitor: str, max_epochs: int,
                 state: Mapping[str, Any] | None = None, min_epochs: int = 1, smoothing: int = 1,
                 val_patients: int | None = None) -> None:
        self.head, self.task = head, task
        self.select, self.patience, self.max_epochs = select, patience, int(max_epochs)
        self.min_epochs, self.smoothing, self.val_patients = int(min_epochs), int(smoothing), val_patients
        self.monitor = resolve_monitor(monitor, task, val_patients)
        self.key = f"val_{head}_{task_kind(task).main_metric if self.monitor == 'metric' else 'loss'}"
        self.mode = "max" if self.monitor == "metric" else "min"
        state = state or {}
        self.best, self.best_epoch, self.wait = state.get("best"), state.get("best_epoch"), state.get("wait", 0)
        self.values = list(state.get("values", []))

    @classmethod
    def for_training(cls, head: str, task: str, training: TrainingConfig, splits: dict,
                     state: dict | None = None) -> "Selection":
        """The `Selection` of a stage's training keys (`select`, `patience`, `monitor`,
        `min_epochs`, `smoothing`, `epochs`) on data whose schema has `splits`
        (`{split: {"count": patients, ...}}`): the one place a stage's rule is resolved,
        for the stage and for replaying it over a recorded history."""
        val = splits.get("val")
        val_patients = None if val is None else int(val.get("count", 0))
        return cls(head, task, resolve_select(training.select, val is not None), training.patience,
                   training.monitor, training.epochs, state, min_epochs=training.min_epochs,
                   smoothing=training.smoothing, val_patients=val_patients)

    @property
    def needs_validation(self) -> bool:
        """Whether validation data is needed (best_val, or early stopping)."""
        return self.select == "best_val" or self.patience is not None

    def update(self, epoch: int, logs: Mapping[str, float]) -> bool:
        """Take epoch `epoch`'s (1-based) logs; True when it is the best so far (judged on
        the mean over `smoothing` epochs, from `min_epochs` on).

        Raises:
            KeyError: the logs lack the monitored value (no validation data).
        """
        value = float(logs[self.key])
        self.values.append(None if math.isnan(value) else value)  # None: JSON has no NaN
        window = self.values[-self.smoothing:]
        if epoch < self.min_epochs or len(window) < self.smoothing:
            return False
        value = float("nan") if None in window else math.fsum(window) / len(window)
        flat_start = self.best is not None and value == self.best and self._flat()
        better = not math.isnan(value) and (
            self.best is None or flat_start or (value > self.best if self.mode == "max" else value < self.best))
        if better:
            self.best, self.best_epoch, self.wait = value, int(epoch), 0
        else:
            self.wait += 1
        return better

    def _flat(self, through: int | None = None) -> bool:
        """Whether every finite value judged before the latest epoch (or up to epoch `through`,
        1-based) was the same (the flat start)."""
        first = max(self.min_epochs, self.smoothing) - 1  # index of the first judged epoch
        last = len(self.values) - 1 if through is None else through
        windows = [self.values[i - self.smoothing + 1:i + 1] for i in range(first, last)]
        return len({math.fsum(w) / len(w) for w in windows if None not in w}) == 1

    def stop(self) -> bool:
        """Whether `patience` judged epochs in a row brought no improvement."""
        return self.patience is not None and self.wait >= self.patience

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume (`Selection(..., state=...)`)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait, "values": self.values}

    def kept_epoch(self, epochs_run: int) -> int:
        """The epoch (1-based) whose weights the stage keeps."""
        if self.select == "best_val" and self.best_epoch is not None:
            return self.best_epoch
        return epochs_run

    def record(self, epochs_run: int, history: Sequence[Mapping[str, float]] | None = None) -> dict[str, Any]:
        """What `stage.json` records under `selection`: `select`, `monitor` (the key), `mode`,
        `patience`, `min_epochs`, `smoothing`, `max_epochs`, `epochs_run`, `epoch` (kept,
        1-based), `best_epoch`, `best` (its judged value), `val_patients`, `val_metric` (the
        kept epoch's validation main metric, from `history`; None where it was not measured,
        e.g. an AUC on a one-class validation split, so that stage.json stays plain JSON), `stopped` (`early_stop` or
        `max_epochs`), `rule` (`describe_rule`) and `reason`."""
        stopped = "early_stop" if epochs_run < self.max_epochs and self.stop() else "max_epochs"
        epoch = self.kept_epoch(epochs_run)
        if stopped == "early_stop":
            why = (f"early stop: {self.key} did not improve for {self.patience} epoch(s) after epoch "
                   f"{self.best_epoch}" if self.best_epoch else
                   f"early stop: no finite {self.key} in {self.patience} epoch(s)")
        else:
            why = f"max epochs ({self.max_epochs}) reached"
        on = f" on {self.val_patients} validation patients" if self.val_patients is not None else ""
        smoothed = f", mean of {self.smoothing} epochs" if self.smoothing > 1 else ""
        if self.select == "best_val":
            kept = (f"kept epoch {epoch} of {epochs_run}, the best {self.key} ({self.best:.4f}{smoothed}){on}"
                    if self.best_epoch is not None else f"kept the last epoch {epoch}: no judged finite {self.key}{on}")
            if self.best_epoch is not None and self.best_epoch > 1 and self._flat(through=self.best_epoch):
                kept += f" (a flat start: {self.key} had not moved, so the latest epoch of that value)"
        else:
            kept = f"kept the last epoch {epoch} (select: last)"
        metric_key = f"val_{self.head}_{task_kind(self.task).main_metric}"
        logs = (history or [])[epoch - 1] if history and 0 < epoch <= len(history) else {}
        val_metric = logs.get(metric_key)
        val_metric = val_metric if val_metric is not None and math.isfinite(val_metric) else None
        record = {"select": self.select, "monitor": self.key if self.needs_validation else None, "mode": self.mode,
                  "patience": self.patience, "min_epochs": self.min_epochs, "smoothing": self.smoothing,
                  "max_epochs": self.max_epochs, "epochs_run": epochs_run, "epoch": epoch,
                  "best_epoch": self.best_epoch, "best": self.best, "val_patients": self.val_patients,
                  "val_metric": val_metric, "stopped": stopped, "reason": f"{why}; {kept}"}
        return {**record, "rule": describe_rule(record)}


def rule_key(record: dict | None) -> tuple:
    """What two arms must share to be compared like for like: `(select, what was watched)`
    of a `selection` record (`metric` or `loss`; None for `last`); a record of a run from
    before selection was recorded (None) kept its last epoch.

    Example:
    >>> rule_key({"select": "best_val", "monitor": "val_seg_dice"}), rule_key(None)
    (('best_val', 'metric'), ('last', None))
    """
    if not record or record.get("select") != "best_val":
        return ((record or {}).get("select") or "last", None)
    return ("best_val", "loss" if (record.get("monitor") or "").endswith("_loss") else "metric")


def rule_name(record: dict | None) -> str:
    """`rule_key` as words: `best_val on the val loss`, `best_val on the val metric` or `last`.

    Example:
    >>> rule_name({"select": "best_val", "monitor": "val_p_loss"}), rule_name(None)
    ('best_val on the val loss', 'last')
    """
    select, watched = rule_key(record)
    return f"{select} on the val {watched}" if watched else select


def describe_rule(record: dict | None) -> str:
    """A selection record as a short phrase, e.g. `best_val (val_seg_dice, epoch 4/6, 16 val patients)`.

    Example:
    >>> describe_rule({"select": "last", "epoch": 3, "epochs_run": 3, "max_epochs": 3})
    'last (epoch 3/3)'
    """
    if not record:
        return "last (not recorded)"
    if record.get("select") != "best_val":
        return f"last (epoch {record.get('epoch')}/{record.get('max_epochs')})"
    size = f", {record['val_patients']} val patients" if record.get("val_patients") is not None else ""
    return f"best_val ({record.get('monitor')}, epoch {record.get('epoch')}/{record.get('epochs_run')}{size})"
