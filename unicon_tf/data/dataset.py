"""`tf.data` pipelines over an ingested cohort: parse, per-task targets, augment, batch."""

import pathlib
from collections.abc import Sequence

import tensorflow as tf

from unicon_tf.data.augment import augment_example
from unicon_tf.data.errors import DataError
from unicon_tf.data.records import parse_example, read_schema, verify_shards
from unicon_tf.data.sampling import check_sampling_options, foreground_crop
from unicon_tf.tasks import TASKS


def dataset(directory: pathlib.Path | str, split: str, task: str | None = None, batch_size: int = 2,
            augment: bool = False, seed: int = 0, shuffle: bool | None = None, modalities: Sequence[str] | None = None,
            cache: bool = True, drop_remainder: bool = False, with_meta: bool = False,
            foreground_probability: float | None = None) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of `(inputs, targets)` from an ingested cohort folder.

    Args:
        directory: a folder written by `ingest`.
        split: `train`, `val` or `test`.
        task: a task kind (`unicon_tf.tasks.TASKS`; targets: its `target` of each
            example), or None (targets: dict of every target the cohort has).
        batch_size: examples per batch.
        augment: joint random flips, rotations, scaling and intensity jitter.
        seed: seeds shuffling and augmentation: the same seed gives the same batches.
        shuffle: shuffle examples (default: only the train split).
        modalities: input modalities to yield (default: all the cohort has).
        cache: keep parsed examples in memory after the first pass.
        drop_remainder: drop a last smaller batch.
        with_meta: also yield `{"patient_id", "affine"}` as a third element.
        foreground_probability: re-centre each example's patch on a random lesion voxel
            with this probability, else on a background voxel, before augmentation
            (`unicon_tf.data.sampling.foreground_crop`); None keeps the stored crops.

    Returns:
        A dataset of `(inputs, targets)` (or `(inputs, targets, meta)`), inputs a dict
        `{modality: (batch, D, H, W, 1)}`, with known cardinality.

    Raises:
        DataError: a missing split, target or modality (naming schema.json and the
            field), a foreground_probability for a cohort without masks, or a shard that
            is missing, truncated or corrupt (naming the shard).
        ValueError: a foreground_probability outside [0, 1].

    Example:
    >>> train = dataset("data/ct32", "train", task="classification", batch_size=4,
    ...                 augment=True, seed=1)  # doctest: +SKIP
    """
    schema = read_schema(directory)
    schema_file = f"{directory}/schema.json"
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task '{task}': expected one of {sorted(TASKS)} or None.")
    needed = TASKS[task].targets if task is not None else ()
    missing = [t for t in needed if t not in schema["targets"]]
    if missing:
        raise DataError(f"the cohort has no {missing} targets needed by a {task} task (it has {schema['targets']})",
                        file=schema_file, field="/".join(missing))
    modalities = list(modalities or schema["modalities"])
    absent = [m for m in modalities if m not in schema["modalities"]]
    if absent:
        raise DataError(f"the cohort has no modality {absent} (it has {schema['modalities']})",
                        file=schema_file, field="/".join(absent))
    check_sampling_options({"foreground_probability": foreground_probability})
    if foreground_probability is not None and "mask" not in schema["targets"]:
        raise DataError("foreground-biased sampling needs lesion masks, and the cohort has none",
                        file=schema_file, field="mask")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    paths = verify_shards(directory, schema, split)
    count = schema["splits"][split]["count"]

    ds = tf.data.TFRecordDataset(paths, compression_type="GZIP")
    ds = ds.map(lambda s: parse_example(s, schema), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    if cache:
        ds = ds.cache()
    if split == "train" if shuffle is None else shuffle:
        ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if foreground_probability is not None:
        crop_seeds = tf.data.Dataset.random(seed=seed + 7919, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, crop_seeds).map(
            lambda example, s: foreground_crop(example, modalities, s, foreground_probability),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
    if augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda example, s: augment_example(example, modalities, s),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )

    def to_model(example):
        inputs = {m: example[m] for m in modalities}
        if task is None:
            targets = {t: example[t] for t in schema["targets"]}
        else:
            targets = TASKS[task].target(example)
        if with_meta:
            return inputs, targets, {"patient_id": example["patient_id"], "affine": example["affine"]}
        return inputs, targets

    ds = ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
