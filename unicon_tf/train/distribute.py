"""Training across devices and hosts with `tf.distribute` (the stage key `distribute`).

| `distribute`  | strategy                                      | devices                              |
|---------------|-----------------------------------------------|--------------------------------------|
| `none`        | no strategy: the single-device path           | TensorFlow's default device          |
| `mirrored`    | `tf.distribute.MirroredStrategy`              | every GPU of the host, else every    |
|               |                                               | (logical) CPU device                 |
| `multiworker` | `tf.distribute.MultiWorkerMirroredStrategy`   | the hosts that `TF_CONFIG` describes |

Under a strategy, every global batch (the stage's `batch_size`, in the order one device
would see it) is split into N equal per-replica slices of ceil(b / N) rows, N the replicas
in sync; rows past the batch's end are padding, flagged invalid (`replica_batches`). A
replica's forward pass never sees an empty batch, and a last smaller batch is kept, not
dropped. The training step (`unicon_tf.train.continual`) gathers every replica's outputs
and targets (`gather_valid`) so that each loss (the Cox partial likelihood's risk sets
included) and each metric sees the global batch without the padding, and divides its loss
by N: Keras' optimizer sums the replicas' gradients, so the update is the one-device
update of the same global batch.

Only the chief writes the stage's files (`chief_folder`); other workers write to a
temporary folder that is removed at the end (they must still save: reading some
distributed variables is a collective step every worker takes part in).

Source: TensorFlow's "Custom training with tf.distribute.Strategy" and "Multi-worker
training with Keras" guides (tensorflow.org/tutorials/distribute).
"""

import functools
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from unicon_tf.names import DISTRIBUTE, check_distribute  # noqa: F401 (re-exported)


INPUTS, VALID = "_replica_inputs", "_replica_valid"
"""Keys of a per-replica batch's inputs: the model's inputs and the rows' validity flags
(`_` starts no valid modality name, so they never clash)."""


@functools.lru_cache(maxsize=None)
def get_strategy(kind: str) -> tf.distribute.Strategy | None:
    """The `tf.distribute.Strategy` of a `distribute` value; None for `none`.

    One strategy per kind and process: a `MultiWorkerMirroredStrategy` configures the
    process's collective ops, which can be done once, before TensorFlow runs anything
    else.

    Args:
        kind: `none`, `mirrored` or `multiworker` (this one reads `TF_CONFIG`).

    Returns:
        The strategy, or None.

    Raises:
        ValueError: an unknown kind, or `multiworker` without a valid `TF_CONFIG`.

    Example:
    >>> get_strategy("none") is None
    True
    >>> get_strategy("mirrored").num_replicas_in_sync >= 1
    True
    """
    check_distribute(kind)
    if kind == "none":
        return None
    if kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    config = os.environ.get("TF_CONFIG")
    try:
        cluster = json.loads(config or "")["cluster"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("distribute: multiworker reads the cluster from the TF_CONFIG environment variable, "
                         f"which is {'missing' if config is None else 'not valid JSON with a cluster'}: set it on "
                         "every host, e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:port\", "
                         "\"host2:port\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}'.") from None
    if not cluster:
        raise ValueError("TF_CONFIG: 'cluster' names no worker.")
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process writes the stage's files: always without a strategy or with a
    one-host one; under `MultiWorkerMirroredStrategy`, the `chief` task, or worker 0 when the
    cluster has no chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def chief_folder(path: pathlib.Path | str, strategy: tf.distribute.Strategy | None) -> pathlib.Path:
    """Where this process writes what belongs in `path`: `path` itself on the chief, a new
    temporary folder (removed by `release_folder`) on any other worker."""
    if is_chief(strategy):
        return pathlib.Path(path)
    return pathlib.Path(tempfile.mkdtemp(prefix=f"unicon-worker-{pathlib.Path(path).name}-"))


def release_folder(written: pathlib.Path | str, path: pathlib.Path | str) -> None:
    """Remove a non-chief worker's temporary folder (`written` is not `path`)."""
    if pathlib.Path(written) != pathlib.Path(path):
        shutil.rmtree(written, ignore_errors=True)


def replica_batches(strategy: tf.distribute.Strategy,
                    make_dataset: Callable[[], tf.data.Dataset]) -> tf.distribute.DistributedDataset:
    """A distributed dataset of per-replica slices of `make_dataset()`'s global batches.

    Every worker builds the same global dataset (same files, seeds and order as one
    device) and keeps the slices of its own replicas: replica r of N gets rows
    [r * k, (r + 1) * k) of a batch of b rows, k = ceil(b / N), with rows past b padded by
    the batch's first row and flagged invalid.

    Args:
        strategy: a `tf.distribute.Strategy`.
        make_dataset: `() -> tf.data.Dataset` of batched `(inputs, targets[, weights])`.

    Returns:
        A distributed dataset whose per-replica elements are
        `({INPUTS: inputs, VALID: (k,) bool}, targets[, weights])`.

    Example:
    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    >>> data = lambda: tf.data.Dataset.from_tensor_slices(({"ct": tf.range(3.0)}, tf.range(3))).batch(2)
    >>> [int(tf.reduce_sum(tf.cast(x[VALID], tf.int32))) for x, y in replica_batches(strategy, data)]
    [2, 1]
    """
    replicas = strategy.num_replicas_in_sync

    def per_worker(context):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF

        def slices(*batch):
            def take(replica):
                size = tf.shape(tf.nest.flatten(batch)[0])[0]
                rows = (size + replicas - 1) // replicas
                index = (first + replica) * rows + tf.range(rows)
                valid = index < size
                index = tf.where(valid, index, 0)
                part = tf.nest.map_structure(lambda t: tf.gather(t, index), batch)
                inputs = {INPUTS: part[0], VALID: valid}
                return (inputs, *part[1:])

            return tf.data.Dataset.range(local).map(lambda r: take(tf.cast(r, tf.int32)))

        return make_dataset().flat_map(slices).with_options(options)

    return strategy.distribute_datasets_from_function(per_worker)


def split_replica_inputs(inputs: Mapping[str, tf.Tensor]) -> tuple[Mapping[str, tf.Tensor], tf.Tensor | None]:
    """`(inputs, valid)` of a per-replica batch, or `(inputs, None)` for a plain one."""
    if isinstance(inputs, dict) and VALID in inputs:
        return inputs[INPUTS], inputs[VALID]
    return inputs, None


def gather_valid(values: Any, valid: tf.Tensor) -> Any:
    """Every replica's `values` (a nested structure, batch first), concatenated in replica
    order, without the padding rows: the global batch, on every replica.

    The gradient flows back to each replica's own rows (`ReplicaContext.all_gather`).
    """
    context = tf.distribute.get_replica_context()
    flat = [v for v in tf.nest.flatten(values) if v is not None]
    parts = [*flat, tf.cast(valid, tf.int32)]  # collectives take no bool
    devices = tf.distribute.get_strategy().extended.worker_devices
    if len(devices) == 1:
        # One device per worker (MultiWorkerMirroredStrategy): the step's tensors carry no
        # device, and a collective refuses a tensor without one ("destinations can not be empty").
        with tf.device(devices[0]):
            parts = [tf.identity(v) for v in parts]
    # One collective per tensor: a batch may not mix host (int32) and device tensors.
    gathered = [context.all_gather(v, axis=0) for v in parts]
    keep = gathered[-1] > 0
    masked = iter([tf.ensure_shape(tf.boolean_mask(v, keep), [None, *local.shape[1:]])
                   for v, local in zip(gathered[:-1], flat)])  # static shapes past the batch axis
    return tf.nest.map_structure(lambda v: None if v is None else next(masked), values)


def replica_logs(logs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """A replica step's logs as Keras' multi-worker reduction takes them: it averages each
    over axis 0 of the replicas' values concatenated, which a scalar does not have, so
    each becomes a vector of one (the reduced log is a scalar again)."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs
