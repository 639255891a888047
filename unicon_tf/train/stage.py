"""Train one stage of a pipeline into a run directory, the registry of the stages so far.

    <run>/run.json                          pipeline name and file, each stage's status
    <run>/stages/NN-<stage>/model.keras     the network after the stage
    <run>/stages/NN-<stage>/stage.json      strategy, hyper-parameters, plugins, history,
                                            teacher reference, data fingerprints, timings
    <run>/stages/NN-<stage>/fisher.npz      diagonal Fisher of the encoder (when a later
                                            stage uses EWC)
    <run>/stages/NN-<stage>/checkpoint/     weights and optimizer state after every epoch,
                                            removed when the stage completes

A stage starts from the previous stage's `model.keras` (the teacher is a second, frozen
copy of it), expands it with the stage's head, trains it under the stage's strategy and
saves it next to its record. A finished stage is never overwritten.
"""

import datetime
import hashlib
import json
import os
import pathlib
import shutil
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from unicon_tf.data import dataset, read_schema
from unicon_tf.data.records import sha256
from unicon_tf.files import save_model_atomic, write_json_atomic
from unicon_tf.model import expand, foundation, model_parts, non_finite_weights
from unicon_tf.train.continual import CachedHeadModel, ContinualModel
from unicon_tf.train.losses import TASK_LOSSES
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline, with_overrides
from unicon_tf.train.plugins import Distillation, WeightPenalty
from unicon_tf.train.strategies import configure_trainable, set_trainable, shared_trainable_variables
from unicon_tf.version import __version__


class StageError(RuntimeError):
    """A stage that cannot start: a missing or mismatched previous stage, a finished stage."""


class TrainingError(RuntimeError):
    """Training stopped (a NaN or infinite loss); the message names the step and checkpoint."""


def data_fingerprint(directory):
    """SHA-256 over the shard checksums recorded in an ingested folder's schema."""
    schema = read_schema(directory)
    shards = sorted(s["sha256"] for split in schema["splits"].values() for s in split["shards"])
    return hashlib.sha256("".join(shards).encode()).hexdigest()


def stage_folder(run_dir, index, name):
    """Where stage `index` called `name` of a run lives: `<run>/stages/NN-<name>`."""
    return pathlib.Path(run_dir) / "stages" / f"{index:02d}-{name}"


class RunDirectory:
    """A run directory bound to one pipeline: where each stage's model and record live.

    Args:
        path: the run directory (created on first use).
        pipeline: the `PipelineSpec` it belongs to; a run of another pipeline is refused.
    """

    def __init__(self, path, pipeline):
        self.path, self.pipeline = pathlib.Path(path), pipeline
        self.record_file = self.path / "run.json"
        if self.record_file.exists():
            self.record = json.loads(self.record_file.read_text())
            if self.record["pipeline"] != pipeline.name:
                raise StageError(f"{self.path} holds a run of pipeline '{self.record['pipeline']}', "
                                 f"not '{pipeline.name}': use another --run-dir.")
        else:
            self.record = {"pipeline": pipeline.name, "pipeline_file": str(pipeline.path), "stages": {}}

    def stage_dir(self, index):
        return stage_folder(self.path, index, self.pipeline.stages[index].name)

    def model_path(self, index):
        return self.stage_dir(index) / "model.keras"

    def trained_model(self, index):
        """The saved model of stage `index`, checked against the pipeline's spec."""
        spec = self.pipeline.stages[index]
        entry = self.record["stages"].get(spec.name)
        path = self.model_path(index)
        if entry is None or entry.get("status") != "trained" or not path.exists():
            raise StageError(f"Stage '{spec.name}' must be trained first: {path} is missing "
                             f"(unicon-tf train --stage {spec.name}).")
        if entry["fingerprint"] != spec.fingerprint():
            raise StageError(f"{path} was trained from a different definition of stage '{spec.name}' "
                             "(another pipeline or an edited one): use another --run-dir.")
        return path

    def mark(self, index, **fields):
        spec = self.pipeline.stages[index]
        entry = self.record["stages"].setdefault(spec.name, {})
        entry.update(index=index, fingerprint=spec.fingerprint(), **fields)
        write_json_atomic(self.record_file, self.record)


def train_stage(pipeline, stage, run_dir, strategy=None, epochs=None, learning_rate=None, init=None,
                resume=False, data_root=None, callbacks=(), verbose=1):
    """Train stage `stage` of `pipeline` into `run_dir` and return its record (stage.json).

    Args:
        pipeline: a `PipelineSpec` or the path of a pipeline YAML.
        stage: the stage's name.
        run_dir: the run directory.
        strategy, epochs, learning_rate: override the pipeline's values for this stage.
        init: for the first stage, a `.keras` model to start from instead of `foundation`.
        resume: continue an interrupted stage from its last epoch checkpoint.
        data_root: resolve the pipeline's relative data paths against this folder.
        callbacks: extra Keras callbacks for `fit`.
        verbose: Keras progress-bar verbosity (0 silent, 1 bar, 2 one line per epoch).

    Raises:
        StageError, TrainingError, PipelineError, DataError with the reason.

    Example:
    >>> record = train_stage("pipelines/chest_ct.yaml", "prognosis", "runs/chest_ct")  # doctest: +SKIP
    """
    if not isinstance(pipeline, PipelineSpec):
        pipeline = load_pipeline(pipeline, data_root=data_root)
    index, spec = pipeline.stage(stage)
    spec = with_overrides(spec, strategy=strategy, epochs=epochs, learning_rate=learning_rate)
    hp = spec.training
    run = RunDirectory(run_dir, pipeline)
    out = run.stage_dir(index)
    if run.model_path(index).exists():
        raise StageError(f"Stage '{spec.name}' is already trained in {out}; it is never overwritten: "
                         "use another --run-dir.")
    checkpoint = out / "checkpoint"
    if checkpoint.exists() and not resume:
        raise StageError(f"{checkpoint} holds an interrupted run of stage '{spec.name}': "
                         "pass --resume to continue it, or use another --run-dir.")
    if init is not None and index > 0:
        raise StageError("--init applies to the first stage only; later stages start from the previous one.")

    keras.utils.set_random_seed(hp["seed"])
    network, teacher, teacher_ref = _network_for_stage(run, pipeline, index, spec, init)
    head = spec.head or _newest_head(network)
    head_layer = model_parts(network)["heads"][head]
    configure_trainable(network, head_layer.stage, hp["strategy"])

    schema = read_schema(spec.data)
    available = schema["modalities"]
    model_shape = list(network.input[head_layer.modalities[0]].shape[1:4])
    if schema["preprocessing"]["shape"] != model_shape:
        raise StageError(f"Stage '{spec.name}': {spec.data} holds volumes of shape {schema['preprocessing']['shape']}, "
                         f"but the model takes {model_shape}: ingest the data with --shape {' '.join(map(str, model_shape))}.")
    missing = [m for m in head_layer.modalities if m not in available]
    if missing:
        raise StageError(f"Stage '{spec.name}': head '{head}' reads {missing}, but {spec.data} has only "
                         f"{available}.")
    make_data = stage_data(spec, head_layer.modalities, head)
    make_data(0)  # fail now, with the reason, if the data lacks this task's targets

    fisher = load_fisher(run.stage_dir(index - 1)) if index > 0 else None
    plugins = _plugins(spec, network, teacher, available, fisher)
    trainer, train_data, val_data = _trainer(spec, network, head, plugins, make_data)
    trainer.compile(optimizer=keras.optimizers.AdamW(hp["learning_rate"], weight_decay=hp["weight_decay"]))

    state = {"epoch": 0, "history": []}
    if resume and checkpoint.exists():
        state = _restore_checkpoint(checkpoint, network, trainer)
        if verbose:
            print(f"resuming stage '{spec.name}' after epoch {state['epoch']}")
    started = time.time()
    guard = _NonFiniteGuard()
    for epoch in range(state["epoch"], hp["epochs"]):
        trainer.fit(train_data(epoch), validation_data=val_data, initial_epoch=epoch, epochs=hp["epochs"],
                    callbacks=[_StopAfterOneEpoch(), guard, *callbacks], verbose=verbose, shuffle=False)
        logs = {k: float(v) for k, v in trainer.history.history.items() for v in v[-1:]}
        failure = guard.failure
        problem = (f"the loss became {failure['loss']} at epoch {epoch + 1}, step {failure['step']} (optimizer "
                   f"step {failure['iteration']})" if failure else _non_finite_state(network, logs, epoch))
        if problem:
            last = f"epoch {state['epoch']} in {checkpoint}" if checkpoint.exists() else "none yet"
            raise TrainingError(
                f"Stage '{spec.name}': {problem}. Nothing of that epoch is kept "
                f"(no checkpoint, no model); last good checkpoint: {last}. Lower the learning rate and "
                "rerun with --resume.")
        state = {"epoch": epoch + 1, "history": state["history"] + [logs]}
        _save_checkpoint(checkpoint, network, trainer, state)

    fisher = _fisher_if_needed(pipeline, index, network, head, make_data)
    if fisher:
        np.savez(out / "fisher.npz", **{_npz_key(k): v for k, v in fisher.items()})
    set_trainable(network, True)  # the saved model carries no freezing
    record = {
        "stage": spec.name, "index": index, "head": head, "task": spec.task,
        "modalities": head_layer.modalities, "spec": spec.to_json(),
        "strategy": hp["strategy"] if head_layer.stage > 0 else "scratch",  # stage 0 trains everything
        "plugins": [p.describe() for p in plugins], "cached_features": isinstance(trainer, CachedHeadModel),
        "teacher": teacher_ref, "data": {"path": str(spec.data), "fingerprint": data_fingerprint(spec.data)},
        "history": state["history"], "train_seconds": round(time.time() - started, 2),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "unicon_tf": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
        "fisher": "fisher.npz" if fisher else None,
    }
    save_model_atomic(network, run.model_path(index))
    write_json_atomic(out / "stage.json", record)
    shutil.rmtree(checkpoint, ignore_errors=True)
    run.mark(index, status="trained", model=str(run.model_path(index).relative_to(run.path)))
    return record


def _newest_head(network):
    heads = model_parts(network)["heads"].values()
    return max(heads, key=lambda h: h.stage).name


def _network_for_stage(run, pipeline, index, spec, init):
    """(network, teacher or None, teacher reference) for the stage."""
    options = dict(spec.head_options)
    if index == 0:
        if init is not None:
            network = keras.models.load_model(init)
            if (spec.head or spec.task) not in network.output:  # otherwise train the head it has
                network = expand(network, task=spec.task, name=spec.head, adapters=spec.adapters,
                                 adapter_start=spec.adapter_start, **options)
            return network, None, {"init": str(init), "sha256": sha256(init)}
        modalities = list(spec.modalities) if spec.modalities else spec.modality or pipeline.modality
        network = foundation(pipeline.input_shape, modality=modalities, task=spec.task, name=pipeline.name,
                             head_name=spec.head, **pipeline.encoder, **options)
        return network, None, None
    previous = run.trained_model(index - 1)
    network = keras.models.load_model(previous)
    teacher = keras.models.load_model(previous)
    network = expand(network, task=spec.task, modality=spec.modality, name=spec.head, adapters=spec.adapters,
                     modalities=list(spec.modalities) if spec.modalities else None,
                     adapter_start=spec.adapter_start, **options)
    reference = {"stage": pipeline.stages[index - 1].name, "model": str(previous), "sha256": sha256(previous)}
    return network, teacher, reference


def stage_data(spec, modalities, head):
    """`make(epoch, split="train", ...)`: a stage's data for an epoch, targets keyed by head.

    The seed of shuffling and augmentation depends only on (stage seed, epoch), so an
    interrupted stage resumes on exactly the batches it would have seen.
    """
    hp = spec.training

    def make(epoch, split="train", augment=None, shuffle=None, batch_size=None):
        ds = dataset(spec.data, split, task=spec.task, batch_size=batch_size or hp["batch_size"],
                     augment=hp["augment"] if augment is None else augment, seed=hp["seed"] * 1000 + epoch,
                     shuffle=shuffle, modalities=modalities)
        return ds.map(lambda x, y: (x, {head: y}))

    return make


def _plugins(spec, network, teacher, available, fisher):
    hp = spec.training
    if hp["strategy"] != "finetune":
        return []
    plugins = []
    if teacher is not None and hp["alpha"] > 0:
        old = {name: h.task for name, h in model_parts(teacher)["heads"].items()}
        plugins.append(Distillation(teacher, old, alpha=hp["alpha"], temperature=hp["temperature"],
                                    modalities=available))
    if hp["beta"] > 0:
        importance = None
        if hp["penalty"] == "ewc" and teacher is not None:
            if fisher is None:
                raise StageError(f"Stage '{spec.name}' uses EWC, but the previous stage saved no fisher.npz "
                                 "(it is written when a later stage declares penalty: ewc): retrain it.")
            importance = fisher
        plugins.append(WeightPenalty(shared_trainable_variables(network), beta=hp["beta"], importance=importance))
    return plugins


def _trainer(spec, network, head, plugins, make_data):
    """The Keras model that trains the stage, and `(train_data(epoch), val_data)`."""
    head_layer = model_parts(network)["heads"][head]
    has_val = "val" in read_schema(spec.data)["splits"]
    parts = model_parts(network)
    upstream_old = all(parts["stems"][m].stage < head_layer.stage for m in head_layer.modalities)
    fusion = parts["fusions"].get(tuple(head_layer.modalities))
    upstream_old = upstream_old and (fusion is None or fusion.stage < head_layer.stage)
    if spec.training["strategy"] == "frozen" and spec.training["cache_features"] and upstream_old \
            and head_layer.adapter is None and head_layer.stage > 0:
        extractor = keras.Model({m: network.input[m] for m in head_layer.modalities},
                                head_layer.used_features(head_layer.input))
        cached_train = _cache_features(extractor, make_data(0, augment=False, shuffle=False))
        cached_val = _cache_features(extractor, make_data(0, "val", augment=False, shuffle=False)) if has_val else None
        batch, seed = spec.training["batch_size"], spec.training["seed"]

        def train_data(epoch):
            features, targets = cached_train
            count = len(targets[head])
            ds = tf.data.Dataset.from_tensor_slices((features, targets)).shuffle(count, seed=seed * 1000 + epoch)
            return ds.batch(batch)

        val_data = None if cached_val is None else tf.data.Dataset.from_tensor_slices(cached_val).batch(batch)
        return CachedHeadModel(network, head, spec.task), train_data, val_data

    inputs = {m: network.input[m] for m in network.input if m in _needed_modalities(network, head, plugins)}
    outputs = {head: network.output[head]}
    for plugin in plugins:
        if isinstance(plugin, Distillation):
            outputs.update({h: network.output[h] for h in plugin.heads})
    subnetwork = keras.Model(inputs, outputs, name=network.name)
    val_data = make_data(0, "val", augment=False, shuffle=False) if has_val else None
    return ContinualModel(subnetwork, {head: spec.task}, plugins), make_data, val_data


def _needed_modalities(network, head, plugins):
    heads = model_parts(network)["heads"]
    names = {head} | {h for p in plugins if isinstance(p, Distillation) for h in p.heads}
    return {m for name in names for m in heads[name].modalities}


def _cache_features(extractor, ds):
    """One pass of the frozen feature extractor: `(features tuple, {head: targets})` in memory."""
    features, targets = [], []
    for x, y in ds:
        out = extractor(x, training=False)
        features.append([np.asarray(f) for f in (out if isinstance(out, (list, tuple)) else [out])])
        targets.append(y)
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


def _save_checkpoint(directory, network, trainer, state):
    """Weights, optimizer and random state, progress: written to a temp folder then swapped in.

    Only called after `_non_finite_state` found nothing wrong, so every checkpoint is good.
    """
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    network.save_weights(partial / "network.weights.h5")
    store = {}
    trainer.optimizer.save_own_variables(store)
    np.savez(partial / "optimizer.npz", **store)
    np.savez(partial / "random_state.npz", *[np.asarray(v) for v in _random_state_variables(trainer)])
    (partial / "state.json").write_text(json.dumps(state, indent=1))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(partial, directory)
    shutil.rmtree(old, ignore_errors=True)


def _restore_checkpoint(directory, network, trainer):
    network.load_weights(directory / "network.weights.h5")
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


def _fisher_if_needed(pipeline, index, network, head, make_data):
    """Diagonal empirical Fisher of the encoder's base weights, if a later stage uses EWC."""
    later = pipeline.stages[index + 1:]
    if not any(s.training["penalty"] == "ewc" and s.training["beta"] > 0 for s in later):
        return None
    parts = model_parts(network)
    variables = parts["encoder"].base_weights()
    head_layer = parts["heads"][head]
    task_loss = TASK_LOSSES[head_layer.task]
    sums = [np.zeros(v.shape, np.float32) for v in variables]
    batches = 0
    for x, y in make_data(0, augment=False, shuffle=False, batch_size=1):
        with tf.GradientTape() as tape:
            loss = task_loss(y[head], network(x, training=False)[head])
        for total, grad in zip(sums, tape.gradient(loss, variables)):
            if grad is not None:
                total += np.square(np.asarray(grad))
        batches += 1
    return {v.path: total / max(batches, 1) for v, total in zip(variables, sums)}


def _npz_key(path):
    return path.replace("/", "|")


def load_fisher(stage_dir):
    """The `{variable path: Fisher diagonal}` saved with a stage, or None."""
    file = pathlib.Path(stage_dir) / "fisher.npz"
    if not file.exists():
        return None
    with np.load(file) as saved:
        return {k.replace("|", "/"): saved[k] for k in saved.files}
