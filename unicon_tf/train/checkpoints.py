"""A stage's epoch checkpoints: what they hold, how a resume checks and restores them.

A checkpoint (`StageFolder.checkpoint`) is rewritten after every good epoch, atomically:
the stage's variables (`NETWORK_WEIGHTS`), those of the best validation epoch
(`BEST_WEIGHTS`), the optimizer's and the random state's variables, and `state.json`
(epochs done, history, model selection's state, the stage's `checkpoint_fingerprint` and
the changes resumes accepted). A resume continues from it only under the same definition
and data, unless the change is asked for (`checked_resume`).

The stage's variables are those training can change (`stage_variables`): the trainable
ones and the statistics of trainable layers (BatchNorm's moving mean and variance). The
rest is the previous stage's, rebuilt identically on resume, so a stage on a frozen 117 M
pretrained encoder checkpoints a few MB per epoch instead of two copies of 470 MB.
Checkpoints written by unicon-tf 0.x before this (`network.weights.h5`, Keras' whole
weights file) still resume.
"""

import hashlib
import json
import shutil
import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from unicon_tf.data import data_fingerprint
from unicon_tf.files import atomic_folder
from unicon_tf.model import PathParameters, non_finite_weights
from unicon_tf.run import StageError

if TYPE_CHECKING:
    import pathlib

    from unicon_tf.train.pipeline import PipelineSpec, StageSpec


def _random_state_variables(trainer):
    """The trainer's random state: every Keras `SeedGenerator` (dropout and noise layers).

    Keras' weight files leave them out; a resumed stage restores them so that dropout
    draws the masks the uninterrupted run would have drawn.
    """
    weights = {id(v) for v in trainer.weights}
    return [v for v in trainer.variables if id(v) not in weights]


NETWORK_WEIGHTS = "network.weights.npz"
"""In a checkpoint: the stage's variables after the last good epoch (`save_stage_weights`)."""
BEST_WEIGHTS = "best.weights.npz"
"""In a checkpoint: the stage's variables at the best validation epoch so far."""
_KERAS_FILES = {NETWORK_WEIGHTS: "network.weights.h5", BEST_WEIGHTS: "best.weights.h5"}  # older checkpoints


def stage_variables(network: "keras.Model") -> list["keras.Variable"]:
    """The variables of `network` that training under its current trainability can change:
    the trainable ones, and the non-trainable ones of trainable leaf layers (BatchNorm's
    moving statistics) other than `PathParameters` layers (whose frozen base kernels are
    non-trainable variables of a trainable layer); in `network.weights` order."""
    changing = {id(v) for v in network.trainable_weights}
    for layer in network._flatten_layers(include_self=False):
        if layer.trainable and not isinstance(layer, PathParameters) and not layer._layers:
            changing.update(id(v) for v in layer.non_trainable_weights)
    return [v for v in network.weights if id(v) in changing]


def save_stage_weights(path: "pathlib.Path", network: "keras.Model") -> None:
    """Write `stage_variables(network)` to `path` (`.npz`: each array with its index in
    `network.weights`, its path and shape, so that loading can check it)."""
    index = {id(v): i for i, v in enumerate(network.weights)}
    variables = stage_variables(network)
    np.savez(path, indices=np.array([index[id(v)] for v in variables], np.int64),
             paths=np.array([v.path for v in variables]),
             **{f"v{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(variables)})


def load_stage_weights(path: "pathlib.Path", network: "keras.Model") -> None:
    """Assign the variables saved by `save_stage_weights` (or, for a `.h5` file, Keras'
    whole weights file) to `network`; nothing is assigned unless every saved array fits.

    Raises:
        ValueError: a saved variable whose index, path or shape is not the network's.
    """
    if path.suffix == ".h5":
        network.load_weights(path)
        return
    weights = network.weights
    with np.load(path) as saved:
        pairs = [(int(i), str(name), saved[f"v{k}"]) for k, (i, name) in enumerate(zip(saved["indices"], saved["paths"]))]
    for i, name, array in pairs:
        if i >= len(weights) or weights[i].path != name or tuple(weights[i].shape) != array.shape:
            raise ValueError(f"{path}: variable {name} {array.shape} is not the network's variable {i}.")
    for i, _, array in pairs:
        weights[i].assign(array)


def weights_file(directory: "pathlib.Path", name: str) -> "pathlib.Path | None":
    """The checkpoint's `NETWORK_WEIGHTS` or `BEST_WEIGHTS` file (or an older checkpoint's
    Keras `.h5` one), None if it has neither."""
    return next((directory / n for n in (name, _KERAS_FILES[name]) if (directory / n).exists()), None)


def save_checkpoint(directory: "pathlib.Path", network: "keras.Model", trainer: "keras.Model", state: dict[str, Any],
                    best: bool = False) -> None:
    """Weights, optimizer and random state, progress: written to a staging folder then swapped in.

    Only called after `_non_finite_state` found nothing wrong, so every checkpoint is good.
    `best`: this epoch is the best on validation so far, so its weights become
    `BEST_WEIGHTS`; otherwise the previous checkpoint's are carried over.
    """
    carried = weights_file(directory, BEST_WEIGHTS)
    with atomic_folder(directory, replace=True) as partial:
        save_stage_weights(partial / NETWORK_WEIGHTS, network)
        if best:
            shutil.copy2(partial / NETWORK_WEIGHTS, partial / BEST_WEIGHTS)
        elif carried is not None:
            shutil.copy2(carried, partial / carried.name)
        store = {}
        trainer.optimizer.save_own_variables(store)
        np.savez(partial / "optimizer.npz", **store)
        np.savez(partial / "random_state.npz", *[np.asarray(v) for v in _random_state_variables(trainer)])
        (partial / "state.json").write_text(json.dumps(state, indent=1))


RESUMABLE_KEYS = ("training.epochs", "training.profile_batch", "training.distribute", "resources")
"""Fields a resume may change without `--accept-changes`: more epochs, profiling, the
devices (the update of a global batch is the same on any number of replicas), resources."""


def checkpoint_fingerprint(pipeline: "PipelineSpec", spec: "StageSpec", data: bool = True) -> dict[str, Any]:
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
    >>> from unicon_tf.train.pipeline import PipelineSpec, StageSpec
    >>> import pathlib
    >>> stage = StageSpec("a", "prognosis", pathlib.Path("data"))
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


def checked_resume(checkpoint: "pathlib.Path", spec: "StageSpec", identity: dict[str, Any],
                   accept_changes: bool | Collection[str]) -> dict[str, list]:
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


def restore_checkpoint(directory: "pathlib.Path", network: "keras.Model", trainer: "keras.Model",
                       spec: "StageSpec | None" = None, changes: dict[str, list] | None = None) -> dict[str, Any]:
    """Load a checkpoint's weights, optimizer and random state into `network` and `trainer`;
    return its `state.json`.

    Raises:
        StageError: the checkpoint does not fit the stage's model (naming `changes`, the
            fields changed since it was written), or holds non-finite weights.
    """
    try:
        with warnings.catch_warnings():  # Keras warns once per layer it cannot match before it fails
            warnings.simplefilter("ignore")
            # no weights file at all: FileNotFoundError, reported below as a checkpoint that does not fit
            load_stage_weights(weights_file(directory, NETWORK_WEIGHTS) or directory / NETWORK_WEIGHTS, network)
    except (ValueError, KeyError, FileNotFoundError):  # Keras: "A total of N objects could not be loaded", shapes
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


def initial_state(identity: dict[str, Any]) -> dict[str, Any]:
    """The state of a stage before its first epoch (`identity`: its `checkpoint_fingerprint`)."""
    return {"epoch": 0, "history": [], "fingerprint": identity, "changes": []}


def resumed_state(checkpoint: "pathlib.Path", network: "keras.Model", trainer: "keras.Model", spec: "StageSpec",
                  identity: dict[str, Any], accept_changes: bool | Collection[str]) -> dict[str, Any]:
    """Restore `checkpoint` into `network` and `trainer`; return its state, with the changes
    this resume accepted appended and the stage's fingerprint now.

    Raises:
        StageError: see `checked_resume` and `restore_checkpoint`.
    """
    changes = checked_resume(checkpoint, spec, identity, accept_changes)
    state = restore_checkpoint(checkpoint, network, trainer, spec, changes)
    if changes:
        state["changes"] = state.get("changes", []) + [{"after_epoch": state["epoch"], "changes": changes}]
    state["fingerprint"] = identity
    return state


def carry_best_weights(checkpoint: "pathlib.Path", written: "pathlib.Path") -> None:
    """A worker writing its checkpoint elsewhere (`written`) takes the chief's best weights
    now, before any epoch: the chief replaces its checkpoint after each one."""
    best = weights_file(checkpoint, BEST_WEIGHTS)
    if written != checkpoint and best is not None:
        written.mkdir(parents=True, exist_ok=True)
        shutil.copy2(best, written / best.name)
