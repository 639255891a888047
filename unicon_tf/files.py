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
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import stat
import threading
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


@dataclasses.dataclass
class _Held:
    """A folder lock this process holds: its descriptor, how many blocks hold it, the owning thread."""

    descriptor: int
    lock_file: pathlib.Path
    thread: int
    depth: int = 0


_HELD: dict[tuple[int, int], _Held] = {}  # by (device, inode) of the folder
_GUARD = threading.RLock()


@contextlib.contextmanager
def folder_lock(folder: pathlib.Path | str, what: str = "run") -> Iterator[pathlib.Path]:
    """Hold an exclusive lock on `folder` (created if missing) for the block.

    A second process asking for the same folder fails at once instead of writing beside the
    first (two trainings of one stage would overwrite each other's checkpoints and records).
    The lock is the kernel's (`fcntl.flock` on the folder itself): it ends with the block or
    with the process, so a killed run leaves no stale lock. `.unicon-tf.lock` in the folder
    names the last holder's pid for the message; deleting it is harmless, except on a file
    system that cannot lock folders (NFS), where the lock is on that file instead. Within
    one thread the lock is reentrant (a command holding its run folder calls functions that
    lock it again); another thread of the process is refused like another process. A
    forked child (a `multiprocessing` fork pool) closes its copy: the lock stays its
    parent's alone, so pool workers outliving a killed run do not hold the folder.

    Args:
        folder: the folder.
        what: what the caller is about to do there, for the message ("run", "experiment").

    Yields:
        The lock file's path.

    Raises:
        FolderInUseError: another process or thread holds the lock; the message names the
            folder and the holder's pid.
        FolderLockError: the folder cannot be created or locked, or the pid not written (a
            read-only folder, a file in the path, a file system without locks), naming the
            folder and the reason.

    Example:
    >>> import os, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with folder_lock(folder, "experiment") as lock, folder_lock(folder):  # reentrant in one thread
    ...     lock.read_text() == f"{os.getpid()}\\n"
    True
    """
    folder = pathlib.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        identity = os.stat(folder)
    except OSError as error:
        raise FolderLockError(f"{folder}: cannot create this folder for the {what} "
                              f"({error.strerror or error}).") from error
    key = (identity.st_dev, identity.st_ino)  # the same folder by any path (symlinks, bind mounts)
    with _GUARD:
        held = _HELD.get(key)
        if held is not None and held.thread != threading.get_ident():
            raise FolderInUseError(f"{folder} is in use by another thread of this process (pid {os.getpid()}): "
                                   f"wait for it to finish, then start this {what} again.")
        if held is None:
            descriptor, path = _acquire(folder, what)
            held = _HELD[key] = _Held(descriptor, path, threading.get_ident())
        held.depth += 1
    try:
        yield held.lock_file
    finally:
        with _GUARD:
            held.depth -= 1
            if held.depth == 0:  # whichever block ends last releases it
                if _HELD.get(key) is held:
                    del _HELD[key]
                os.close(held.descriptor)  # the lock ends with the descriptor


def _forget_after_fork():
    """In a forked child: close the copies of the held descriptors (the locks stay the parent's)."""
    for held in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(held.descriptor)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _acquire(folder, what):
    """`(descriptor holding the folder's lock, its lock file)`, the holder's pid written there."""
    path = folder / LOCK_FILE
    try:
        descriptor = _lock(folder, path)
    except BlockingIOError:  # flock's EWOULDBLOCK: another process holds it
        try:
            holder = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            holder = ""
        raise FolderInUseError(f"{folder} is in use by another unicon-tf process (pid {holder or 'unknown'}): "
                               f"wait for it to finish or stop it, then start this {what} again.") from None
    except OSError as error:
        raise FolderLockError(f"{folder}: cannot lock this folder for the {what} ({error.strerror or error}): "
                              "is it writable, on a file system with locks?") from error
    try:
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):  # the folder's lock: a writable folder is enough
            partial = path.with_name(f"{LOCK_FILE}.{os.getpid()}")
            partial.write_text(f"{os.getpid()}\n")
            os.replace(partial, path)
        else:  # the lock is on the file itself (NFS): write through it, never replace it
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    except BaseException as error:
        os.close(descriptor)
        if isinstance(error, OSError):
            raise FolderLockError(f"{path}: cannot write ({error.strerror or error}): is the folder writable?") \
                from error
        raise
    return descriptor, path


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
        try:
            descriptor = os.open(target, flags, 0o644)
        except OSError:
            if target == path:
                raise
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return descriptor
        except BaseException as error:
            os.close(descriptor)
            if not isinstance(error, OSError) or isinstance(error, BlockingIOError) or target == path:
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
