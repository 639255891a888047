"""The Keras model that trains a stage, and its data: the whole network's path to the new
head (`ContinualModel`), or the path's trainable rest on its frozen prefix's outputs,
computed once per patient and kept in memory (`CachedHeadModel`).

The split is `unicon_tf.model.paths.head_path`: the frozen prefix is every layer call that
computes only with weights that do not train this stage. Its outputs are cached when the
prefix runs the shared encoder, no foreground crops are sampled, the stage has
`cache_features` (default on) and the cached inputs stay the same every epoch:

- a new head on a frozen encoder (the trainable rest is the head): always; cached training
  sees the stored crops, unaugmented. When the head also reads the volumes (a side
  encoder), only when the stage does not augment (`augment: false`): the volumes are then
  cached beside the encoder's multi-scale features, and the side encoder and decoder train
  without re-running the backbone (what makes a 117 M pretrained encoder's dense head
  trainable on a CPU);
- a new modality on a path from encoder level s > 0 (`adapter_start: s`), with or without
  the path's adapters: when the stage does not augment. The first modality's base feature
  maps of levels < s and the new modality's volume are cached; the new stem, the fusion,
  the levels >= s and the head train, and backpropagation never enters levels < s.

The cache's size is checked against `CACHE_LIMIT_BYTES` first.
"""

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
import warnings

import keras
import numpy as np
import tensorflow as tf

from unicon_tf._quiet import progress_verbosity
from unicon_tf.data import dataset, read_schema
from unicon_tf.model import model_parts
from unicon_tf.model.paths import head_path
from unicon_tf.train.continual import CachedHeadModel, ContinualModel

if TYPE_CHECKING:
    from unicon_tf.train.pipeline import StageSpec
    from unicon_tf.train.plugins import Plugin

CACHE_LIMIT_BYTES = 4 * 2**30
"""The most memory cached encoder features may take; above it a stage trains uncached (warned)."""


def stage_data(spec: "StageSpec", modalities: Sequence[str], head: str) -> Callable[..., tf.data.Dataset]:
    """`make(epoch, split="train", ...)`: a stage's data for an epoch, targets keyed by head.

    The seed of shuffling and augmentation depends only on (stage seed, epoch), so an
    interrupted stage resumes on exactly the batches it would have seen.
    """
    hp = spec.training

    def make(epoch, split="train", augment=None, shuffle=None, batch_size=None):
        # The training batches (augment not given) only: validation, Fisher and cached features see the stored crops.
        sampled = split == "train" and augment is None
        ds = dataset(spec.data, split, task=spec.task, batch_size=batch_size or hp.batch_size,
                     augment=hp.augment if augment is None else augment, seed=hp.seed * 1000 + epoch,
                     shuffle=shuffle, modalities=modalities,
                     foreground_probability=_foreground_probability(hp) if sampled else None)
        return ds.map(lambda x, y: (x, {head: y}))

    return make


def _foreground_probability(training):
    """The stage's `sampling: {foreground_probability}` (None: the stored crops)."""
    return (training.sampling or {}).get("foreground_probability")


def read_modalities(network: keras.Model, heads: Sequence[str]) -> list[str]:
    """The modalities `heads` of `network` read, in order of first use: what a stage's
    batches must carry for its new head and its plugins' old heads."""
    parts = model_parts(network)["heads"]
    return list(dict.fromkeys(m for h in heads for m in parts[h].modalities))


def stage_trainer(spec: "StageSpec", network: keras.Model, head: str, plugins: Sequence["Plugin"],
                  make_data: Callable[..., tf.data.Dataset], verbose: int = 0,
                  ) -> tuple[keras.Model, Callable[..., tf.data.Dataset], tf.data.Dataset | None]:
    """The Keras model that trains the stage, and `(train_data(epoch), val_data)`: on cached
    features when the stage allows it (see the module docstring), else on the volumes."""
    cache = _feature_cache(spec, network, head)
    if cache is not None:
        return _cached_trainer(spec, network, head, cache, make_data, verbose)
    heads = [head] + [h for plugin in plugins for h in plugin.heads]
    needed = read_modalities(network, heads)
    inputs = {m: network.input[m] for m in network.input if m in needed}
    outputs = {h: network.output[h] for h in heads}
    subnetwork = keras.Model(inputs, outputs, name=network.name)
    has_val = "val" in read_schema(spec.data)["splits"]
    val_data = make_data(0, "val", augment=False, shuffle=False) if has_val else None
    trainer = ContinualModel(subnetwork, {head: spec.task}, plugins, loss_options={head: spec.training.loss or {}})
    return trainer, make_data, val_data


def _feature_cache(spec, network, head):
    """`(path, extractor, {split: patients})` when the head's path may train on its cached
    frozen prefix within `CACHE_LIMIT_BYTES`; None otherwise (warned when only the size is
    in the way)."""
    path = head_path(network, head)
    # The trainable rest sees the stored crops: a stage that augments keeps it on the volumes,
    # except a head alone on encoder features (which then trains unaugmented, as it always has).
    constant_inputs = not spec.training.augment or (len(path.nodes) == 1 and not path.reads_volumes)
    if not (spec.training.cache_features and path.runs_encoder and constant_inputs
            and _foreground_probability(spec.training) is None):
        return None
    extractor = path.extractor()
    splits = read_schema(spec.data)["splits"]
    counts = {split: splits[split]["count"] for split in ("train", "val") if split in splits}
    size = sum(math.prod(s[1:]) * 4 for s in _shapes(extractor.output)) * sum(counts.values())
    if size > CACHE_LIMIT_BYTES:
        warnings.warn(f"Stage '{spec.name}': cached features would take {size / 2**30:.1f} GiB "
                      f"(> {CACHE_LIMIT_BYTES / 2**30:.0f} GiB): training without the cache.")
        return None
    return path, extractor, counts


def _cached_trainer(spec, network, head, cache, make_data, verbose):
    """A `CachedHeadModel` on the frozen prefix's outputs extracted once (train and val),
    and its datasets."""
    path, extractor, counts = cache
    cached_train = _cache_features(extractor, make_data(0, augment=False, shuffle=False),
                                   counts["train"] if verbose else None, "train")
    cached_val = _cache_features(extractor, make_data(0, "val", augment=False, shuffle=False),
                                 counts.get("val") if verbose else None, "val") if "val" in counts else None
    batch, seed = spec.training.batch_size, spec.training.seed

    def train_data(epoch):
        features, targets = cached_train
        count = len(targets[head])
        ds = tf.data.Dataset.from_tensor_slices((features, targets)).shuffle(count, seed=seed * 1000 + epoch)
        return ds.batch(batch)

    val_data = None if cached_val is None else tf.data.Dataset.from_tensor_slices(cached_val).batch(batch)
    trainer = CachedHeadModel(network, head, spec.task, path=path, loss_options={head: spec.training.loss or {}})
    trainer.cache_bytes = sum(int(f.nbytes) for cache in (cached_train, cached_val) if cache for f in cache[0])
    if verbose:
        print(f"cached encoder features: {trainer.cache_bytes / 2**20:.1f} MiB in memory")
    return trainer, train_data, val_data


def _shapes(outputs):
    return [tuple(o.shape) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _cache_features(extractor, ds, count=None, split="train"):
    """One pass of the frozen feature extractor: `(features tuple, {head: targets})` in memory,
    with a progress bar over `count` patients when given."""
    progress = keras.utils.Progbar(count, unit_name="patient", verbose=progress_verbosity(1)) if count else None
    if progress is not None:
        print(f"extracting encoder features ({split})")
    features, targets = [], []
    for x, y in ds:
        out = extractor(x, training=False)
        features.append([np.asarray(f) for f in (out if isinstance(out, (list, tuple)) else [out])])
        targets.append(y)
        if progress is not None:
            progress.add(len(features[-1][0]))
    stacked = tuple(np.concatenate([f[i] for f in features]) for i in range(len(features[0])))
    merged = {k: np.concatenate([np.asarray(t[k]) for t in targets]) for k in targets[0]}
    return stacked, merged
