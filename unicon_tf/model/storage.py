"""Stage files that grow by what a stage trained: weights it did not change are kept once, by SHA-256.

A pretrained encoder makes every stage's `model.keras` as large as the encoder (about 470 MB
for the 117 M-parameter `astra_i3resnet152`), though a UNICON stage leaves it untouched.
`save_model` therefore writes a large model *by reference*:

- a **base weights file** `<store>/<sha256>.weights.h5`, written once: every array of the
  first model saved into the store, each an HDF5 dataset named by the SHA-256 of its dtype,
  shape and bytes; the file's name is the SHA-256 of the file itself;
- the **stage file** (still `model.keras`, a zip): Keras's `config.json` and
  `metadata.json`, `delta.weights.h5` (Keras's weights tree holding only the arrays no
  base holds: new heads, adapters, stems, changed weights) and `unicon_storage.json`, the
  manifest: each base used (its SHA-256 and its path relative to the stage file; a stage
  folder copied elsewhere in its run finds it by name in the run's store) and, for
  each array taken from a base, its place in Keras's weights tree, the base and the
  array's SHA-256.

The **rule**: a model whose weights take at least `REFERENCE_BYTES` (64 MiB; a pretrained
preset) is saved by reference, a smaller one (the from-scratch CNN foundation of the demo:
a few MB) as Keras's plain self-contained `.keras`; `by_reference=` forces either. The
store defaults to `<run>/weights/` (`<run>`: the outermost folder above the stage file
that holds a `run.json`, so a run's stages and its baselines share one base), else the
folder `weights/` beside the stage's folder.

`load_model` reads either kind and returns the same model `keras.models.load_model`
would: every variable bit-identical to the one saved. It checks each base's SHA-256 first:
a moved, missing or altered base file is a `StorageError` naming the stage file, the base
file and the expected and actual hashes, never a model with wrong weights. Scripts that
called `keras.models.load_model("model.keras")` on a stage call
`unicon_tf.model.storage.load_model("model.keras")` instead (on a by-reference file Keras
itself stops with "Expected a model.weights.h5 or model.weights.npz file"). SavedModels
for TF Serving (`unicon_tf.serving.export`) are written from the loaded model and hold
every weight: they need no base file.

Example:
>>> import tempfile, keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
>>> path = pathlib.Path(tempfile.mkdtemp()) / "stages" / "00-first" / "model.keras"
>>> path.parent.mkdir(parents=True)
>>> save_model(model, path, by_reference=True)["referenced"]
2
>>> restored = load_model(path)
>>> all((a == b).all() for a, b in zip(restored.get_weights(), model.get_weights()))
True
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import zipfile
from typing import Any

import h5py
import keras
import ml_dtypes
import numpy as np

from unicon_tf.files import sha256

REFERENCE_BYTES = 64 * 2**20
"""Models whose weights take at least this many bytes are saved by reference (see the module's rule)."""

MANIFEST = "unicon_storage.json"
DELTA = "delta.weights.h5"
FORMAT = "unicon-tf weights by reference 1"
_KERAS_WEIGHTS = "model.weights.h5"
_KERAS_FILES = ("config.json", "metadata.json")


_BASE_NAME = re.compile(r"[0-9a-f]{64}\.weights\.h5")


def copy_run_file(source: str, target: str) -> str:
    """`shutil.copytree`'s `copy_function` for copying a run: a base weights file is
    hard-linked where the filesystem allows (it is immutable, its name being its content's
    SHA-256, so copies of a run share its hundreds of MB), every other file copied.

    Args:
        source: the file to copy.
        target: its path in the copy.

    Returns:
        `target`.

    Raises:
        OSError: as `shutil.copy2` (a failed hard link falls back to a copy).

    Example:
    >>> import shutil, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> (run / "weights").mkdir()
    >>> _ = (run / "weights" / ("0" * 64 + ".weights.h5")).write_bytes(b"base")
    >>> copy = shutil.copytree(run, run.parent / (run.name + "-copy"), copy_function=copy_run_file)
    >>> (copy / "weights" / ("0" * 64 + ".weights.h5")).stat().st_nlink
    2
    """
    path = pathlib.Path(source)
    if path.parent.name == "weights" and _BASE_NAME.fullmatch(path.name):
        try:
            os.link(source, target)
            return target
        except OSError:
            pass
    return shutil.copy2(source, target)


class StorageError(OSError):
    """A by-reference stage file whose base weights file is missing, moved or altered."""


def save_model(model: keras.Model, path: pathlib.Path | str, store: pathlib.Path | str | None = None,
               by_reference: bool | None = None) -> dict:
    """Save `model` to the `.keras` file `path`, by reference to a base weights file when large.

    Written beside the target and renamed (never half-written); a new base is written the
    same way, so a stage file never names a base that is not whole.

    Args:
        model: the Keras model (a unicon model, or any model `keras.models.load_model` reads).
        path: the `.keras` file to write (its folder must exist).
        store: the folder of base weights files (default: see the module's rule).
        by_reference: True or False forces the format; None: by reference when the model's
            weights take at least `REFERENCE_BYTES`.

    Returns:
        `{"by_reference": bool, "bytes": size of the stage file, "referenced": arrays taken
        from a base, "stored": arrays in the stage file, "base": the base file or None}`.

    Raises:
        StorageError: a base file in the store whose content no longer matches its name.
    """
    path = pathlib.Path(path)
    partial = path.with_name(f".{path.stem}.partial.keras")
    if by_reference is None:
        by_reference = sum(_nbytes(v) for v in model.weights) >= REFERENCE_BYTES
    if not by_reference:
        model.save(partial)
        os.replace(partial, path)
        return {"by_reference": False, "bytes": path.stat().st_size, "referenced": 0,
                "stored": len(model.weights), "base": None}
    store = pathlib.Path(store) if store is not None else default_store(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".save-") as scratch:
        scratch = pathlib.Path(scratch)
        model.save(scratch / "full.keras")
        with zipfile.ZipFile(scratch / "full.keras") as archive:
            archive.extractall(scratch / "full")
        weights = scratch / "full" / _KERAS_WEIGHTS
        with h5py.File(weights, "r") as tree:
            arrays = {name: _array_hash(data) for name, data in _datasets(tree)}
        bases = _bases(store, path)
        if not bases:
            bases = [_write_base(store, weights, arrays)]
        entries, used = {}, {}
        for base in bases:
            for name, digest in arrays.items():
                if name not in entries and digest in base["arrays"]:
                    entries[name] = {"base": base["sha256"], "array": digest}
                    used[base["sha256"]] = os.path.relpath(base["file"], path.parent)
        _write_delta(weights, scratch / DELTA, skip=entries)
        manifest = {"format": FORMAT, "bases": {h: {"path": p} for h, p in used.items()}, "arrays": entries}
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in _KERAS_FILES:
                archive.write(scratch / "full" / name, name)
            archive.write(scratch / DELTA, DELTA)
            archive.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(partial, path)
    base_file = next(iter(used.values()), None)
    return {"by_reference": True, "bytes": path.stat().st_size, "referenced": len(entries),
            "stored": len(arrays) - len(entries), "base": None if base_file is None else pathlib.Path(os.path.normpath(path.parent / base_file))}


def load_model(path: pathlib.Path | str, **options: Any) -> keras.Model:
    """Load a `.keras` file written by `save_model` (by reference or self-contained).

    Args:
        path: the `.keras` file.
        **options: `keras.models.load_model`'s (`custom_objects`, `compile`, `safe_mode`).

    Returns:
        The model, every variable equal, bit for bit, to the one saved.

    Raises:
        StorageError: a base file named by the stage file is missing (moved) or its SHA-256
            differs (altered); the message names the stage file, the base file and both hashes.
        ValueError, OSError: as `keras.models.load_model` (not a Keras file).

    Example:
    >>> model = load_model("runs/chest_ct/stages/03-pet/model.keras")  # doctest: +SKIP
    """
    path = pathlib.Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return keras.models.load_model(path, **options)
    bases = {digest: _checked_base(path, digest, _base_file(path, digest, entry["path"]))
             for digest, entry in manifest["bases"].items()}
    with tempfile.TemporaryDirectory(prefix="unicon-load-") as scratch:
        scratch = pathlib.Path(scratch)
        with zipfile.ZipFile(path) as archive:
            for name in _KERAS_FILES + (DELTA,):
                archive.extract(name, scratch)
        os.replace(scratch / DELTA, scratch / _KERAS_WEIGHTS)
        handles = {digest: h5py.File(file, "r") for digest, file in bases.items()}
        try:
            with h5py.File(scratch / _KERAS_WEIGHTS, "r+") as tree:
                for name, entry in manifest["arrays"].items():
                    tree.copy(handles[entry["base"]][entry["array"]], name)
        finally:
            for handle in handles.values():
                handle.close()
        return keras.models.load_model(scratch, **options)


def read_manifest(path: pathlib.Path | str) -> dict | None:
    """The by-reference manifest of the `.keras` file `path`, or None for a self-contained one
    (or a file that is no zip archive).

    Raises:
        StorageError: a manifest of another format version.
    """
    if not zipfile.is_zipfile(path):
        return None  # not a Keras archive: `keras.models.load_model` says why
    with zipfile.ZipFile(path) as archive:
        if MANIFEST not in archive.namelist():
            return None
        manifest = json.loads(archive.read(MANIFEST))
    if manifest.get("format") != FORMAT:
        raise StorageError(f"{path}: weights manifest of format {manifest.get('format')!r}, expected {FORMAT!r} "
                           "(written by another unicon-tf version).")
    return manifest


def default_store(path: pathlib.Path | str) -> pathlib.Path:
    """The base-weights folder of the stage file `path`: `<run>/weights` for the outermost
    folder holding a `run.json` above it (a run's stages and the baseline runs inside it),
    else for the run of a `<run>/stages/<stage>/` folder (its first stage is saved before
    its `run.json`), else `weights/` beside the stage's folder."""
    path = pathlib.Path(path).resolve()
    runs = [folder for folder in path.parents if (folder / "run.json").is_file()]
    if runs:
        return runs[-1] / "weights"
    return (path.parents[2] if path.parent.parent.name == "stages" else path.parent.parent) / "weights"


def _nbytes(variable):
    dtype = str(variable.dtype)
    return int(np.prod(variable.shape)) * np.dtype(getattr(ml_dtypes, dtype, dtype)).itemsize


def _datasets(tree):
    found = []
    tree.visititems(lambda name, item: found.append((name, item)) if isinstance(item, h5py.Dataset) else None)
    return found


def _array_hash(dataset):
    """SHA-256 of an HDF5 dataset's dtype, shape, attributes (Keras marks bfloat16 there) and bytes."""
    array = dataset[()]
    attrs = sorted((k, str(v)) for k, v in dataset.attrs.items())
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}{attrs}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _bases(store, path):
    """The base files in `store`, each `{"file", "sha256", "arrays"}` (checked against its name)."""
    found = []
    for file in sorted(store.glob("*.weights.h5")) if store.is_dir() else []:
        digest = file.name.split(".")[0]
        with h5py.File(_checked_base(path, digest, file), "r") as base:
            found.append({"file": file, "sha256": digest, "arrays": set(base.keys())})
    return found


def _write_base(store, weights, arrays):
    """A new base file in `store` holding every array of the Keras weights file `weights`."""
    store.mkdir(parents=True, exist_ok=True)
    partial = store / f".base-{os.getpid()}.partial"
    with h5py.File(weights, "r") as tree, h5py.File(partial, "w") as base:
        for name, data in _datasets(tree):
            if arrays[name] not in base:
                base.copy(data, arrays[name])
    digest = sha256(partial)
    file = store / f"{digest}.weights.h5"
    os.replace(partial, file)
    return {"file": file, "sha256": digest, "arrays": set(arrays.values())}


def _write_delta(weights, delta, skip):
    """Copy Keras's weights tree `weights` to `delta` without the datasets in `skip` (groups
    and their attributes kept)."""
    with h5py.File(weights, "r") as tree, h5py.File(delta, "w") as out:
        def copy(name, item):
            if isinstance(item, h5py.Group):
                group = out.require_group(name)
                group.attrs.update(dict(item.attrs))
            elif name not in skip:
                out.copy(item, name)
        out.attrs.update(dict(tree.attrs))
        tree.visititems(copy)


def _base_file(stage_file, digest, relative):
    """Where the base `digest` of `stage_file` is: at the path it recorded (relative to its
    folder), else under its name in the stage file's default store (a stage folder copied
    within its run, as a baseline reusing stage 0 does); the recorded path if neither is there."""
    recorded = pathlib.Path(os.path.normpath(stage_file.parent / relative))
    stored = default_store(stage_file) / f"{digest}.weights.h5"
    return stored if not recorded.is_file() and stored.is_file() else recorded


def _checked_base(stage_file, digest, file):
    """The base `file`, checked to exist and to have SHA-256 `digest`."""
    if not file.is_file():
        raise StorageError(f"{stage_file} takes weights from the base file {file} (sha256 {digest}), which is "
                           "missing: it was moved or deleted. Put it back (keep the run's weights/ folder beside "
                           "its stages).")
    actual = sha256(file)
    if actual != digest:
        raise StorageError(f"{stage_file} takes weights from the base file {file}, whose content changed: "
                           f"sha256 {actual}, expected {digest}. The stage cannot be loaded from it.")
    return file
