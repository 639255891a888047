"""Encoder families: how each kind of shared encoder is built, described, loaded and headed.

`foundation(encoder=...)`, `expand` and `describe` look a family up here instead of
branching on its kind. A family says

- `options`: the `foundation` keyword options it takes, and `build(input_shape, **options)`,
  the `SharedEncoder` it makes for volumes of `input_shape`;
- `detect(backbone)`: whether a (possibly loaded) backbone is one of its own;
- `summary(encoder)`: what `describe` reports of it beyond parameters and levels;
- `levels`: whether its levels are computed one from the previous (so a path can start at
  level s, `expand(adapter_start=s)`, and adapters can go on chosen levels);
- `load_weights(model, path, format)`: loading a published checkpoint, where it has one.

Entries: `residual` (the built-in residual CNN) and `custom` (a user's own Keras backbone,
the fallback) here; `vit` (3D ViT, MONAI's weights) in `unicon_tf.model.vit` and
`i3resnet` (Merlin's inflated ResNet, PyTorch weights) in `unicon_tf.model.i3resnet`, each
family's module registering it. Adding a family is one `register(EncoderFamily(...))` in
its module, imported by `unicon_tf.model.foundation`.

Example:
>>> family_named("residual").levels
True
>>> sorted(FAMILIES)
['custom', 'i3resnet', 'residual', 'vit']
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras

from unicon_tf.model.encoder import SharedEncoder, residual_backbone
from unicon_tf.options import ENCODER_OPTIONS, RESIDUAL_DEPTH


@dataclasses.dataclass(frozen=True)
class EncoderFamily:
    """One kind of shared encoder (see the module docstring for each field)."""

    name: str
    options: tuple[str, ...]
    build: Callable[..., SharedEncoder] | None
    detect: Callable[[keras.Model], bool]
    summary: Callable[[SharedEncoder], dict] = lambda encoder: {}
    levels: bool = True
    load_weights: Callable[..., object] | None = None


FAMILIES: dict[str, EncoderFamily] = {}
"""Family name -> `EncoderFamily`, in detection order (`custom`, the fallback, last)."""


def register(family: EncoderFamily) -> EncoderFamily:
    """Add a family to `FAMILIES` (before `custom`, which detects every backbone).

    Raises:
        ValueError: a family of that name exists.
    """
    if family.name in FAMILIES:
        raise ValueError(f"An encoder family named '{family.name}' is registered already.")
    fallback = FAMILIES.pop("custom", None)
    FAMILIES[family.name] = family
    if fallback is not None and family.name != "custom":
        FAMILIES["custom"] = fallback
    return family


def family_named(name: str) -> EncoderFamily:
    """The family called `name`.

    Raises:
        ValueError: no such family (the message lists them).
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown encoder family '{name}': expected one of {sorted(FAMILIES)}.")
    return FAMILIES[name]


def family_of(encoder: SharedEncoder | keras.Model) -> EncoderFamily:
    """The family of a shared encoder (or of its backbone), `custom` when no other claims it."""
    backbone = encoder.backbone if isinstance(encoder, SharedEncoder) else encoder
    return next(family for family in FAMILIES.values() if family.detect(backbone))


def _residual(input_shape, width=16, depth=RESIDUAL_DEPTH):
    stride = 2 ** (depth - 1)
    if any(d % stride for d in input_shape):
        raise ValueError(f"input_shape {input_shape} is not divisible by the encoder's total stride {stride}: "
                         f"use multiples of {stride} (or a smaller depth).")
    return SharedEncoder(residual_backbone(input_channels=width, width=width, depth=depth), name="encoder")


register(EncoderFamily("residual", ENCODER_OPTIONS["residual"], _residual,
                       detect=lambda backbone: {"level0_conv1", "level0_norm1"} <= {layer.name for layer in backbone.layers}))
register(EncoderFamily("custom", (), None, detect=lambda backbone: True))
