"""Train one stage of a pipeline: from the previous stage's folder into the stage's own.

A stage starts from the previous stage's `model.keras` (the teacher is a second, frozen
copy of it), expands it with the stage's head, trains it under the stage's strategy and
saves it next to its record, in the stage's folder (`unicon_tf.run.StageFolder`): the
model, `stage.json`, EWC's `fisher.npz`, and a checkpoint after every epoch while it
trains. A finished stage is never overwritten. `train_stage` does this inside a run
directory (`unicon_tf.run.Run`), `fit_stage` for any pair of folders (the Trainer).
"""

import contextlib
import datetime
import hashlib
import json
import math
import shutil
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from unicon_tf import presets
from unicon_tf._quiet import progress_verbosity
from unicon_tf.data import data_fingerprint, dataset, read_schema
from unicon_tf.files import atomic_folder, sha256
from unicon_tf.model import expand, foundation, model_parts, non_finite_weights
from unicon_tf.model.storage import load_model, save_model
from unicon_tf.run import Run, StageError, StageFolder
from unicon_tf.train.checks import check_head_fits_data, check_train_split, check_validation_split
from unicon_tf.train.continual import CachedHeadModel, ContinualModel
from unicon_tf.train.distribute import chief_folder, get_strategy, release_folder, replica_batches
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline, with_overrides
from unicon_tf.train.plugins import EWC, Distillation, WeightPenalty, load_fisher
from unicon_tf.train.precision import optimizer_for, set_precision
from unicon_tf.train.selection import Selection
from unicon_tf.train.strategies import configure_trainable, set_trainable, shared_trainable_variables
from unicon_tf.version import __version__


class TrainingError(RuntimeError):
    """Training stopped (a NaN or infinite loss); the message names the step and checkpoint."""


def train_stage(pipeline, stage, run_dir, strategy=None, epochs=None, learning_rate=None, init=None,
                resume=False, data_root=None, callbacks=(), verbose=1, distribute=None, precision=None,
                profile_batch=None, accept_changes=False):
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


def fit_stage(pipeline, stage, out, base=None, strategy=None, epochs=None, learning_rate=None, init=None,
              resume=False, callbacks=(), verbose=1, distribute=None, precision=None, profile_batch=None,
              accept_changes=False):
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
    (`unicon_tf.train.precision`).

    Args:
        pipeline: a `PipelineSpec`.
        stage: the stage's name.
        out: the stage's folder (a `StageFolder` or path); must not hold a trained stage.
        base: the previous stage's folder (`StageFolder` or path); None for the first stage.
        strategy, epochs, learning_rate, init, resume, callbacks, verbose, distribute, precision,
            profile_batch, accept_changes: see `train_stage`.

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
    hp = spec.training
    distribution = get_strategy(hp["distribute"])  # first: a multi-worker strategy must precede any TF op
    out = out if isinstance(out, StageFolder) else StageFolder(out)
    if out.model.exists():
        raise StageError(f"Stage '{spec.name}' is already trained in {out.path}; it is never overwritten: "
                         "use another --run-dir.")
    if out.checkpoint.exists() and not resume:
        raise StageError(f"{out.checkpoint} holds an interrupted run of stage '{spec.name}': "
                         "pass --resume to continue it, or use another --run-dir.")
    if init is not None and index > 0:
        raise StageError("--init applies to the first stage only; later stages start from the previous one.")
    base, base_record = _base(pipeline, index, base)
    written = StageFolder(chief_folder(out.path, distribution)) if distribution else out
    try:
        with distribution.scope() if distribution else contextlib.nullcontext():
            asked = {f"training.{k}" for k, v in dict(strategy=strategy, epochs=epochs, learning_rate=learning_rate,
                                                      precision=precision).items() if v is not None}
            record = _fit(pipeline, index, spec, fingerprint, out, written, base, base_record, init, resume,
                          callbacks, verbose, distribution, accept_changes or asked)
    finally:
        release_folder(written.path, out.path)
    return record


def _check_preset_contract(pipeline, spec):
    """Refuse a stage whose data was not ingested as the pipeline's encoder preset expects.

    Raises:
        StageError: naming the data folder, the preset and each mismatch (spacing, window,
            intensity range, shape).
    """
    name = pipeline.encoder.get("encoder")
    if name not in presets.PRESETS:
        return
    problems = presets.schema_mismatches(name, read_schema(spec.data), pipeline.modality)
    if problems:
        raise StageError(f"Stage '{spec.name}': {spec.data}/schema.json does not match encoder preset '{name}': "
                         + "; ".join(problems) + f". Ingest it with `unicon-tf ingest --preset {name}`.")


def _fit(pipeline, index, spec, fingerprint, out, written, base, base_record, init, resume, callbacks, verbose,
         distribution, accept_changes=False):
    """`fit_stage`'s work once its arguments are checked (in the strategy's scope, if any):
    reads `out` (the checkpoint to resume), writes `written` (`out` on the chief);
    `accept_changes`: see `_checked_resume`."""
    hp = spec.training
    _check_preset_contract(pipeline, spec)  # before the (large) pretrained encoder is built
    keras.utils.set_random_seed(hp["seed"])
    network, teacher, teacher_ref = _network_for_stage(pipeline, index, spec, init, base)
    if hp["precision"] != "float32":
        set_precision(network, hp["precision"])
        if teacher is not None:
            set_precision(teacher, hp["precision"])
    head = spec.head or _newest_head(network)
    head_layer = model_parts(network)["heads"][head]
    configure_trainable(network, head_layer.stage, hp["strategy"],
                        pretrained="weights" in pipeline.encoder or pipeline.encoder.get("encoder") in presets.PRESETS)

    schema = read_schema(spec.data)
    available = schema["modalities"]
    num_classes = getattr(head_layer, "num_classes", None)
    check_head_fits_data(spec.name, spec.data, schema, spec.task, head_layer.modalities, num_classes,
                         network.input[head_layer.modalities[0]].shape[1:4])
    check_train_split(spec.name, spec.data, schema, spec.task, num_classes, hp["batch_size"])
    check_validation_split(spec.name, spec.data, schema, spec.task)
    make_data = stage_data(spec, head_layer.modalities, head)
    make_data(0)  # fail now, with the reason, if the data lacks this task's targets

    fisher = load_fisher(base) if base else None
    ewc_later = any(s.training["penalty"] == "ewc" and s.training["beta"] > 0 for s in pipeline.stages[index + 1:])
    plugins = _plugins(spec, network, teacher, available, fisher, ewc_later)
    selection = _selection(spec, head, schema["splits"])
    trainer, train_data, val_data = _trainer(spec, network, head, plugins, make_data, verbose)
    optimizer = keras.optimizers.AdamW(hp["learning_rate"], weight_decay=hp["weight_decay"])
    trainer.compile(optimizer=optimizer_for(hp["precision"], optimizer))
    steps = lambda epoch: {}  # noqa: E731
    if distribution:
        local_train, local_val = train_data, val_data
        train_data = lambda epoch: replica_batches(distribution, lambda: local_train(epoch))  # noqa: E731
        val_data = None if local_val is None else replica_batches(distribution, lambda: local_val)
        # Known step counts: a step past the data's end would still update the metrics' counts.
        steps = lambda epoch: {"steps_per_epoch": int(local_train(epoch).cardinality()),  # noqa: E731
                               "validation_steps": None if local_val is None else int(local_val.cardinality())}
    board = keras.callbacks.TensorBoard(written.tensorboard, profile_batch=hp["profile_batch"], write_graph=False)

    checkpoint = out.checkpoint
    identity = checkpoint_fingerprint(pipeline, spec)
    state = {"epoch": 0, "history": [], "fingerprint": identity, "changes": []}
    if resume and not checkpoint.exists():  # e.g. a mistyped --run-dir: say so, then train from the start
        warnings.warn(f"Stage '{spec.name}': --resume, but {checkpoint} holds no checkpoint: training from "
                      "epoch 1", UserWarning, stacklevel=2)
    if resume and checkpoint.exists():
        changes = _checked_resume(checkpoint, spec, identity, accept_changes)
        state = _restore_checkpoint(checkpoint, network, trainer, spec, changes)
        if changes:
            state["changes"] = state.get("changes", []) + [{"after_epoch": state["epoch"], "changes": changes}]
        state["fingerprint"] = identity
        selection = _selection(spec, head, schema["splits"], state.get("selection"))
        if written.checkpoint != checkpoint and (checkpoint / BEST_WEIGHTS).exists():
            # A worker writing elsewhere takes the chief's best weights now, before any epoch:
            # the chief replaces its checkpoint after each one.
            written.checkpoint.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint / BEST_WEIGHTS, written.checkpoint / BEST_WEIGHTS)
        if verbose:
            print(f"resuming stage '{spec.name}' after epoch {state['epoch']}")
    started = time.time()
    guard = _NonFiniteGuard()
    for epoch in range(state["epoch"], hp["epochs"]):
        if selection.stop():  # stopped early before an interruption
            break
        trainer.fit(train_data(epoch), validation_data=val_data, initial_epoch=epoch, epochs=hp["epochs"],
                    callbacks=[_StopAfterOneEpoch(), guard, board, *callbacks], verbose=progress_verbosity(verbose),
                    shuffle=False,
                    **steps(epoch))
        logs = {k: float(v) for k, v in trainer.history.history.items() for v in v[-1:]}
        failure = guard.failure
        problem = (f"the loss became {failure['loss']} at epoch {epoch + 1}, step {failure['step']} (optimizer "
                   f"step {failure['iteration']})" if failure else _non_finite_state(network, logs, epoch))
        if problem:
            last = f"epoch {state['epoch']} in {checkpoint}" if checkpoint.exists() else "none yet"
            raise TrainingError(
                f"Stage '{spec.name}': {problem}. Nothing of that epoch is kept "
                f"(no checkpoint, no model); last good checkpoint: {last}. Lower the learning rate and "
                "rerun with --resume --learning-rate <lower>.")
        best = val_data is not None and selection.update(epoch + 1, logs)
        state = {**state, "epoch": epoch + 1, "history": state["history"] + [logs], "selection": selection.state()}
        _save_checkpoint(written.checkpoint, network, trainer, state, best=best)
        if verbose and val_data is not None:
            print(f"epoch {epoch + 1}: {selection.key} {logs[selection.key]:.4f}" + (
                " (best so far)" if best else f" (best: epoch {selection.best_epoch}, {selection.best})"))

    selected = selection.record(state["epoch"], state["history"])
    if selected["epoch"] != state["epoch"]:
        network.load_weights(next(folder / BEST_WEIGHTS for folder in (written.checkpoint, checkpoint)
                                  if (folder / BEST_WEIGHTS).exists()))
    if verbose and val_data is not None:
        print(f"stage '{spec.name}': {selected['reason']}")
    for plugin in plugins:
        plugin.end_stage(network, head, make_data(0, augment=False, shuffle=False, batch_size=1), written)
    set_trainable(network, True)  # the saved model carries no freezing
    set_precision(network, "float32")  # the saved model computes in float32 (its variables are float32)
    data = {"path": str(spec.data), "fingerprint": data_fingerprint(spec.data)}
    earlier = base_record["heads"] if base_record else []
    record = {
        "stage": spec.name, "index": index, "fingerprint": fingerprint, "pipeline": pipeline.name, "head": head,
        "task": spec.task, "modalities": head_layer.modalities,
        "heads": earlier + [{"head": head, "task": spec.task, "data": data["path"]}], "spec": spec.to_json(),
        "strategy": hp["strategy"] if head_layer.stage > 0 else "scratch",  # stage 0 trains everything
        "plugins": [p.describe() for p in plugins], "cached_features": isinstance(trainer, CachedHeadModel),
        "cache_bytes": trainer.cache_bytes if isinstance(trainer, CachedHeadModel) else 0,
        "teacher": teacher_ref, "data": data,
        "history": state["history"], "train_seconds": round(time.time() - started, 2),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "unicon_tf": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
        "fisher": written.fisher.name if written.fisher.exists() else None,
        "replicas": distribution.num_replicas_in_sync if distribution else 1, "selection": selected,
        "resume_changes": state.get("changes", []),
    }
    save_model(network, written.model)
    written.write_record(record)
    shutil.rmtree(written.checkpoint, ignore_errors=True)
    return {**record, "chief": written.path == out.path}


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


def _base(pipeline, index, base):
    """`(StageFolder, record)` of the previous stage, checked against the pipeline; (None, None)
    for the first stage."""
    if index == 0:
        return None, None
    previous = pipeline.stages[index - 1]
    if base is None:
        raise StageError(f"Stage '{pipeline.stages[index].name}' starts from stage '{previous.name}': "
                         "give its trained folder (the Trainer's base_model).")
    base = base if isinstance(base, StageFolder) else StageFolder(base)
    record = base.record()
    if record["fingerprint"] != previous.fingerprint():
        raise StageError(f"{base.path} was trained from a different definition of stage '{previous.name}' "
                         "(another pipeline or an edited one): use another --run-dir.")
    return base, record


def _newest_head(network):
    heads = model_parts(network)["heads"].values()
    return max(heads, key=lambda h: h.stage).name


def _network_for_stage(pipeline, index, spec, init, base):
    """(network, teacher or None, teacher reference) for the stage."""
    options = dict(spec.head_options)
    if index == 0:
        if init is not None:
            network = load_model(init)
            if (spec.head or spec.task) not in network.output:  # otherwise train the head it has
                network = expand(network, task=spec.task, name=spec.head, adapters=spec.adapters,
                                 adapter_start=spec.adapter_start, **spec.path_options, **options)
            return network, None, {"init": str(init), "sha256": sha256(init)}
        network = foundation(pipeline.input_shape, modality=pipeline.head_modalities(0), task=spec.task,
                             name=pipeline.name, head_name=spec.head, **pipeline.encoder, **options)
        return network, None, None
    previous = base.model
    network = load_model(previous)
    teacher = load_model(previous)
    network = expand(network, task=spec.task, modality=spec.modality, name=spec.head, adapters=spec.adapters,
                     modalities=list(spec.modalities) if spec.modalities else None,
                     adapter_start=spec.adapter_start, **spec.path_options, **options)
    reference = {"stage": pipeline.stages[index - 1].name, "model": str(previous), "sha256": sha256(previous)}
    return network, teacher, reference


def stage_data(spec, modalities, head):
    """`make(epoch, split="train", ...)`: a stage's data for an epoch, targets keyed by head.

    The seed of shuffling and augmentation depends only on (stage seed, epoch), so an
    interrupted stage resumes on exactly the batches it would have seen.
    """
    hp = spec.training

    def make(epoch, split="train", augment=None, shuffle=None, batch_size=None):
        # The training batches (augment not given) only: validation, Fisher and cached features see the stored crops.
        sampled = split == "train" and augment is None
        ds = dataset(spec.data, split, task=spec.task, batch_size=batch_size or hp["batch_size"],
                     augment=hp["augment"] if augment is None else augment, seed=hp["seed"] * 1000 + epoch,
                     shuffle=shuffle, modalities=modalities,
                     foreground_probability=_foreground_probability(hp) if sampled else None)
        return ds.map(lambda x, y: (x, {head: y}))

    return make


def _foreground_probability(training):
    """The stage's `sampling: {foreground_probability}` (None: the stored crops)."""
    return (training.get("sampling") or {}).get("foreground_probability")


def _plugins(spec, network, teacher, available, fisher, ewc_later):
    """The stage's plugins: LwF and L2-SP or EWC under `finetune`; an inactive EWC that only
    adds this stage's Fisher when a later stage uses EWC."""
    hp = spec.training
    finetune = hp["strategy"] == "finetune"
    plugins = []
    if finetune and teacher is not None and hp["alpha"] > 0:
        old = {name: h.task for name, h in model_parts(teacher)["heads"].items()}
        plugins.append(Distillation(teacher, old, alpha=hp["alpha"], temperature=hp["temperature"],
                                    modalities=available))
    ewc = finetune and hp["beta"] > 0 and hp["penalty"] == "ewc" and teacher is not None
    if ewc and fisher is None:
        raise StageError(f"Stage '{spec.name}' uses EWC, but the previous stage saved no fisher.npz "
                         "(it is written when a later stage declares penalty: ewc): retrain it.")
    if finetune and hp["beta"] > 0 and not ewc:
        plugins.append(WeightPenalty(shared_trainable_variables(network), beta=hp["beta"]))
    if ewc or ewc_later:
        plugins.append(EWC(shared_trainable_variables(network), model_parts(network)["encoder"].base_weights(),
                           beta=hp["beta"] if ewc else 0.0, fisher=fisher, gamma=hp["ewc_gamma"]))
    return plugins


CACHE_LIMIT_BYTES = 4 * 2**30
"""The most memory cached encoder features may take; above it a stage trains uncached (warned)."""


def _trainer(spec, network, head, plugins, make_data, verbose=0):
    """The Keras model that trains the stage, and `(train_data(epoch), val_data)`.

    The new head trains on encoder features computed once per patient (`cache_features`)
    when nothing upstream of it trains: the encoder's base weights (frozen strategy, or a
    pretrained encoder at stage 0), its stems and fusion, and it has no adapter, reads no
    volumes (side encoder) and samples no foreground crops. Multi-scale features are cached
    for dense heads; the cache's size is checked against `CACHE_LIMIT_BYTES` first.
    """
    head_layer = model_parts(network)["heads"][head]
    loss = spec.training.get("loss") or {}
    has_val = "val" in read_schema(spec.data)["splits"]
    parts = model_parts(network)
    upstream = [parts["stems"][m] for m in head_layer.modalities] + \
        [f for f in [parts["fusions"].get(tuple(head_layer.modalities))] if f is not None]
    frozen_upstream = not shared_trainable_variables(network) and not any(p.trainable_weights for p in upstream)
    if spec.training["cache_features"] and frozen_upstream and head_layer.adapter is None \
            and not head_layer.reads_volumes and _foreground_probability(spec.training) is None:
        extractor = keras.Model({m: network.input[m] for m in head_layer.modalities},
                                head_layer.used_features(head_layer.input))
        counts = {split: read_schema(spec.data)["splits"][split]["count"] for split in ("train", "val")
                  if split in read_schema(spec.data)["splits"]}
        per_patient = sum(math.prod(s[1:]) * 4 for s in _shapes(extractor.output))
        size = per_patient * sum(counts.values())
        if size > CACHE_LIMIT_BYTES:
            warnings.warn(f"Stage '{spec.name}': cached features would take {size / 2**30:.1f} GiB "
                          f"(> {CACHE_LIMIT_BYTES / 2**30:.0f} GiB): training without the cache.")
        else:
            return _cached_trainer(spec, network, head, loss, extractor, make_data, has_val, counts, verbose)

    heads = [head] + [h for plugin in plugins for h in plugin.heads]
    needed = {m for h in heads for m in parts["heads"][h].modalities}
    inputs = {m: network.input[m] for m in network.input if m in needed}
    outputs = {h: network.output[h] for h in heads}
    subnetwork = keras.Model(inputs, outputs, name=network.name)
    val_data = make_data(0, "val", augment=False, shuffle=False) if has_val else None
    return ContinualModel(subnetwork, {head: spec.task}, plugins, loss_options={head: loss}), make_data, val_data


def _cached_trainer(spec, network, head, loss, extractor, make_data, has_val, counts, verbose):
    """A `CachedHeadModel` on features extracted once (train and val), and its datasets."""
    cached_train = _cache_features(extractor, make_data(0, augment=False, shuffle=False),
                                   counts["train"] if verbose else None, "train")
    cached_val = _cache_features(extractor, make_data(0, "val", augment=False, shuffle=False),
                                 counts.get("val") if verbose else None, "val") if has_val else None
    batch, seed = spec.training["batch_size"], spec.training["seed"]

    def train_data(epoch):
        features, targets = cached_train
        count = len(targets[head])
        ds = tf.data.Dataset.from_tensor_slices((features, targets)).shuffle(count, seed=seed * 1000 + epoch)
        return ds.batch(batch)

    val_data = None if cached_val is None else tf.data.Dataset.from_tensor_slices(cached_val).batch(batch)
    trainer = CachedHeadModel(network, head, spec.task, loss_options={head: loss})
    trainer.cache_bytes = sum(int(f.nbytes) for cache in (cached_train, cached_val) if cache for f in cache[0])
    if verbose:
        print(f"cached encoder features: {trainer.cache_bytes / 2**20:.1f} MiB in memory")
    return trainer, train_data, val_data


def _shapes(outputs):
    return [tuple(o.shape) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _cache_features(extractor, ds, count=None, split="train"):
    """One pass of the frozen feature extractor: `(features tuple, {head: targets})` in memory,
    with a progress bar over `count` patients when given."""
    progress = keras.utils.Progbar(count, unit_name="patient", verbose=progress_verbosity(1)) if count else None
    if progress is not None:
        print(f"extracting encoder features ({split})")
    features, targets = [], []
    for x, y in ds:
        out = extractor(x, training=False)
        features.append([np.asarray(f) for f in (out if isinstance(out, (list, tuple)) else [out])])
        targets.append(y)
        if progress is not None:
            progress.add(len(features[-1][0]))
    stacked = tuple(np.concatenate([f[i] for f in features]) for i in range(len(features[0])))
    merged = {k: np.concatenate([np.asarray(t[k]) for t in targets]) for k in targets[0]}
    return stacked, merged


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


def _random_state_variables(trainer):
    """The trainer's random state: every Keras `SeedGenerator` (dropout and noise layers).

    Keras' weight files leave them out; a resumed stage restores them so that dropout
    draws the masks the uninterrupted run would have drawn.
    """
    weights = {id(v) for v in trainer.weights}
    return [v for v in trainer.variables if id(v) not in weights]


BEST_WEIGHTS = "best.weights.h5"
"""In a checkpoint: the network's weights at the best validation epoch so far."""


def _save_checkpoint(directory, network, trainer, state, best=False):
    """Weights, optimizer and random state, progress: written to a staging folder then swapped in.

    Only called after `_non_finite_state` found nothing wrong, so every checkpoint is good.
    `best`: this epoch is the best on validation so far, so its weights become
    `BEST_WEIGHTS`; otherwise the previous checkpoint's are carried over.
    """
    carried = directory / BEST_WEIGHTS if (directory / BEST_WEIGHTS).exists() else None
    with atomic_folder(directory, replace=True) as partial:
        network.save_weights(partial / "network.weights.h5")
        if best:
            shutil.copy2(partial / "network.weights.h5", partial / BEST_WEIGHTS)
        elif carried is not None:
            shutil.copy2(carried, partial / BEST_WEIGHTS)
        store = {}
        trainer.optimizer.save_own_variables(store)
        np.savez(partial / "optimizer.npz", **store)
        np.savez(partial / "random_state.npz", *[np.asarray(v) for v in _random_state_variables(trainer)])
        (partial / "state.json").write_text(json.dumps(state, indent=1))


RESUMABLE_KEYS = ("training.epochs", "training.profile_batch", "training.distribute", "resources")
"""Fields a resume may change without `--accept-changes`: more epochs, profiling, the
devices (the update of a global batch is the same on any number of replicas), resources."""


def checkpoint_fingerprint(pipeline, spec, data=True):
    """What a checkpoint records of how its weights were made: every field of the stage's
    definition (the pipeline's grid and encoder, the stage's keys and training keys, flat,
    e.g. `encoder.width`, `training.learning_rate`) and its data (`path`, `fingerprint`).

    Args:
        pipeline: the `PipelineSpec`.
        spec: the stage's `StageSpec`, overrides applied.
        data: also fingerprint the data folder (`unicon_tf.data.data_fingerprint`).

    Returns:
        `{"sha256": of the fields, "fields": {name: value}, "data": {"path", "fingerprint"} or None}`.

    Example:
    >>> from unicon_tf.train.pipeline import PipelineSpec, StageSpec, TRAINING_DEFAULTS
    >>> import pathlib
    >>> stage = StageSpec("a", "prognosis", pathlib.Path("data"), training=dict(TRAINING_DEFAULTS))
    >>> pipeline = PipelineSpec("p", pathlib.Path("p.yaml"), (8, 8, 8), "ct", {"width": 4}, [stage])
    >>> fields = checkpoint_fingerprint(pipeline, stage, data=False)["fields"]
    >>> fields["encoder.width"], fields["training.learning_rate"], "data" in fields
    (4, 0.0003, False)
    """
    definition = {"input_shape": list(pipeline.input_shape), "modality": pipeline.modality,
                  "encoder": dict(pipeline.encoder), **{k: v for k, v in spec.to_json().items() if k != "data"}}
    fields = {k: v for k, v in _flat(definition).items() if not k.startswith(RESUMABLE_KEYS)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    folder = {"path": str(spec.data), "fingerprint": data_fingerprint(spec.data)} if data else None
    return {"sha256": digest, "fields": fields, "data": folder}


def _flat(value, prefix=""):
    """`{"a.b": leaf}` of a nested dict (lists are leaves, as JSON keeps them)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.loads(json.dumps(value, default=str))}


def _checked_resume(checkpoint, spec, identity, accept_changes):
    """`{field: [checkpoint's value, now]}` of what changed since the checkpoint was written.

    `accept_changes`: True accepts every change; a set of field names (the overrides given
    with the resume) accepts those.

    Raises:
        StageError: a change not accepted (the message names every changed field).
    """
    state_file = checkpoint / "state.json"
    recorded = json.loads(state_file.read_text()).get("fingerprint") if state_file.exists() else None
    if recorded is None:
        warnings.warn(f"{checkpoint} was written by an older unicon-tf that recorded no fingerprint of the stage's "
                      "definition and data: the resume cannot check that they are unchanged.", stacklevel=3)
        return {}
    old, new = recorded["fields"], identity["fields"]
    changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if (recorded["data"] or {}).get("fingerprint") != (identity["data"] or {}).get("fingerprint"):
        changes["data"] = [(recorded["data"] or {}).get("path"), (identity["data"] or {}).get("path")]
    if changes and accept_changes is not True and set(changes) - set(accept_changes or ()):
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
        raise StageError(f"Stage '{spec.name}': {checkpoint} was written under another definition or data than the "
                         f"stage's now ({listed}). Undo the change, pass --resume --accept-changes to continue "
                         "anyway (recorded in stage.json), or use another --run-dir.")
    return changes


def _restore_checkpoint(directory, network, trainer, spec=None, changes=None):
    try:
        with warnings.catch_warnings():  # Keras warns once per layer it cannot match before it fails
            warnings.simplefilter("ignore")
            network.load_weights(directory / "network.weights.h5")
    except (ValueError, KeyError):  # Keras: "A total of N objects could not be loaded", mismatched shapes
        changed = f" (changed since it was written: {', '.join(changes)})" if changes else ""
        raise StageError(f"Stage '{spec.name if spec else '?'}': {directory} does not fit the stage's model{changed}: "
                         "its weights were written for another network (other layers or shapes). Delete it to train "
                         "the stage from its start, or use another --run-dir.") from None
    bad = non_finite_weights(network)
    if bad:
        raise StageError(f"{directory} holds non-finite weights (e.g. {bad[0]}; written by an older unicon-tf "
                         "that did not check them): delete it and train the stage again.")
    trainer.optimizer.build(trainer.trainable_variables)
    with np.load(directory / "optimizer.npz") as saved:
        trainer.optimizer.load_own_variables({k: saved[k] for k in saved.files})
    random_state = _random_state_variables(trainer)
    if not (directory / "random_state.npz").exists():
        warnings.warn(f"{directory} has no random_state.npz (written by an older unicon-tf): dropout "
                      "masks after resuming will differ from an uninterrupted run.", stacklevel=2)
        return json.loads((directory / "state.json").read_text())
    with np.load(directory / "random_state.npz") as saved:
        if len(saved.files) != len(random_state):
            raise StageError(f"{directory} holds {len(saved.files)} random states, but the stage's model has "
                             f"{len(random_state)}: it was written for another model; use another --run-dir.")
        for index, variable in enumerate(random_state):
            variable.assign(saved[f"arr_{index}"])
    return json.loads((directory / "state.json").read_text())
