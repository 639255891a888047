"""Train one stage of a pipeline: from the previous stage's folder into the stage's own.

A stage starts from the previous stage's `model.keras` (the teacher is a second, frozen
copy of it), expands it with the stage's head, trains it under the stage's strategy and
saves it next to its record, in the stage's folder (`unicon_tf.run.StageFolder`): the
model, `stage.json`, EWC's `fisher.npz`, and a checkpoint after every epoch while it
trains. A finished stage is never overwritten. `train_stage` does this inside a run
directory (`unicon_tf.run.Run`), `fit_stage` for any pair of folders (the Trainer).

This module runs the steps; each responsibility has its own module in `unicon_tf.train`:
`assembly` (the network, its teacher and plugins), `checks` (the data against the head),
`caching` (the Keras trainer and its data, on cached encoder features where it can),
`checkpoints` (epoch checkpoints and resume), `epochs` (the epoch loop) and `record`
(`StageRecord`, stage.json).
"""

import contextlib
import dataclasses
import datetime
import pathlib
import shutil
import time
import warnings
from collections.abc import Sequence

import keras
import tensorflow as tf

from unicon_tf.data import data_fingerprint, read_schema
from unicon_tf.model.storage import save_model
from unicon_tf.run import ResumeWithoutCheckpointWarning, Run, StageError, StageFolder
from unicon_tf.train.assembly import StageNetwork, assemble, previous_stage, stage_plugins
from unicon_tf.train.caching import read_modalities, stage_data, stage_trainer
from unicon_tf.train.checkpoints import (carry_best_weights, checkpoint_fingerprint,  # noqa: F401 (re-exported)
                                         initial_state, resumed_state)
from unicon_tf.train.checks import check_head_fits_data, check_train_split, check_validation_split
from unicon_tf.train.continual import CachedHeadModel
from unicon_tf.train.distribute import chief_folder, get_strategy, release_folder, replica_batches
from unicon_tf.train.epochs import EpochLoop, TrainingError
from unicon_tf.train.optimizers import FusedAdamW
from unicon_tf.train.pipeline import PipelineSpec, StageSpec, load_pipeline, with_overrides
from unicon_tf.train.plugins import load_fisher
from unicon_tf.train.precision import optimizer_for, set_precision
from unicon_tf.train.record import StageRecord
from unicon_tf.train.selection import Selection
from unicon_tf.train.strategies import set_trainable
from unicon_tf.version import __version__

__all__ = ["TrainingError", "checkpoint_fingerprint", "fit_stage", "stage_data", "train_stage"]


def train_stage(pipeline: PipelineSpec | pathlib.Path | str, stage: str, run_dir: pathlib.Path | str,
                strategy: str | None = None, epochs: int | None = None, learning_rate: float | None = None,
                init: pathlib.Path | str | None = None, resume: bool = False,
                data_root: pathlib.Path | str | None = None, callbacks: Sequence[keras.callbacks.Callback] = (),
                verbose: int = 1, distribute: str | None = None, precision: str | None = None,
                profile_batch: int | Sequence[int] | None = None, accept_changes: bool = False) -> dict:
    """Train stage `stage` of `pipeline` into its folder of `run_dir`; return its record.

    The previous stage must be trained in the same run directory, from the same
    definition; the stage's status is recorded in `run.json` (see `unicon_tf.run`).

    Args:
        pipeline: a `PipelineSpec` or the path of a pipeline YAML.
        stage: the stage's name.
        run_dir: the run directory.
        strategy, epochs, learning_rate: override the pipeline's values for this stage.
        distribute, precision, profile_batch: override the stage's `distribute` (`none`,
            `mirrored`, `multiworker`), `precision` (`float32`, `mixed_float16`,
            `mixed_bfloat16`) and TensorBoard `profile_batch`.
        init: for the first stage, a `.keras` model to start from instead of `foundation`.
        resume: continue an interrupted stage from its last epoch checkpoint. The checkpoint
            records the stage's definition and data (`checkpoint_fingerprint`); a resume
            under a changed one (an edited pipeline file, other data) is refused, naming
            each changed field. An override given with the resume (e.g. a lower
            `learning_rate` after a NaN loss) is a change asked for: it is accepted.
        accept_changes: with `resume`, continue under a changed definition or data anyway.
            Every change a resume accepts is recorded in stage.json (`resume_changes`).
        data_root: resolve the pipeline's relative data paths against this folder.
        callbacks: extra Keras callbacks for `fit`.
        verbose: Keras progress-bar verbosity (0 silent, 1 bar, 2 one line per epoch).

    Returns:
        The stage's record (stage.json), see `fit_stage`.

    Raises:
        StageError: the run belongs to another pipeline, the previous stage is not
            trained here or was trained from another definition (see `fit_stage` for more).
        TrainingError, PipelineError, DataError: see `fit_stage`.

    Example:
    >>> record = train_stage("pipelines/chest_ct.yaml", "prognosis", "runs/chest_ct")  # doctest: +SKIP
    """
    if not isinstance(pipeline, PipelineSpec):
        pipeline = load_pipeline(pipeline, data_root=data_root)
    index, spec = pipeline.stage(stage)
    overrides = dict(strategy=strategy, epochs=epochs, learning_rate=learning_rate, distribute=distribute,
                     precision=precision, profile_batch=profile_batch)
    with_overrides(spec, **overrides)  # bad values: refused first
    run = Run.create(run_dir, pipeline.name, pipeline.path)
    base = None
    if index > 0:
        previous = pipeline.stages[index - 1]
        base = run.trained_stage(index - 1, previous.name, previous.fingerprint())
    out = run.stage(index, spec.name)
    record = fit_stage(pipeline, stage, out, base=base, init=init, resume=resume, callbacks=callbacks,
                       verbose=verbose, accept_changes=accept_changes, **overrides)
    if record["chief"]:
        run.mark(index, spec.name, spec.fingerprint(), status="trained", model=str(out.model.relative_to(run.path)))
    return record


def fit_stage(pipeline: PipelineSpec, stage: str, out: StageFolder | pathlib.Path | str,
              base: StageFolder | pathlib.Path | str | None = None, strategy: str | None = None,
              epochs: int | None = None, learning_rate: float | None = None, init: pathlib.Path | str | None = None,
              resume: bool = False,
              callbacks: Sequence[keras.callbacks.Callback] = (), verbose: int = 1, distribute: str | None = None,
              precision: str | None = None, profile_batch: int | Sequence[int] | None = None,
              accept_changes: bool = False) -> dict:
    """Train stage `stage` of `pipeline` into the folder `out`, starting from the folder `base`.

    What the Trainer component runs: it needs no run directory, only the previous
    stage's folder (`base`, whose model it expands; its frozen copy is the teacher) and
    the stage's data (`spec.data`). The folder gets `model.keras`, `stage.json` and, for
    EWC, `fisher.npz`; a checkpoint after every epoch while it trains; TensorBoard event
    files under `tensorboard/` (`train/` and `validation/`: every loss term, plugin term
    and metric per epoch).

    Under `distribute: mirrored | multiworker` the network is loaded, built and trained in
    the strategy's scope (`unicon_tf.train.distribute`); only the chief writes into `out`,
    other workers into a temporary folder removed at the end. Under a mixed `precision`
    the network trains with that dtype policy and is saved in float32
    (`unicon_tf.train.precision`). The other keyword arguments (`strategy`, `epochs`,
    `learning_rate`, `init`, `resume`, `callbacks`, `verbose`, `distribute`, `precision`,
    `profile_batch`, `accept_changes`) are `train_stage`'s.

    Args:
        pipeline: a `PipelineSpec`.
        stage: the stage's name.
        out: the stage's folder (a `StageFolder` or path); must not hold a trained stage.
        base: the previous stage's folder (`StageFolder` or path); None for the first stage.

    Returns:
        The record written to `stage.json`: `stage`, `index`, `fingerprint` (of the
        stage's definition), `pipeline`, `head`, `task`, `modalities`, `heads` (every head
        so far: `head`, `task`, `data`), `spec`, `strategy`, `plugins`, `cached_features`,
        `teacher` (`stage`, `model`, `sha256`; or `init`, `sha256`; or None), `data` (`path`,
        `fingerprint`), `history` (per-epoch logs), `train_seconds`, `finished`, versions
        (`unicon_tf`, `tensorflow`, `keras`), `fisher` (file name or None), `replicas`
        (in sync) and `selection` (the epoch kept, the monitored value and why training
        stopped: see `unicon_tf.train.selection.Selection.record`) and `resume_changes` (the
        changes a resume accepted: `after_epoch`, `changes` `{field: [checkpoint's, now]}`;
        empty when none); the returned dict adds
        `chief` (whether this process wrote `out`).

    Raises:
        StageError: `out` already holds a trained stage (never overwritten), or an
            interrupted one and `resume` is False; its checkpoint was written under another
            definition or data (without `accept_changes`) or does not fit the model; `base` is missing, untrained or from
            another definition of the previous stage; `init` for a later stage; the data's
            shape or modalities do not fit the model; EWC without a previous Fisher.
        TrainingError: the loss became NaN or infinite (the message names the step).
        PipelineError: an override is out of range.
        DataError: the data lacks the split, targets or modalities the stage needs.
    """
    index, spec = pipeline.stage(stage)
    fingerprint = spec.fingerprint()
    spec = with_overrides(spec, strategy=strategy, epochs=epochs, learning_rate=learning_rate, distribute=distribute,
                          precision=precision, profile_batch=profile_batch)
    distribution = get_strategy(spec.training.distribute)  # first: a multi-worker strategy must precede any TF op
    out = out if isinstance(out, StageFolder) else StageFolder(out)
    _check_out(out, spec, resume)
    if init is not None and index > 0:
        raise StageError("--init applies to the first stage only; later stages start from the previous one.")
    base, base_record = previous_stage(pipeline, index, base)
    written = StageFolder(chief_folder(out.path, distribution)) if distribution else out
    asked = {f"training.{k}" for k, v in dict(strategy=strategy, epochs=epochs, learning_rate=learning_rate,
                                              precision=precision).items() if v is not None}
    job = _StageJob(pipeline, index, spec, fingerprint, out, written, base, base_record, init, resume,
                    tuple(callbacks), verbose, distribution, accept_changes or asked)
    try:
        with distribution.scope() if distribution else contextlib.nullcontext():
            record = job.run()
    finally:
        release_folder(written.path, out.path)
    return record


def _check_out(out, spec, resume):
    """Refuse a stage folder that holds a trained stage, or an interrupted one without `resume`."""
    if out.model.exists():
        raise StageError(f"Stage '{spec.name}' is already trained in {out.path}; it is never overwritten: "
                         "use another --run-dir.")
    if out.checkpoint.exists() and not resume:
        raise StageError(f"{out.checkpoint} holds an interrupted run of stage '{spec.name}': "
                         "pass --resume (unicon-tf train or run) to continue it, or use another --run-dir.")


@dataclasses.dataclass
class _StageJob:
    """`fit_stage`'s work once its arguments are checked (run in the strategy's scope, if
    any): reads `out` (the checkpoint to resume), writes `written` (`out` on the chief).

    Attributes:
        pipeline, index, spec: the pipeline, the stage's position and its spec (overrides applied).
        fingerprint: the stage's definition's fingerprint (without overrides).
        out, written: the stage's folder, and the one this process writes (`out` on the chief).
        base, base_record: the previous stage's folder and record (None at stage 0).
        init, resume, callbacks, verbose: see `train_stage`.
        distribution: the `tf.distribute.Strategy`, or None.
        accept_changes: True, or the fields a resume may change (see `checkpoints.checked_resume`).
    """

    pipeline: PipelineSpec
    index: int
    spec: StageSpec
    fingerprint: str
    out: StageFolder
    written: StageFolder
    base: StageFolder | None
    base_record: dict | None
    init: object
    resume: bool
    callbacks: tuple
    verbose: int
    distribution: object
    accept_changes: object

    def run(self):
        """Train the stage, save its model and record; the record with `chief` added."""
        spec = self.spec
        assembled = assemble(self.pipeline, self.index, spec, self.init, self.base)
        schema = self._checked_schema(assembled)
        plugins = self._plugins(assembled, schema)
        make_data = self._stage_data(assembled, plugins)
        selection = _selection(spec, assembled.head, schema["splits"])
        trainer, train_data, val_data = stage_trainer(spec, assembled.network, assembled.head, plugins, make_data,
                                                      self.verbose)
        optimizer = FusedAdamW(spec.training.learning_rate, weight_decay=spec.training.weight_decay)
        trainer.compile(optimizer=optimizer_for(spec.training.precision, optimizer))
        loop = self._epoch_loop(assembled, trainer, (train_data, val_data), selection)
        state = self._start_state(loop, schema)
        started = time.time()
        state = loop.run(state, spec.training.epochs)
        selected = loop.keep_selected(state)
        for plugin in plugins:
            plugin.end_stage(assembled.network, assembled.head, make_data(0, augment=False, shuffle=False,
                                                                          batch_size=1), self.written)
        set_trainable(assembled.network, True)  # the saved model carries no freezing
        set_precision(assembled.network, "float32")  # the saved model computes in float32 (its variables are)
        record = self._record(assembled, trainer, plugins, state, selected, started)
        save_model(assembled.network, self.written.model)
        self.written.write_record(record.to_json())
        shutil.rmtree(self.written.checkpoint, ignore_errors=True)
        return {**record.to_json(), "chief": self.written.path == self.out.path}

    def _checked_schema(self, assembled: StageNetwork):
        """The stage's data's schema, checked against the head (see `unicon_tf.train.checks`)."""
        spec, head_layer, network = self.spec, assembled.head_layer, assembled.network
        schema = read_schema(spec.data)
        num_classes = getattr(head_layer, "num_classes", None)
        check_head_fits_data(spec.name, spec.data, schema, spec.task, head_layer.modalities, num_classes,
                             network.input[head_layer.modalities[0]].shape[1:4])
        check_train_split(spec.name, spec.data, schema, spec.task, num_classes, spec.training.batch_size)
        check_validation_split(spec.name, spec.data, schema, spec.task)
        return schema

    def _stage_data(self, assembled: StageNetwork, plugins):
        """`make_data(epoch, ...)`: the volumes of every modality the new head or a plugin's
        heads read (a distilled CT+PET head needs PET in a CT stage's batches)."""
        heads = [assembled.head] + [h for plugin in plugins for h in plugin.heads]
        make_data = stage_data(self.spec, read_modalities(assembled.network, heads), assembled.head)
        make_data(0)  # fail now, with the reason, if the data lacks this task's targets
        return make_data

    def _plugins(self, assembled: StageNetwork, schema):
        """The stage's plugins (`assembly.stage_plugins`), with the previous stage's Fisher."""
        fisher = load_fisher(self.base) if self.base else None
        ewc_later = any(s.training.penalty == "ewc" and s.training.beta > 0
                        for s in self.pipeline.stages[self.index + 1:])
        return stage_plugins(self.spec, assembled.network, assembled.teacher, schema["modalities"], fisher, ewc_later)

    def _epoch_loop(self, assembled: StageNetwork, trainer, data, selection):
        """The `EpochLoop`; `data`: `(train_data(epoch), val_data)`, spread over the replicas
        under a distribution strategy."""
        train_data, val_data = data
        steps = lambda epoch: {}  # noqa: E731
        distribution = self.distribution
        if distribution:
            local_train, local_val = train_data, val_data
            train_data = lambda epoch: replica_batches(distribution, lambda: local_train(epoch))  # noqa: E731
            val_data = None if local_val is None else replica_batches(distribution, lambda: local_val)
            # Known step counts: a step past the data's end would still update the metrics' counts.
            steps = lambda epoch: {"steps_per_epoch": int(local_train(epoch).cardinality()),  # noqa: E731
                                   "validation_steps": None if local_val is None else int(local_val.cardinality())}
        board = keras.callbacks.TensorBoard(self.written.tensorboard, profile_batch=self.spec.training.profile_batch,
                                            write_graph=False)
        return EpochLoop(self.spec.name, assembled.network, trainer, train_data, val_data, selection,
                         self.out.checkpoint, self.written.checkpoint, [board, *self.callbacks], steps, self.verbose)

    def _start_state(self, loop: EpochLoop, schema):
        """The state to train from: the checkpoint's on a resume (restored into the loop's
        network and trainer, its selection state into `loop.selection`), else epoch 0."""
        spec, checkpoint = self.spec, self.out.checkpoint
        identity = checkpoint_fingerprint(self.pipeline, spec)
        if self.resume and not checkpoint.exists():  # e.g. a mistyped --run-dir: say so, then train from the start
            warnings.warn(f"Stage '{spec.name}': --resume, but {checkpoint} holds no checkpoint: training from "
                          "epoch 1", ResumeWithoutCheckpointWarning, stacklevel=4)
        if not (self.resume and checkpoint.exists()):
            return initial_state(identity)
        state = resumed_state(checkpoint, loop.network, loop.trainer, spec, identity, self.accept_changes)
        loop.selection = _selection(spec, loop.selection.head, schema["splits"], state.get("selection"))
        carry_best_weights(checkpoint, self.written.checkpoint)
        if self.verbose:
            print(f"resuming stage '{spec.name}' after epoch {state['epoch']}")
        return state

    def _record(self, assembled: StageNetwork, trainer, plugins, state, selected, started):
        """The stage's `StageRecord` (see `fit_stage`'s Returns)."""
        spec, head, head_layer = self.spec, assembled.head, assembled.head_layer
        data = {"path": str(spec.data), "fingerprint": data_fingerprint(spec.data)}
        cached = isinstance(trainer, CachedHeadModel)
        return StageRecord(
            stage=spec.name, index=self.index, fingerprint=self.fingerprint, pipeline=self.pipeline.name, head=head,
            task=spec.task, modalities=head_layer.modalities,
            heads=(self.base_record["heads"] if self.base_record else []) + [
                {"head": head, "task": spec.task, "data": data["path"]}],
            spec=spec.to_json(),
            strategy=spec.training.strategy if head_layer.stage > 0 else "scratch",  # stage 0 trains everything
            plugins=[p.describe() for p in plugins], cached_features=cached,
            cache_bytes=trainer.cache_bytes if cached else 0, teacher=assembled.teacher_ref, data=data,
            history=state["history"], train_seconds=round(time.time() - started, 2),
            finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            unicon_tf=__version__, tensorflow=tf.__version__, keras=keras.__version__,
            fisher=self.written.fisher.name if self.written.fisher.exists() else None,
            replicas=self.distribution.num_replicas_in_sync if self.distribution else 1, selection=selected,
            resume_changes=state.get("changes", []))


def _selection(spec, head, splits, state=None):
    """The stage's `Selection` on data with `splits` (the schema's; `select` unset:
    `best_val` with a `val` split, `last` without, see `unicon_tf.train.selection`).

    Raises:
        StageError: best_val or patience without a `val` split.
    """
    selection = Selection.for_training(head, spec.task, spec.training, splits, state)
    if selection.needs_validation and "val" not in splits:
        raise StageError(f"Stage '{spec.name}': select: {selection.select}, patience: {selection.patience} need a "
                         f"'val' split, and {spec.data} has none: ingest one, or use select: last without patience.")
    return selection
