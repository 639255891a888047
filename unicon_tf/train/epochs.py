"""The epoch loop of a stage: one Keras `fit` per epoch, then a check for non-finite
values, model selection's verdict and a checkpoint (`unicon_tf.train.checkpoints`).

An epoch whose loss or weights are not finite raises `TrainingError` and keeps nothing of
that epoch: the last checkpoint stays the last good one, to resume from with a lower
learning rate.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import keras
import numpy as np

from unicon_tf._quiet import progress_verbosity
from unicon_tf.model import non_finite_weights
from unicon_tf.train.checkpoints import BEST_WEIGHTS, load_stage_weights, save_checkpoint, weights_file
from unicon_tf.train.selection import Selection


class TrainingError(RuntimeError):
    """Training stopped (a NaN or infinite loss); the message names the step and checkpoint."""


class _StopAfterOneEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


class _NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first step whose loss is NaN or infinite, and records it."""

    failure = None

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not np.isfinite(loss) and self.failure is None:
            self.failure = {"loss": loss, "step": batch + 1, "iteration": int(self.model.optimizer.iterations)}
            self.model.stop_training = True


def _non_finite_state(network, logs, epoch):
    """What is not finite after an epoch (training or validation loss, weights), or None.

    An epoch can end with a finite loss and NaN weights: the loss of a step is computed
    before its update. Checking the weights keeps such an epoch out of the checkpoint.
    """
    losses = {k: v for k, v in logs.items() if k in ("loss", "val_loss") and not np.isfinite(v)}
    if losses:
        return "the " + " and ".join(f"{k.replace('_', ' ')} became {v}" for k, v in losses.items()) \
            + f" in epoch {epoch + 1}"
    weights = non_finite_weights(network)
    if weights:
        return f"{len(weights)} weight(s) became non-finite in epoch {epoch + 1} (e.g. {weights[0]})"
    return None


@dataclasses.dataclass
class EpochLoop:
    """The epochs of one stage.

    Attributes:
        stage: the stage's name (for messages).
        network: the stage's network (its weights are checked and checkpointed).
        trainer: the Keras model that trains it, compiled (`ContinualModel` or `CachedHeadModel`).
        train_data: `train_data(epoch)`, the epoch's training batches (`tf.data.Dataset`).
        val_data: the validation batches, or None without a `val` split.
        selection: the stage's model selection (`Selection`).
        checkpoint: the stage's checkpoint folder (read: the last good epoch).
        written: where this process writes its checkpoint (`checkpoint` on the chief).
        callbacks: Keras callbacks for every epoch's `fit` (TensorBoard, the user's).
        steps: `steps(epoch)`, `fit`'s step counts (`{}`: the data's own end).
        verbose: Keras progress verbosity (0 silent, 1 bar, 2 one line per epoch).
    """

    stage: str
    network: keras.Model
    trainer: keras.Model
    train_data: Callable
    val_data: object
    selection: Selection
    checkpoint: pathlib.Path
    written: pathlib.Path
    callbacks: list
    steps: Callable = lambda epoch: {}
    verbose: int = 1

    def run(self, state: dict, epochs: int) -> dict:
        """Train from `state` (epochs done, history, selection's state) up to `epochs`, or until
        model selection stops; return the state after the last epoch.

        Raises:
            TrainingError: an epoch's loss or weights became NaN or infinite.
        """
        guard = _NonFiniteGuard()
        for epoch in range(state["epoch"], epochs):
            if self.selection.stop():  # stopped early before an interruption
                break
            self.trainer.fit(self.train_data(epoch), validation_data=self.val_data, initial_epoch=epoch,
                             epochs=epochs, callbacks=[_StopAfterOneEpoch(), guard, *self.callbacks],
                             verbose=progress_verbosity(self.verbose), shuffle=False, **self.steps(epoch))
            logs = {k: float(v) for k, v in self.trainer.history.history.items() for v in v[-1:]}
            self._refuse_non_finite(guard.failure, logs, epoch, state)
            best = self.val_data is not None and self.selection.update(epoch + 1, logs)
            state = {**state, "epoch": epoch + 1, "history": state["history"] + [logs],
                     "selection": self.selection.state()}
            save_checkpoint(self.written, self.network, self.trainer, state, best=best)
            if self.verbose and self.val_data is not None:
                print(f"epoch {epoch + 1}: {self.selection.key} {logs[self.selection.key]:.4f}" + (
                    " (best so far)" if best else
                    f" (best: epoch {self.selection.best_epoch}, {self.selection.best})"))
        return state

    def _refuse_non_finite(self, failure, logs, epoch, state):
        """Raise TrainingError when a step's loss (`failure`, the guard's) or the epoch's
        logs or weights are not finite, naming the last good checkpoint."""
        problem = (f"the loss became {failure['loss']} at epoch {epoch + 1}, step {failure['step']} (optimizer "
                   f"step {failure['iteration']})" if failure else _non_finite_state(self.network, logs, epoch))
        if problem:
            last = f"epoch {state['epoch']} in {self.checkpoint}" if self.checkpoint.exists() else "none yet"
            raise TrainingError(
                f"Stage '{self.stage}': {problem}. Nothing of that epoch is kept "
                f"(no checkpoint, no model); last good checkpoint: {last}. Lower the learning rate and "
                "rerun with --resume --learning-rate <lower>.")

    def keep_selected(self, state: dict) -> dict:
        """Load the weights model selection keeps into the network; return its record
        (`Selection.record`: the epoch kept, the monitored value, why training stopped)."""
        selected = self.selection.record(state["epoch"], state["history"])
        if selected["epoch"] != state["epoch"]:
            load_stage_weights(next(filter(None, (weights_file(folder, BEST_WEIGHTS)
                                                  for folder in (self.written, self.checkpoint)))), self.network)
        if self.verbose and self.val_data is not None:
            print(f"stage '{self.stage}': {selected['reason']}")
        return selected
