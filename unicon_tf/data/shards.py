"""GZIP TFRecord shards: names, writers and the schema's shard entries.

Every writer of shards uses these (the local ingestion runner, the Beam runner, the
cross-validation folds of `unicon_tf.experiment.folds`), so their shards are named,
sized and checksummed alike.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from unicon_tf.files import sha256


def shard_name(split: str, number: int) -> str:
    """File name of shard `number` of a split."""
    return f"{split}-{number:05d}.tfrecord.gz"


def open_shard(directory: pathlib.Path | str, name: str) -> tf.io.TFRecordWriter:
    """A GZIP `TFRecordWriter` for a new shard."""
    return tf.io.TFRecordWriter(str(pathlib.Path(directory) / name), options="GZIP")


def shard_entry(directory: pathlib.Path | str, name: str, count: int) -> dict[str, Any]:
    """The schema's entry of a written shard: file, count, bytes, SHA-256."""
    path = pathlib.Path(directory) / name
    return {"file": name, "count": count, "bytes": path.stat().st_size, "sha256": sha256(path)}


def split_entries(shards: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """`{split: [entry, ...]}` (entries in shard order) -> the schema's `splits`."""
    return {split: {"count": sum(s["count"] for s in entries), "shards": entries}
            for split, entries in sorted(shards.items())}


class ShardWriter:
    """GZIP TFRecord shards of `shard_size` examples per split, with sizes and checksums."""

    def __init__(self, directory: pathlib.Path | str, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
        self.directory, self.shard_size = directory, shard_size
        self.open = {}  # split -> (writer, file name, count)
        self.shards = {}  # split -> [{"file", "count", ...}]

    def write(self, split: str, example: bytes) -> None:
        writer, name, count = self.open.get(split, (None, None, 0))
        if writer is None or count == self.shard_size:
            if writer is not None:
                self._finish(split, writer, name, count)
            name = shard_name(split, len(self.shards.get(split, [])))
            writer = open_shard(self.directory, name)
            count = 0
        writer.write(example)
        self.open[split] = (writer, name, count + 1)

    def _finish(self, split, writer, name, count):
        writer.close()
        self.shards.setdefault(split, []).append(shard_entry(self.directory, name, count))

    def close(self) -> dict[str, dict[str, Any]]:
        for split, (writer, name, count) in self.open.items():
            self._finish(split, writer, name, count)
        self.open = {}
        return split_entries(self.shards)
