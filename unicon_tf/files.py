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


class FolderLockError(RuntimeError):
    """A folder cannot be locked (`folder_lock`): not writable, or no locks on its file system."""


class FolderInUseError(FolderLockError):
    """Another process holds the folder's lock (`folder_lock`)."""


LOCK_FILE = ".unicon-tf.lock"
_HELD: dict[str, int] = {}  # the folders this process holds, by real path: how many blocks deep


@contextlib.contextmanager
def folder_lock(folder: pathlib.Path | str, what: str = "run") -> Iterator[pathlib.Path]:
    """Hold an exclusive lock on `folder` (its `.unicon-tf.lock`, created) for the block.

    A second process asking for the same folder fails at once instead of writing beside the
    first (two trainings of one stage would overwrite each other's checkpoints and records).
    The lock is the kernel's (`fcntl.flock` on the folder itself): it ends with the block or
    with the process, so a killed run leaves no stale lock. `.unicon-tf.lock` keeps the last
    holder's pid for the message (deleting it is harmless, except on a file system that
    cannot lock folders, e.g. NFS, where the lock is on that file instead). Within one process the lock
    is reentrant (a command holding its run folder calls functions that lock it again);
    child processes do not inherit it.

    Args:
        folder: the folder (created if missing).
        what: what the caller is about to run there, for the message ("run", "experiment").

    Yields:
        The lock file's path.

    Raises:
        FolderInUseError: another process holds the lock; the message names the folder and
            the holder's pid.
        FolderLockError: the lock file cannot be created or locked (a read-only folder, a
            file system without locks), naming the folder and the reason.

    Example:
    >>> import os, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with folder_lock(folder, "experiment") as lock, folder_lock(folder):  # reentrant in one process
    ...     lock.read_text() == f"{os.getpid()}\\n"
    True
    """
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield pathlib.Path(key) / LOCK_FILE
        finally:
            _HELD[key] -= 1
        return
    with _locked_file(pathlib.Path(folder), what) as path:
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]


@contextlib.contextmanager
def _locked_file(folder, what):
    """`folder` locked by this process until the block ends; yields its lock file (the holder's pid)."""
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = _lock(folder, path)
    except BlockingIOError:  # flock's EWOULDBLOCK: another process holds it
        holder = path.read_text().strip() if path.exists() else ""
        raise FolderInUseError(f"{folder} is in use by another unicon-tf process (pid {holder or 'unknown'}): "
                               f"wait for it to finish or stop it, then start this {what} again.") from None
    except OSError as error:
        raise FolderLockError(f"{folder}: cannot lock this {what} folder ({error.strerror or error}): "
                              "is it writable, on a file system with locks?") from error
    try:
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError as error:
            raise FolderLockError(f"{path}: cannot write ({error.strerror or error}): is the {what} folder "
                                  "writable?") from error
        yield path
    finally:
        os.close(descriptor)  # the lock ends with the descriptor


def _lock(folder, path):
    """An open descriptor holding an exclusive `flock`: on the folder itself (its lock then
    survives the lock file being deleted), or where the file system cannot lock a folder
    (NFS emulates `flock` with byte-range locks, which need a file open for writing) on its
    lock file.

    Raises:
        BlockingIOError: another process holds the lock.
        OSError: neither can be locked.
    """
    for target, flags in ((folder, os.O_RDONLY | os.O_DIRECTORY), (path, os.O_RDWR | os.O_CREAT)):
        descriptor = os.open(target, flags, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return descriptor
        except OSError as error:
            os.close(descriptor)
            if isinstance(error, BlockingIOError) or target == path:
                raise


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
