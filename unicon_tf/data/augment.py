"""Joint 3D augmentation of a patient's volumes and mask, in TensorFlow, seeded per example.

One random affine (flips, small rotations about each axis, small scaling) is drawn per
example and applied to every modality (trilinear) and to the mask (nearest neighbour), so
images and labels stay aligned. Intensity jitter (scale and shift per modality) touches
images only. All randomness is stateless, driven by a `(2,)` int seed, so a pipeline with
a fixed seed yields the same augmented examples on every run.
"""

import math
from collections.abc import Mapping, Sequence

import tensorflow as tf


def random_affine(seed: tf.Tensor, max_rotation: float = 10.0, max_scale: float = 0.1, flip: bool = True) -> tf.Tensor:
    """A random 3x3 matrix: per-axis flips, then scaling by 1 +- max_scale, then rotations.

    Args:
        seed: `(2,)` int tensor.
        max_rotation: largest rotation about each axis, in degrees.
        max_scale: largest relative change of scale per axis.
        flip: whether each axis may be flipped (probability 0.5).
    """
    flip_seed, angle_seed, scale_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    flips = tf.where(tf.random.stateless_uniform([3], flip_seed) < 0.5, -1.0, 1.0) if flip else tf.ones([3])
    limit = max_rotation * math.pi / 180.0
    ax, ay, az = tf.unstack(tf.random.stateless_uniform([3], angle_seed, -limit, limit))
    scales = 1.0 + tf.random.stateless_uniform([3], scale_seed, -max_scale, max_scale)
    one, zero = tf.ones([]), tf.zeros([])

    def rotation(angle, i, j):
        c, s = tf.cos(angle), tf.sin(angle)
        rows = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
        rows[i][i], rows[i][j], rows[j][i], rows[j][j] = c, -s, s, c
        return tf.stack([tf.stack(r) for r in rows])

    rotate = rotation(ax, 1, 2) @ rotation(ay, 0, 2) @ rotation(az, 0, 1)
    return rotate @ tf.linalg.diag(scales) @ tf.linalg.diag(flips)


def _source_coordinates(shape, matrix):
    """For every output voxel, where to sample in the input: matrix about the volume centre."""
    axes = [tf.range(n, dtype=tf.float32) for n in shape]
    grid = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)
    center = (tf.constant(shape, tf.float32) - 1.0) / 2.0
    return tf.reshape(grid - center, (-1, 3)) @ tf.transpose(matrix) + center


def _inside(index, shape):
    return tf.reduce_all((index >= 0) & (index < tf.constant(shape, tf.int32)), axis=-1)


def sample_linear(volume: tf.Tensor, coords: tf.Tensor, fill: float) -> tf.Tensor:
    """Trilinear samples of `volume` `(D, H, W, C)` at `coords` `(N, 3)`; `fill` outside."""
    shape = tuple(int(d) for d in volume.shape[:3])
    low = tf.floor(coords)
    frac = coords - low
    low = tf.cast(low, tf.int32)
    out = 0.0
    for corner in range(8):
        offset = tf.constant([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], tf.int32)
        index = low + offset
        weight = tf.reduce_prod(tf.where(offset == 1, frac, 1.0 - frac), axis=-1, keepdims=True)
        values = tf.gather_nd(volume, tf.clip_by_value(index, 0, tf.constant(shape, tf.int32) - 1))
        out += weight * tf.where(_inside(index, shape)[:, None], values, fill)
    return tf.reshape(out, volume.shape)


def sample_nearest(volume: tf.Tensor, coords: tf.Tensor, fill: float) -> tf.Tensor:
    """Nearest-neighbour samples of `volume` `(D, H, W)` at `coords` `(N, 3)`; `fill` outside."""
    shape = tuple(int(d) for d in volume.shape[:3])
    index = tf.cast(tf.round(coords), tf.int32)
    values = tf.gather_nd(volume, tf.clip_by_value(index, 0, tf.constant(shape, tf.int32) - 1))
    return tf.reshape(tf.where(_inside(index, shape), values, tf.cast(fill, volume.dtype)), volume.shape)


def augment_example(example: Mapping[str, tf.Tensor], modalities: Sequence[str], seed: tf.Tensor,
                    max_rotation: float = 10.0, max_scale: float = 0.1,
                    intensity: float = 0.1) -> dict[str, tf.Tensor]:
    """Augment one parsed example (images `(D, H, W, 1)`, optional mask `(D, H, W)`) jointly.

    Args:
        example: dict from `parse_example`.
        modalities: the image keys to augment.
        seed: `(2,)` int tensor.
        max_rotation: degrees; max_scale: relative; intensity: relative scale/shift jitter.

    Returns:
        The example with augmented images and mask (other keys unchanged).
    """
    spatial_seed, intensity_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tuple(int(d) for d in example[modalities[0]].shape[:3])
    coords = _source_coordinates(shape, random_affine(spatial_seed, max_rotation, max_scale))
    stacked = tf.concat([example[m] for m in modalities], axis=-1)
    warped = tf.split(sample_linear(stacked, coords, fill=-1.0), len(modalities), axis=-1)
    jitter = tf.random.stateless_uniform([len(modalities), 2], intensity_seed, -intensity, intensity)
    out = dict(example)
    for i, modality in enumerate(modalities):
        out[modality] = warped[i] * (1.0 + jitter[i, 0]) + jitter[i, 1]
    if "mask" in example:
        out["mask"] = sample_nearest(example["mask"], coords, fill=0)
    return out
