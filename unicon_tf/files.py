"""Writes that never leave a half-written file or folder: write beside the target, then rename.

Every JSON record (run.json, stage.json, matrix.json, blessing.json, lineage.json), the
TF Serving `models.config` goes through here (saved `.keras` models: `unicon_tf.model.storage`); so does
every folder that must appear whole or not at all (`atomic_folder`: an ingested cohort,
a SavedModel version, a training checkpoint). `sha256` is the one file checksum.
`folder_lock` keeps a second process out of a run or experiment folder in use.

Example:
>>> import pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a" / "record.json"
>>> write_json_atomic(path, {"dice": np.float32(0.5), "data": pathlib.Path("x")})
>>> path.read_text()
'{\\n  "dice": 0.5,\\n  "data": "x"\\n}\\n'
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np


def write_text_atomic(path: pathlib.Path | str, text: str) -> None:
    """Write `text` to `path` (parents created) through a `.partial` file and a rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json_atomic(path: pathlib.Path | str, obj: Any) -> None:
    """`write_text_atomic` of indented JSON; NumPy scalars and paths become plain values."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def plain_json(obj: Any) -> Any:
    """`obj` with NumPy scalars and paths turned into plain JSON values (a deep copy)."""
    return json.loads(json.dumps(obj, default=_plain))


@contextlib.contextmanager
def atomic_folder(path: pathlib.Path | str, replace: bool = False,
                  staging: pathlib.Path | str | None = None) -> Iterator[pathlib.Path]:
    """Fill a hidden staging folder beside `path`; it becomes `path` only if the block succeeds.

    On an exception the staging folder is removed and `path` is left as it was. An
    existing empty folder at `path` is replaced; a non-empty one only with `replace`
    (it is moved aside first, then deleted once the new folder is in place).

    Args:
        path: the folder to create.
        replace: replace a non-empty folder at `path` (e.g. the previous checkpoint).
        staging: the staging folder (default: `.<name>.partial-<pid>` beside `path`; it
            must be on the same file system).

    Yields:
        The staging folder (a `pathlib.Path`, created empty) to write into.

    Raises:
        FileExistsError: `path` exists, is not an empty folder, and `replace` is False
            (checked after the block, so a concurrent writer cannot be overwritten).

    Example:
    >>> import tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "version"
    >>> with atomic_folder(out) as staging:
    ...     _ = (staging / "saved_model.pb").write_text("...")
    >>> sorted(p.name for p in out.iterdir()), sorted(p.name for p in out.parent.iterdir())
    (['saved_model.pb'], ['version'])
    """
    path = pathlib.Path(path)
    staging = pathlib.Path(staging or path.parent / f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        old = None
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif path.exists() and replace:
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        elif path.exists():
            raise FileExistsError(f"{path} already exists; it is never overwritten.")
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock (`folder_lock`)."""


LOCK_FILE = ".unicon-tf.lock"


@contextlib.contextmanager
def folder_lock(folder: pathlib.Path | str, what: str = "run") -> Iterator[pathlib.Path]:
    """Hold an exclusive lock on `folder` (its `.unicon-tf.lock`, created) for the block.

    A second process asking for the same folder fails at once instead of writing beside the
    first (two trainings of one stage would overwrite each other's checkpoints and records).
    The lock is the kernel's (`fcntl.flock`): it ends with the block or with the process, so
    a killed run leaves no stale lock. The file keeps the holder's pid, for the message.
    Not reentrant: a process that asks again for a folder it holds is refused too.

    Args:
        folder: the folder (created if missing).
        what: what the folder is, for the message ("run", "experiment").

    Yields:
        The lock file's path.

    Raises:
        FolderInUseError: another process (or another block of this one) holds the lock;
            the message names the folder and the holder's pid.

    Example:
    >>> import tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> try:
    ...     with folder_lock(folder, "experiment"), folder_lock(folder, "experiment"):
    ...         pass
    ... except FolderInUseError as error:
    ...     print(str(error).split(": ")[1])
    this experiment folder is in use by another unicon-tf process (pid ...)
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FolderInUseError(f"{folder}: this {what} folder is in use by another unicon-tf process "
                                   f"(pid {holder}): wait for it to finish or stop it, then run again "
                                   f"(a rerun resumes).") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield path  # the lock ends when the file is closed


def sha256(path: pathlib.Path | str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks.

    Example:
    >>> import tempfile
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "empty"
    >>> _ = file.write_bytes(b"")
    >>> sha256(file)[:16]
    'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
