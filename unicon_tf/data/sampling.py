"""Foreground-biased crop sampling: where a training example's patch is centred.

An ingested cohort holds one crop per patient (`--center mask` centres it on the lesion),
so every training patch shows the lesion in the middle. `foreground_crop` re-centres
each training example's patch, in `tf.data`: with probability p on a random lesion voxel
(label > 0), otherwise on a random background voxel (label 0), as MONAI's
`RandCropByPosNegLabeld` does with `pos / (pos + neg) = p` (MONAI, `monai.transforms.
RandCropByPosNegLabeld`, https://docs.monai.io/en/stable/transforms.html). The patch
keeps the model's input shape, so unlike MONAI (which keeps the crop inside the image)
the voxels the shifted patch takes from outside the stored crop are filled: images with
the window's low value -1 (as the augmentation's affine fills them), the mask with 0.
A lesion then appears at any position, partly cut, or not at all, instead of always
whole in the middle. Validation and test data are never re-centred.

All randomness is stateless, driven by a `(2,)` int seed (see `unicon_tf.data.augment`).
"""

from collections.abc import Mapping, Sequence

import tensorflow as tf

from unicon_tf.train.config import SAMPLING_OPTIONS, check_sampling_options  # noqa: F401 (re-exported)


def _random_voxel(candidates, seed):
    """One row of `candidates` `(N, 3)` chosen uniformly (N >= 1)."""
    index = tf.random.stateless_uniform([], seed, 0, tf.shape(candidates)[0], dtype=tf.int32)
    return candidates[index]


def foreground_crop(example: Mapping[str, tf.Tensor], modalities: Sequence[str], seed: tf.Tensor,
                    foreground_probability: float) -> dict[str, tf.Tensor]:
    """Re-centre one parsed example's images and mask on a lesion or background voxel.

    Args:
        example: dict from `parse_example`: images `(D, H, W, 1)`, `mask` `(D, H, W)`.
        modalities: the image keys to move with the mask.
        seed: `(2,)` int tensor.
        foreground_probability: chance of centring on a lesion voxel (a patient without
            lesion is always centred on a background voxel, and vice versa).

    Returns:
        The example with shifted images and mask, same shapes (other keys unchanged).

    Example:
    >>> mask = tf.scatter_nd([[0, 0, 0]], [1], (4, 4, 4))
    >>> out = foreground_crop({"ct": tf.zeros((4, 4, 4, 1)), "mask": mask}, ["ct"], tf.constant([1, 2]), 1.0)
    >>> tf.where(out["mask"] > 0).numpy().tolist()  # the lesion voxel moved to the centre (2, 2, 2)
    [[2, 2, 2]]
    """
    choice_seed, voxel_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    mask = example["mask"]
    shape = tf.shape(mask)
    lesion, background = tf.where(mask > 0), tf.where(mask <= 0)
    want_lesion = tf.random.stateless_uniform([], choice_seed) < foreground_probability
    use_lesion = (want_lesion & (tf.shape(lesion)[0] > 0)) | (tf.shape(background)[0] == 0)
    centre = tf.cond(use_lesion, lambda: _random_voxel(lesion, voxel_seed),
                     lambda: _random_voxel(background, voxel_seed))
    shift = tf.cast(centre, tf.int32) - shape // 2  # out[i] = in[i + shift]

    def moved(volume, fill):
        padding = tf.stack([shape, shape], axis=1)
        if len(volume.shape) == 4:
            padding = tf.concat([padding, [[0, 0]]], axis=0)
        padded = tf.pad(volume, padding, constant_values=tf.cast(fill, volume.dtype))
        begin = shape + shift
        size = shape
        if len(volume.shape) == 4:
            begin, size = tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0)
        return tf.ensure_shape(tf.slice(padded, begin, size), volume.shape)

    out = dict(example)
    for modality in modalities:
        out[modality] = moved(example[modality], -1.0)
    out["mask"] = moved(mask, 0)
    return out
