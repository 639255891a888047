"""Read `torch.save` zip checkpoints without torch and without running pickled code.

A `torch.save` file (PyTorch >= 1.6) is a zip archive: `<prefix>/data.pkl` (a pickle of
the saved object) and `<prefix>/data/<key>` (the raw bytes of each tensor storage). The
pickle refers to storages by a *persistent id* `("storage", storage class, key, location,
numel)` and rebuilds each tensor with `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, backward_hooks)`.

`read_torch_checkpoint` unpickles `data.pkl` with a restricted `pickle.Unpickler` that
admits only these records (the approach of `torch.load(weights_only=True)`, narrower):

- `torch._utils._rebuild_tensor_v2` and `torch._utils._rebuild_parameter`, rebuilt as
  NumPy arrays;
- the storage classes `torch.{BFloat16,Half,Float,Long}Storage` in persistent ids
  (bfloat16, float16, float32, int64), and `collections.OrderedDict`.

Any other global (`os.system`, `builtins.eval`, a model class, ...) is refused with a
`PretrainedWeightsError` naming the file and the record; nothing it names is imported.
bfloat16 storages are widened to float32 exactly (the 16 bits are float32's upper half).

Example:
>>> state = torch_state_dict("astra_encoder.pt")  # doctest: +SKIP
>>> state["conv1.weight"].shape, state["conv1.weight"].dtype  # doctest: +SKIP
((64, 3, 3, 7, 7), dtype('float32'))
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import zipfile

import numpy as np

from unicon_tf.weights_error import PretrainedWeightsError

STORAGE_DTYPES = {
    "BFloat16Storage": "bfloat16",
    "HalfStorage": np.dtype("<f2"),
    "FloatStorage": np.dtype("<f4"),
    "LongStorage": np.dtype("<i8"),
}
"""Storage class (module `torch`) -> the dtype of its bytes; bfloat16 is read as uint16."""

MAX_COMPRESSION_RATIO = 100
"""A compressed record may inflate to at most this many times its size (`torch.save` writes
records uncompressed; weights compress by < 2x)."""

TENSOR_REBUILDS = ("_rebuild_tensor_v2", "_rebuild_parameter")
"""Functions of `torch._utils` the unpickler admits (replaced by NumPy equivalents)."""


class _Storage:
    """A storage class named by a persistent id (a marker: never called)."""

    def __init__(self, name):
        self.name = name


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 values, given as their uint16 bit patterns, to float32 exactly.

    Args:
        bits: uint16 array of bfloat16 bit patterns, any shape.

    Returns:
        float32 array of the same shape (the bits shifted into float32's upper half).

    Example:
    >>> bfloat16_to_float32(np.array([0x3F80, 0xC000], np.uint16)).tolist()
    [1.0, -2.0]
    """
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_torch_checkpoint(path: str | pathlib.Path) -> object:
    """The object a `torch.save` zip file holds, with tensors as NumPy arrays.

    Floating tensors come back as float32 (bfloat16 and float16 widened), int64 as int64.

    Args:
        path: the `.pt`/`.pth` file (`torch.save`'s zip format, PyTorch >= 1.6).

    Returns:
        The unpickled object (typically a dict of tensors, or a dict holding one).

    Raises:
        PretrainedWeightsError: naming the file and, where it applies, the record: a missing,
            corrupt, truncated or foreign (not a `torch.save` zip) file, a pickle record that
            is not a tensor rebuild or storage (e.g. one that would call `os.system`), a
            storage of another dtype, a storage shorter than its record says, or a tensor that is
            not a view inside its storage (negative size, stride or offset; past its end; a
            broadcast view larger than it).

    Example:
    >>> read_torch_checkpoint("weights.pt")["conv1.weight"].dtype  # doctest: +SKIP
    dtype('float32')
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: checkpoint file {'is a folder' if path.is_dir() else 'does not exist'}.")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise PretrainedWeightsError(
            f"{path}: not a torch.save zip checkpoint (corrupt, truncated or another format: {error}).") from error
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise PretrainedWeightsError(f"{path}: not a torch.save checkpoint (a zip without one "
                                         f"'<name>/data.pkl'; it holds {names[:5]}).")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = _read(archive, path, f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
        if byteorder != "little":
            raise PretrainedWeightsError(f"{path}: storages are {byteorder}-endian; only little-endian is read.")
        unpickler = _SafeUnpickler(io.BytesIO(_read(archive, path, pickles[0])), path, archive, prefix)
        try:
            return unpickler.load()
        except PretrainedWeightsError:
            raise
        except Exception as error:  # a damaged pickle raises many types
            raise PretrainedWeightsError(f"{path}: unreadable pickle {pickles[0]} "
                                         f"({type(error).__name__}: {error}).") from error


def torch_state_dict(path: str | pathlib.Path, prefix: str = "", key: str | None = None) -> dict[str, np.ndarray]:
    """The flat `{name: array}` state dict of a `torch.save` checkpoint.

    Args:
        path: the checkpoint (see `read_torch_checkpoint`).
        prefix: keep only the tensors whose names start with it, and strip it (e.g.
            `"encode_image.i3_resnet."` for Merlin's full checkpoint).
        key: the entry holding the state dict when the file holds a dict of several
            (default: `"state_dict"` when present, else the file's dict itself).

    Returns:
        `{name: array}`, floats as float32.

    Raises:
        PretrainedWeightsError: an unreadable file (see `read_torch_checkpoint`), no dict of
            tensors, or no tensor under `prefix`.
    """
    content = read_torch_checkpoint(path)
    if key is None and isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        key = "state_dict"
    state = content.get(key) if key is not None and isinstance(content, dict) else content
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path}: expected a state dict (a dict of tensors)"
                                     f"{f' under {key!r}' if key else ''}, found {type(state).__name__}.")
    tensors = {str(k)[len(prefix):]: v for k, v in state.items()
               if isinstance(v, np.ndarray) and str(k).startswith(prefix)}
    if not tensors:
        raise PretrainedWeightsError(f"{path}: no tensor named '{prefix}...' in the state dict "
                                     f"(its first keys: {list(state)[:5]}).")
    return tensors


def _read(archive, path, name, size=None):
    """The bytes of record `name`; with `size`, refused before decompressing unless it has that many."""
    try:
        info = archive.getinfo(name)
    except KeyError as error:
        raise PretrainedWeightsError(f"{path}: record {name} is missing from the checkpoint.") from error
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise PretrainedWeightsError(f"{path}: record {name} inflates {info.compress_size} bytes to {info.file_size} "
                                     "(torch.save stores records uncompressed): refused as a decompression bomb.")
    if size is not None and info.file_size != size:
        raise PretrainedWeightsError(f"{path}: record {name} holds {info.file_size} bytes, its storage record "
                                     f"says {size} (truncated or corrupt).")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:  # CRC mismatch, truncation
        raise PretrainedWeightsError(f"{path}: record {name} is corrupt or truncated ({error}).") from error


class _SafeUnpickler(pickle.Unpickler):
    """Admits tensor rebuilds, the four storage classes and OrderedDict; nothing else."""

    def __init__(self, file, path, archive, prefix):
        super().__init__(file)
        self.path, self.archive, self.prefix = path, archive, prefix
        self.storages = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in TENSOR_REBUILDS:
            return _rebuild_tensor if name == "_rebuild_tensor_v2" else _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _Storage(name)
        if module == "torch" and name.endswith("Storage"):
            raise PretrainedWeightsError(
                f"{self.path}: storage class 'torch.{name}' is not read: only {', '.join(sorted(STORAGE_DTYPES))} "
                "(bfloat16, float16, float32, int64); convert the checkpoint's tensors to one of those.")
        raise PretrainedWeightsError(
            f"{self.path}: refused pickle record '{module}.{name}': only tensor rebuilds "
            f"(torch._utils.{', '.join(TENSOR_REBUILDS)}), storages ({', '.join(sorted(STORAGE_DTYPES))}) "
            "and collections.OrderedDict are read; the file may run code when loaded with torch.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise PretrainedWeightsError(f"{self.path}: refused persistent id {pid!r}: not a tensor storage.")
        _, storage, key, _location, numel = pid
        if type(numel) is not int or numel < 0:
            raise PretrainedWeightsError(f"{self.path}: storage {key!r} has element count {numel!r}, not a whole "
                                         "number >= 0.")
        key = str(key)
        if key not in self.storages:
            dtype = STORAGE_DTYPES[storage.name]
            itemsize = 2 if dtype == "bfloat16" else dtype.itemsize
            raw = _read(self.archive, self.path, f"{self.prefix}data/{key}", size=int(numel) * itemsize)
            array = np.frombuffer(raw, np.uint16 if dtype == "bfloat16" else dtype)
            self.storages[key] = ((bfloat16_to_float32(array) if dtype == "bfloat16"
                                   else array.astype(np.float32) if dtype.kind == "f" else array.copy(), key),
                                  (storage.name, numel))
        data, declared = self.storages[key]
        if declared != (storage.name, numel):
            raise PretrainedWeightsError(f"{self.path}: storage data/{key} is named as {declared[0]} of {declared[1]} "
                                         f"elements and as {storage.name} of {numel}.")
        return data


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """`torch._utils._rebuild_tensor_v2` in NumPy: a view of the storage, copied.

    Only a view that lies inside its storage and holds no more elements than it is rebuilt:
    a negative size, stride or offset, a stride list that does not match the size, or a
    broadcast view larger than its storage (no weight is saved as one) is a `ValueError`
    naming the storage record (`read_torch_checkpoint` adds the file).
    """
    data, key = storage
    if not (_whole_numbers(size) and _whole_numbers(stride) and _whole_numbers([offset])):
        raise ValueError(f"storage data/{key}: a tensor's size {size!r}, stride {stride!r} and offset {offset!r} "
                         "must be whole numbers.")
    size, stride, offset = tuple(size), tuple(stride), int(offset)
    where = f"storage data/{key} ({data.size} elements): a tensor of size {size}, stride {stride}, offset {offset}"
    if len(size) != len(stride) or min((offset, *size, *stride)) < 0:
        raise ValueError(f"{where} is not a view of it (negative or mismatched size, stride or offset).")
    numel = int(np.prod(size, dtype=np.int64))
    needed = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if numel else offset
    if needed > data.size or numel > data.size:
        raise ValueError(f"{where} reaches past the storage or holds more elements than it "
                         f"({numel} elements, last one at {needed - 1}).")
    view = np.lib.stride_tricks.as_strided(data[offset:], size, tuple(s * data.itemsize for s in stride),
                                           writeable=False)
    return np.array(view)


def _whole_numbers(values):
    """Whether `values` is a list or tuple of Python ints (not bools, floats or strings)."""
    return isinstance(values, (list, tuple)) and all(type(v) is int for v in values)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    """`torch._utils._rebuild_parameter`: a parameter is read as its tensor."""
    return data
