"""Writes that never leave a half-written file: write beside the target, then rename.

Every JSON record (run.json, stage.json, matrix.json, blessing.json, lineage.json), the
TF Serving `models.config` and every saved `.keras` model goes through here.

Example:
>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a" / "record.json"
>>> write_json_atomic(path, {"dice": np.float32(0.5), "data": pathlib.Path("x")})
>>> path.read_text()
'{\\n  "dice": 0.5,\\n  "data": "x"\\n}\\n'
"""

import json
import os
import pathlib

import numpy as np


def write_text_atomic(path, text):
    """Write `text` to `path` (parents created) through a `.partial` file and a rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json_atomic(path, obj):
    """`write_text_atomic` of indented JSON; NumPy scalars and paths become plain values."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def plain_json(obj):
    """`obj` with NumPy scalars and paths turned into plain JSON values (a deep copy)."""
    return json.loads(json.dumps(obj, default=_plain))


def save_model_atomic(model, path):
    """`model.save(path)` (a `.keras` file) through a hidden partial file and a rename."""
    path = pathlib.Path(path)
    partial = path.with_name(f".{path.stem}.partial.keras")
    model.save(partial)
    os.replace(partial, path)


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
