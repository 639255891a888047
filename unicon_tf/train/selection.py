"""Model selection on validation: which epoch's weights a stage keeps, and when it stops.

A stage's `epochs` is a maximum. After every epoch the monitored validation value is
compared with the best so far; `patience` epochs in a row without a better one stop the
stage early, and `select: best_val` keeps the weights of the best epoch (`last` keeps
the last epoch's). The monitored value (`monitor`):

| `monitor`          | quantity                                   | better |
|--------------------|--------------------------------------------|--------|
| `metric` (default) | `val_<head>_auc`, `val_<head>_c_index`, or | higher |
|                    | `val_<head>_dice` (per-patient mean Dice)  |        |
| `loss`             | `val_<head>_loss`, the head's task loss    | lower  |

The default monitors the task's main metric, the one evaluation, the stage x task matrix
and blessing judge, so that the epoch kept is the one a reader of the table would pick;
the loss is smoother on a small validation split (a C-index or AUC over 16 patients moves
in steps) and is there for that. A value that is NaN (e.g. a C-index without a
comparable pair) is never an improvement; a tie is not one either (the earlier epoch stays).

Keras' `EarlyStopping(restore_best_weights=True)` does the same inside one `fit` call, but
a stage calls `fit` once per epoch (to checkpoint and check for non-finite values between
epochs) and must resume after an interruption, and the callback resets its best value and
counter at every `fit`; `Selection` keeps that state in the stage's checkpoint instead.
"""

import math

from unicon_tf.train.metrics import MAIN_METRIC


class Selection:
    """The model-selection state of one stage: best value and epoch so far, patience counter.

    Args:
        head: the stage's head.
        task: the head's task.
        select: `best_val` or `last`.
        patience: epochs without improvement before stopping; None never stops early.
        monitor: `metric` or `loss` (see the module docstring).
        max_epochs: the stage's `epochs`.
        state: a previous `state()` (resuming); None starts afresh.

    Example:
    >>> selection = Selection("seg", "segmentation", "best_val", patience=2, monitor="metric", max_epochs=10)
    >>> [selection.update(e, {"val_seg_dice": v}) for e, v in enumerate([0.3, 0.5, 0.4, 0.5], start=1)]
    [True, True, False, False]
    >>> selection.stop(), selection.record(epochs_run=4)["epoch"]
    (True, 2)
    """

    def __init__(self, head, task, select, patience, monitor, max_epochs, state=None):
        self.select, self.patience, self.max_epochs = select, patience, int(max_epochs)
        self.key = f"val_{head}_{MAIN_METRIC[task] if monitor == 'metric' else 'loss'}"
        self.mode = "max" if monitor == "metric" else "min"
        state = state or {}
        self.best, self.best_epoch, self.wait = state.get("best"), state.get("best_epoch"), state.get("wait", 0)

    @property
    def needs_validation(self):
        """Whether validation data is needed (best_val, or early stopping)."""
        return self.select == "best_val" or self.patience is not None

    def update(self, epoch, logs):
        """Take epoch `epoch`'s (1-based) logs; True when its monitored value is the best so far.

        Raises:
            KeyError: the logs lack the monitored value (no validation data).
        """
        value = float(logs[self.key])
        better = not math.isnan(value) and (
            self.best is None or (value > self.best if self.mode == "max" else value < self.best))
        if better:
            self.best, self.best_epoch, self.wait = value, int(epoch), 0
        else:
            self.wait += 1
        return better

    def stop(self):
        """Whether `patience` epochs in a row brought no improvement."""
        return self.patience is not None and self.wait >= self.patience

    def state(self):
        """What a checkpoint keeps to resume (`Selection(..., state=...)`)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def kept_epoch(self, epochs_run):
        """The epoch (1-based) whose weights the stage keeps."""
        if self.select == "best_val" and self.best_epoch is not None:
            return self.best_epoch
        return epochs_run

    def record(self, epochs_run):
        """What `stage.json` records under `selection`: `select`, `monitor`, `mode`,
        `patience`, `max_epochs`, `epochs_run`, `epoch` (kept, 1-based), `best_epoch`,
        `best` (its monitored value), `stopped` (`early_stop` or `max_epochs`) and `reason`."""
        stopped = "early_stop" if epochs_run < self.max_epochs and self.stop() else "max_epochs"
        epoch = self.kept_epoch(epochs_run)
        if stopped == "early_stop":
            why = (f"early stop: {self.key} did not improve for {self.patience} epoch(s) after epoch "
                   f"{self.best_epoch}" if self.best_epoch else
                   f"early stop: no finite {self.key} in {self.patience} epoch(s)")
        else:
            why = f"max epochs ({self.max_epochs}) reached"
        if self.select == "best_val":
            kept = (f"kept epoch {epoch}, the best {self.key} ({self.best:.4f})" if self.best_epoch is not None
                    else f"kept the last epoch {epoch}: no finite {self.key}")
        else:
            kept = f"kept the last epoch {epoch} (select: last)"
        return {"select": self.select, "monitor": self.key if self.needs_validation else None, "mode": self.mode,
                "patience": self.patience, "max_epochs": self.max_epochs, "epochs_run": epochs_run, "epoch": epoch,
                "best_epoch": self.best_epoch, "best": self.best, "stopped": stopped, "reason": f"{why}; {kept}"}
