"""Export a trained stage as a TensorFlow Serving model version.

    <base>/<model>/<version>/saved_model.pb, variables/      the SavedModel
    <base>/<model>/<version>/assets.extra/tf_serving_warmup_requests
    <base>/<model>/<version>/unicon.json                     stage, heads, preprocessing
    <base>/models.config                                      ModelServerConfig (text)

Signatures: `serving_default` (every head; one input per modality) and one per head
(taking only the modalities the head reads). Outputs are named after what they hold:
classification `probabilities` and `class`, prognosis `risk`, segmentation
`probabilities` and `label_map` (prefixed `<head>_` in `serving_default`).

Versions are integers; a new export claims the next free one atomically (a `.claim-<v>`
hard link, so concurrent exports get distinct versions), is written to a hidden
`.partial-<v>-<pid>` folder and renamed into place (`unicon_tf.files.atomic_folder`), so a
half-written version is never visible and an existing one is never touched; claims and
partial folders of dead processes are removed by the next export. Before the rename, every signature of the reloaded
SavedModel is checked against the Keras model (max abs difference <= 1e-5).
"""

import fcntl
import json
import os
import pathlib
import shutil
import socket
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from unicon_tf.data.records import read_schema
from unicon_tf.files import atomic_folder, write_text_atomic
from unicon_tf.model import model_parts, non_finite_weights
from unicon_tf.model.storage import load_model
from unicon_tf.names import InvalidNameError, check_folder_name, check_name
from unicon_tf.run import Evaluation, Run, StageFolder
from unicon_tf.tasks import task_kind

PARITY_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """An export that must not happen (unblessed stage, parity failure, bad version)."""


def head_outputs(task: str, output: tf.Tensor) -> dict[str, tf.Tensor]:
    """The named serving outputs of a head's raw output (its task kind's `serving_outputs`)."""
    return task_kind(task).serving_outputs(output)


def signatures(model: keras.Model) -> dict[str, tuple[list[str], Callable, list[tf.TensorSpec]]]:
    """`{signature name: (modalities, fn, input specs)}`: `serving_default` and one per head."""
    heads = model_parts(model)["heads"]
    shape = tuple(next(iter(model.input.values())).shape[1:])

    def endpoint(modalities, names):
        sub = keras.Model({m: model.input[m] for m in modalities}, {n: model.output[n] for n in names})

        def serve(*volumes):
            checks = [check_volume_shape(m, v, shape) for m, v in zip(modalities, volumes)]
            with tf.control_dependencies(checks):
                volumes = [tf.identity(v) for v in volumes]
            outputs = sub(dict(zip(modalities, volumes)), training=False)
            served = {}
            for name in names:
                for key, value in head_outputs(heads[name].task, outputs[name]).items():
                    served[key if len(names) == 1 else f"{name}_{key}"] = value
            return served

        specs = [tf.TensorSpec((None,) + shape, tf.float32, name=m) for m in modalities]
        return modalities, serve, specs

    result = {"serving_default": endpoint(list(model.input), list(heads))}
    for name, head in heads.items():
        result[name] = endpoint(list(head.modalities), [name])
    return result


def check_volume_shape(modality: str, volume: tf.Tensor, shape: Sequence[int]) -> tf.Operation:
    """An in-graph assertion that `volume` is `(batch, *shape)`, naming the input.

    TF Serving does not check a request against the signature's shapes, so a wrong volume
    would fail deep in the network ("Input to reshape is a tensor with ... values"). The
    shape is padded with -1 before comparing, so a wrong rank fails too; the comparison
    depends on the fed tensor's shape and is never folded away.
    """
    expected = tf.constant(tuple(shape) + (-1,), tf.int32)
    actual = tf.concat([tf.shape(volume, out_type=tf.int32), -tf.ones([len(shape) + 1], tf.int32)], 0)
    matches = tf.reduce_all(tf.equal(actual[1:len(shape) + 2], expected))
    wanted = ", ".join(str(d) for d in shape)
    return tf.debugging.Assert(matches, [f"input {modality}: expected shape (batch, {wanted}), got",
                                         tf.shape(volume)], summarize=8, name=f"check_{modality}_shape")


HIGHEST = ".highest-version"
"""In a model folder: the highest version ever claimed there, so that a version deleted by
hand is never handed out again (TF Serving clients and labels take a number to mean one
model)."""


def highest_version(model_dir: pathlib.Path) -> int:
    """The highest version ever claimed under `model_dir` (its folders, claims in progress and
    the remembered `.highest-version`); 0 when there is none."""
    model_dir = pathlib.Path(model_dir)
    taken = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    taken += [int(p.name.split("-")[1]) for p in model_dir.glob(".claim-*") if p.name.split("-")[1].isdigit()]
    remembered = model_dir / HIGHEST
    if remembered.exists() and remembered.read_text().strip().isdigit():
        taken.append(int(remembered.read_text().strip()))
    return max(taken, default=0)


def next_version(model_dir: pathlib.Path) -> int:
    """The next integer version under `model_dir` (1 when there is none): one past the
    highest ever claimed (`highest_version`), so versions never go backwards, even when a
    version folder was deleted.

    Example:
    >>> import tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> (folder / "1").mkdir(); (folder / "2").mkdir(); _remember_version(folder, 2); (folder / "2").rmdir()
    >>> next_version(folder)
    3
    """
    return highest_version(model_dir) + 1


def _remember_version(model_dir, version):
    """Raise the remembered highest version of `model_dir` to `version`: read and rewritten
    under an exclusive lock on the file itself (concurrent exports each raise it)."""
    with open(pathlib.Path(model_dir) / HIGHEST, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released on close
        handle.seek(0)
        known = handle.read().strip()
        if not known.isdigit() or int(known) < version:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{version}\n")
            handle.flush()
            os.fsync(handle.fileno())


def _claim_version(model_dir, version=None):
    """Claim `version` (default: the next free one) for this process; return `(version, claim file)`.

    The claim is `<model>/.claim-<version>`, holding this host and process id, made by an
    atomic hard link (which fails when another export holds it), so two exports into one
    folder at once never pick the same version. Claims and `.partial-*` folders left by
    processes that died are removed first.
    """
    model_dir = pathlib.Path(model_dir)
    remove_stale_exports(model_dir)
    owner = model_dir / f".owner-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    owner.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        while True:
            candidate = int(version or next_version(model_dir))
            final, claim = model_dir / str(candidate), model_dir / f".claim-{candidate}"
            if final.exists() and version:
                raise ExportError(f"{final} already exists: versions are never overwritten.")
            highest = highest_version(model_dir)
            if version and candidate <= highest:
                raise ExportError(f"version {candidate} of {model_dir} is not above the highest version ever "
                                  f"claimed there ({highest}, {model_dir / HIGHEST}): versions never go backwards; "
                                  f"leave the version out (next: {highest + 1}).")
            try:
                os.link(owner, claim)
            except FileExistsError:
                if version:
                    raise ExportError(f"version {candidate} of {model_dir} is being exported by another "
                                      f"process ({claim}).") from None
                continue
            if final.exists():  # finished by another export between next_version and the link
                claim.unlink()
                if version:
                    raise ExportError(f"{final} already exists: versions are never overwritten.")
                continue
            _remember_version(model_dir, candidate)
            return candidate, claim
    finally:
        owner.unlink()


def remove_stale_exports(model_dir: pathlib.Path) -> None:
    """Remove `.claim-*` files and `.partial-*` folders of exports whose process has died.

    A claim is stale when it was made on this host by a process that no longer runs; a
    partial folder (`.partial-<version>-<pid>`) when no live claim of its version is held
    by its process. Claims made on other hosts are left alone.
    """
    model_dir = pathlib.Path(model_dir)
    partials = list(model_dir.glob(".partial-*"))  # listed before the claims: a claim outlives its partial
    live = {}
    for claim in model_dir.glob(".claim-*"):
        try:
            owner = json.loads(claim.read_text())
        except (OSError, ValueError):
            continue  # just released
        if owner.get("host") == socket.gethostname() and not _process_alive(owner.get("pid")):
            claim.unlink(missing_ok=True)
        else:
            live[claim.name.split("-", 1)[1]] = owner.get("pid")
    for partial in partials:
        version, _, pid = partial.name[len(".partial-"):].partition("-")
        if not pid.isdigit() or live.get(version) != int(pid):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def export_model(model: keras.Model, base: pathlib.Path | str, model_name: str,
                 metadata: Mapping[str, Any] | None = None, version: int | None = None,
                 parity_batch: Mapping[str, np.ndarray] | None = None, example_request: bool = False) -> pathlib.Path:
    """Write `model` as version `version` (default: the next free one) of `model_name`.

    Args:
        model: the unicon Keras model.
        base: the TF Serving base folder (e.g. `saved_models`).
        model_name: the served model's name.
        metadata: extra JSON-able fields for `unicon.json` (stage, preprocessing, ...).
        version: an explicit version; refused if it exists.
        parity_batch: `{modality: array}` to check parity on (default: seeded noise).
        example_request: also write `request.json`, a TF Serving REST request for
            `serving_default` built from its signature (one all-zero volume per input).

    Returns:
        The version folder's path.

    Raises:
        ExportError: a modality or head name a signature cannot hold, a `model_name` that
            cannot name a folder (`unicon_tf.names.check_folder_name`), non-finite weights,
            the version exists, or a signature disagrees with the Keras model.
    """
    check_exportable(model)
    try:
        check_folder_name(model_name, "model")
    except InvalidNameError as error:
        raise ExportError(f"cannot export under {base}: {error}") from error
    model_dir = pathlib.Path(base) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    version, claim = _claim_version(model_dir, version)
    final = model_dir / str(version)
    try:
        with atomic_folder(final, staging=model_dir / f".partial-{version}-{os.getpid()}") as staging:
            _write_version(staging, model, model_name, version, metadata, parity_batch, example_request)
    finally:
        claim.unlink(missing_ok=True)
    return final


def _write_version(staging, model, model_name, version, metadata, parity_batch, example_request):
    """The SavedModel, its parity check, warmup requests, unicon.json (and request.json) in `staging`."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    endpoints = signatures(model)
    for name, (_, fn, specs) in endpoints.items():
        archive.add_endpoint(name=name, fn=fn, input_signature=specs)
    archive.write_out(str(staging), verbose=False)
    batch = parity_batch or _noise_batch(model)
    parity = check_parity(model, staging, batch)
    write_warmup(staging, model_name, endpoints, batch)
    info = {"model_name": model_name, "version": version, **(metadata or {}),
            "signatures": {name: {"inputs": mods} for name, (mods, _, _) in endpoints.items()},
            "heads": {name: {"task": h.task, "modalities": h.modalities, "stage": h.stage}
                      for name, h in model_parts(model)["heads"].items()},
            "input_shape": list(next(iter(model.input.values())).shape[1:4]), "parity_max_abs_diff": parity}
    (staging / "unicon.json").write_text(json.dumps(info, indent=2) + "\n")
    if example_request:
        modalities = endpoints["serving_default"][0]
        shape = info["input_shape"] + [1]
        request = {"signature_name": "serving_default",
                   "instances": [{m: np.zeros(shape, np.float32).tolist() for m in modalities}]}
        (staging / "request.json").write_text(json.dumps(request))


def check_exportable(model: keras.Model) -> None:
    """Raise ExportError if `model` has a name its signatures cannot hold or a non-finite weight.

    TensorFlow renames signature arguments it does not accept (`t1-ce` becomes `t1_ce`),
    so a model whose names break `unicon_tf.names.check_name` (built before the rule, or
    by hand) would be served under other names than `unicon.json` gives.
    """
    names = [(m, "modality") for m in model.input] + [(h, "head") for h in model_parts(model)["heads"]]
    for name, kind in names:
        try:
            check_name(name, kind)
        except InvalidNameError as error:
            raise ExportError(f"model '{model.name}' cannot be exported: {error}. Rebuild it with valid names.") \
                from error
    bad = non_finite_weights(model)
    if bad:
        raise ExportError(f"model '{model.name}' has {len(bad)} non-finite weight(s) (e.g. {bad[0]}): "
                          "it is never exported.")


def _noise_batch(model, size=2, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.uniform(-1, 1, (size,) + tuple(t.shape[1:])).astype(np.float32) for m, t in model.input.items()}


def check_parity(model: keras.Model, saved_model_dir: pathlib.Path | str, batch: Mapping[str, np.ndarray]) -> float:
    """Max abs difference of every signature's float outputs vs the Keras model on `batch`.

    Raises:
        ExportError: an output differs by more than `PARITY_TOLERANCE`.
    """
    heads = model_parts(model)["heads"]
    outputs = model(batch, training=False)
    expected = {head: head_outputs(layer.task, outputs[head]) for head, layer in heads.items()}
    worst = 0.0
    for name, served in served_outputs(saved_model_dir, batch).items():
        names = list(heads) if name == "serving_default" else [name]
        for head in names:
            for key, value in expected[head].items():
                served_key = key if len(names) == 1 else f"{head}_{key}"  # as `signatures` names them
                got, want = np.asarray(served[served_key]), np.asarray(value)
                if got.dtype.kind == "f":
                    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
                    worst = max(worst, diff)
                    if not diff <= PARITY_TOLERANCE:
                        raise ExportError(f"signature '{name}' output '{served_key}' differs from the Keras "
                                          f"model by {diff:.2e} (> {PARITY_TOLERANCE}).")
    return worst


def served_outputs(saved_model_dir: pathlib.Path | str, batch: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Every signature's outputs on `batch`, the SavedModel loaded as TensorFlow Serving loads
    it: its `serve` MetaGraph in a session, each `signature_def` fed and fetched by tensor name.

    Everything loaded lives in the session's own graph and is freed with it. (Measured on TF
    2.21: `tf.saved_model.load` keeps about twice the model's weights alive after every load,
    +100 MB per load of a 50 MB model, which over a preset's four pushes was GBs.)

    Args:
        saved_model_dir: a SavedModel folder.
        batch: `{input name: array}`, each signature's inputs among them.

    Returns:
        `{signature name: {output name: np.ndarray}}`.
    """
    graph = tf.Graph()
    logger = tf.get_logger()
    level = logger.level
    with tf.compat.v1.Session(graph=graph) as session:
        logger.setLevel("ERROR")  # the v1 loader's deprecation notice: this is TF Serving's own path
        try:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(saved_model_dir))
        finally:
            logger.setLevel(level)
        served = {}
        for name, signature in meta_graph.signature_def.items():
            if name.startswith("__"):  # __saved_model_init_op
                continue
            feeds = {graph.get_tensor_by_name(info.name): batch[key] for key, info in signature.inputs.items()}
            served[name] = session.run({key: info.name for key, info in signature.outputs.items()}, feed_dict=feeds)
    return served


def write_warmup(version_dir: pathlib.Path, model_name: str,
                 endpoints: Mapping[str, tuple[list[str], Callable, list[tf.TensorSpec]]],
                 batch: Mapping[str, np.ndarray]) -> None:
    """`assets.extra/tf_serving_warmup_requests`: one PredictRequest per signature."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    folder = pathlib.Path(version_dir) / "assets.extra"
    folder.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(folder / "tf_serving_warmup_requests")) as writer:
        for name, (modalities, _, _) in endpoints.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=name))
            for m in modalities:
                request.inputs[m].CopyFrom(tf.make_tensor_proto(batch[m][:1]))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def update_models_config(base: pathlib.Path | str, model_name: str, serving_root: str = "/models",
                         labels: Mapping[str, int] | None = None) -> pathlib.Path:
    """Add or update `model_name` in `<base>/models.config` (ModelServerConfig text format).

    Args:
        base: the base folder holding the model folders.
        model_name: the model to add or update.
        serving_root: where the base folder is mounted in the TF Serving container.
        labels: `{label: version}` to set (e.g. `{"stable": 1, "canary": 2}`).

    An existing entry keeps its version policy (`all`, `latest` or `specific`); a version
    a label points at is added to a `specific` list, since TF Serving refuses a label on a
    version it does not load. When the model's folder is under `base`, labels and pinned
    versions of the entry whose version folder is gone are dropped and reported
    (`ServingWarning`), and a label set to a missing version is refused. The file is
    rewritten under an exclusive lock (`.models.config.lock`), so concurrent exports each
    add their labels.

    Returns:
        The config file's path.

    Raises:
        ExportError: `labels` point at versions the model's folder does not hold.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = pathlib.Path(base) / "models.config"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".models.config.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one read-modify-write at a time; released on close
        config = model_server_config_pb2.ModelServerConfig()
        if path.exists():
            text_format.Parse(path.read_text(), config)
        entries = {c.name: c for c in config.model_config_list.config}
        entry = entries.get(model_name) or config.model_config_list.config.add()
        entry.name = model_name
        entry.base_path = f"{serving_root.rstrip('/')}/{model_name}"
        entry.model_platform = "tensorflow"
        policy = entry.model_version_policy
        if policy.WhichOneof("policy_choice") is None:
            policy.all.SetInParent()  # a new entry serves every version
        model_dir = path.parent / model_name
        present = _present_versions(model_dir)
        missing = {label: v for label, v in (labels or {}).items() if present is not None and int(v) not in present}
        if missing:
            raise ExportError(f"{path}: labels {missing} point at versions of '{model_name}' that {model_dir} does "
                              f"not hold (it holds {sorted(present)}).")
        for label, version in (labels or {}).items():
            entry.version_labels[label] = int(version)
            if policy.HasField("specific") and int(version) not in policy.specific.versions:
                policy.specific.versions.append(int(version))  # a label needs its version loaded
        _drop_missing_versions(path, entry, present)
        write_text_atomic(path, text_format.MessageToString(config))
    return path


class ServingWarning(UserWarning):
    """`models.config` named versions that no longer exist; they were dropped (names them)."""


def _present_versions(model_dir):
    """The version numbers `model_dir` holds; None when there is no such folder here (the
    config names models served from elsewhere: nothing can be checked)."""
    if not model_dir.is_dir():
        return None
    return {int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}


def _drop_missing_versions(path, entry, present):
    """Drop from a config entry the labels and `specific` versions whose version folder is
    gone (deleted by hand): TF Serving would refuse the labels, or serve a label moved to
    another model once the number were reused. Each drop is reported as a `ServingWarning`."""
    if present is None:
        return
    dropped = {label: v for label, v in entry.version_labels.items() if v not in present}
    for label in dropped:
        del entry.version_labels[label]
    policy = entry.model_version_policy
    gone = [v for v in policy.specific.versions if v not in present] if policy.HasField("specific") else []
    if gone:
        kept = [v for v in policy.specific.versions if v in present]
        del policy.specific.versions[:]
        policy.specific.versions.extend(kept)
    if dropped or gone:
        what = [f"label {label!r} -> version {v}" for label, v in sorted(dropped.items())]
        what += [f"pinned version {v}" for v in gone]
        warnings.warn(f"{path}: model '{entry.name}': dropped {', '.join(what)}: no such version folder under "
                      f"{path.parent / entry.name} (deleted?).", ServingWarning, stacklevel=3)


def export_stage(run_dir: pathlib.Path | str, stage: str | None = None, base: pathlib.Path | str = "saved_models",
                 model_name: str | None = None, force: bool = False, labels: Sequence[str] | None = None,
                 serving_root: str = "/models", example_request: bool = False) -> pathlib.Path:
    """Export a run's stage (default: its last) if the Evaluator blessed it.

    Args:
        run_dir: the run directory.
        stage: the stage to export.
        base: TF Serving base folder.
        model_name: the served name (default: the pipeline's name).
        force: export even if the stage is not blessed (or not evaluated).
        labels: version labels to point at the new version, e.g. `["canary"]`.
        serving_root: where `base` is mounted in the serving container.
        example_request: also write `request.json` (see `export_model`).

    Returns:
        The version folder's path.

    Raises:
        ExportError: the stage is not evaluated or not blessed (without `force`), or
            the export fails its parity check.
        FileNotFoundError: `run_dir` is not a run directory.
        ValueError: `stage` is not trained there.
    """
    folder = Run(run_dir).trained_stages(stage)[-1]
    record = folder.record()
    blessing = Evaluation(folder.evaluation).blessing()
    if not force:
        if blessing is None:
            raise ExportError(f"Stage '{record['stage']}' has not been evaluated "
                              f"({Evaluation(folder.evaluation).blessing_file} is missing): "
                              "run unicon-tf evaluate first, or pass --force.")
        if not blessing["blessed"]:
            raise ExportError(f"Stage '{record['stage']}' is not blessed: " + "; ".join(blessing["reasons"])
                              + ". Pass --force to export it anyway.")
    return push_stage(folder, base, model_name, blessing=blessing, labels=labels, serving_root=serving_root,
                      example_request=example_request)


def push_stage(stage: StageFolder | pathlib.Path | str, base: pathlib.Path | str = "saved_models",
               model_name: str | None = None, blessing: Mapping[str, Any] | None = None,
               labels: Sequence[str] | None = None, serving_root: str = "/models",
               example_request: bool = False) -> pathlib.Path:
    """Export a trained stage's model as the next version and list it in `models.config`.

    The gate is the caller's: `export_stage` (the CLI) and the Pusher component check the
    blessing once, then call this.

    Args:
        stage: the stage's folder (`StageFolder` or path: a Model artifact's URI).
        base: TF Serving base folder.
        model_name: the served name (default: the stage's pipeline's name).
        blessing: the stage's blessing, kept in `unicon.json` (None: exported unevaluated).
        labels, serving_root, example_request: see `export_stage`.

    Returns:
        The version folder's path.

    Raises:
        ExportError: the SavedModel fails its parity check.
        StageError: the folder holds no trained stage.
    """
    stage = stage if isinstance(stage, StageFolder) else StageFolder(stage)
    record = stage.record()
    model_name = model_name or record["pipeline"]
    model = load_model(stage.model)
    schema = read_schema(record["data"]["path"])
    metadata = {"stage": record["stage"], "stage_dir": str(stage.path.resolve()), "pipeline": record["pipeline"],
                "blessing": blessing, "forced": not (blessing or {}).get("blessed", False),
                "preprocessing": schema["preprocessing"], "modalities": schema["modalities"],
                "scaling": schema.get("scaling", {})}
    version_dir = export_model(model, base, model_name, metadata=metadata, example_request=example_request)
    update_models_config(base, model_name, serving_root, {label: int(version_dir.name) for label in labels or []})
    return version_dir
