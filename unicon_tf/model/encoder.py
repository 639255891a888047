"""The shared 3D encoder: a backbone from stem features to multi-scale feature maps.

`residual_backbone` builds the default backbone (pre-activation residual Conv3D blocks with
GroupNormalization, one stride-2 downsampling per level). `SharedEncoder` wraps any such
functional backbone, the default one, the 3D ViT (`unicon_tf.model.vit`) or a user's own
pretrained network, so that it can be called once per input path (CT, fused CT+PET, an
adapter's path) with shared weights, and so that low-rank adapters can be added to its
Conv3D kernels or attention projections.

A path may also start at an encoder level (`start=s`): it reads another path's level
`s - 1` feature map and computes levels `s ...` only, so the full-resolution levels, the
costliest, are computed once and shared by every path that starts later.
"""

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import keras

from unicon_tf.model.adapters import (AdaptableConv3D, LowRankAdapters, PathGroupNormalization, PathParameters,
                                      adapter_scope)
from unicon_tf.model.group_norm import GroupNormalization

if TYPE_CHECKING:
    import tensorflow as tf


def group_norm(channels: int, name: str | None = None, per_path: bool = False) -> keras.layers.GroupNormalization:
    """GroupNormalization with up to 8 groups that always divide `channels`; with
    `per_path=True` a `PathGroupNormalization` (the encoder's, so paths can own a copy)."""
    layer = PathGroupNormalization if per_path else GroupNormalization
    return layer(groups=math.gcd(8, channels), name=name)


def residual_backbone(input_channels: int = 16, width: int = 16, depth: int = 4,
                      name: str = "residual_backbone") -> keras.Model:
    """The default backbone: `depth` levels, channels width * 2**level, stride 2 per level.

    Args:
        input_channels: channels of the stem features it reads.
        width: channels of the first (full-resolution) level.
        depth: number of levels; the total stride is 2 ** (depth - 1).
        name: model name.

    Returns:
        A functional `keras.Model` from `(D, H, W, input_channels)` (spatial dims free)
        to a list of `depth` feature maps, finest first.

    Example:
    >>> backbone = residual_backbone(input_channels=8, width=8, depth=3)
    >>> [tuple(f.shape[1:]) for f in backbone(keras.ops.zeros((1, 16, 16, 16, 8)))]
    [(16, 16, 16, 8), (8, 8, 8, 16), (4, 4, 4, 32)]
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}.")

    def residual_block(x, channels, prefix):
        shortcut = x
        if x.shape[-1] != channels:
            shortcut = AdaptableConv3D(channels, 1, name=f"{prefix}_shortcut")(x)
        x = group_norm(x.shape[-1], name=f"{prefix}_norm1", per_path=True)(x)
        x = keras.layers.Activation("swish", name=f"{prefix}_act1")(x)
        x = AdaptableConv3D(channels, 3, padding="same", name=f"{prefix}_conv1")(x)
        x = group_norm(channels, name=f"{prefix}_norm2", per_path=True)(x)
        x = keras.layers.Activation("swish", name=f"{prefix}_act2")(x)
        x = AdaptableConv3D(channels, 3, padding="same", name=f"{prefix}_conv2")(x)
        return keras.layers.Add(name=f"{prefix}_add")([shortcut, x])

    inputs = keras.Input((None, None, None, input_channels), name="stem_features")
    x = inputs
    features = []
    for level in range(depth):
        channels = width * 2**level
        if level > 0:
            x = AdaptableConv3D(channels, 3, strides=2, padding="same", name=f"level{level}_down")(x)
        x = residual_block(x, channels, prefix=f"level{level}")
        features.append(x)
    return keras.Model(inputs, features, name=name)


def _with_adaptable_convs(backbone):
    """A copy of a user's backbone whose Conv3D layers can carry adapters and whose
    GroupNormalization layers per-path copies, same weights."""

    def clone_layer(layer):
        if type(layer) is keras.layers.Conv3D:
            return AdaptableConv3D.from_conv3d(layer)
        if type(layer) is keras.layers.GroupNormalization and layer.scale and layer.center:
            return PathGroupNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(backbone, clone_function=clone_layer, recursive=True)
    clone.set_weights(backbone.get_weights())
    return clone


@keras.saving.register_keras_serializable(package="unicon_tf")
class SharedEncoder(keras.layers.Layer):
    """The encoder every head reads, callable on several paths with shared weights.

    Calling it with `adapter=name` runs the backbone with that adapter's low-rank kernel
    updates; without it, with the base kernels only. With `start=s` it reads level `s - 1`'s
    feature map (of another path) and returns the feature maps of levels `s ...` only.

    Args:
        backbone: functional `keras.Model` from a volume of stem features
            `(D, H, W, C)` to a list of feature maps, finest first, each a 5D tensor.
            Plain `Conv3D` layers in a user's backbone are converted (weights kept) to
            `AdaptableConv3D` so adapters can be added.
        input_stride: per-axis factor from the model's volume grid to the grid of the stem
            features the backbone reads: 1 for the residual CNN, the patch size for a ViT
            (whose stems are patch embeddings).
        adapter_targets: roles of the layers that `add_adapter` adapts by default
            (`conv`, `query`, `key`, `value`, `out`, `mlp`); None: every adaptable layer.
        **kwargs: `keras.layers.Layer` arguments (name, ...).

    Example:
    >>> encoder = SharedEncoder(residual_backbone(input_channels=8, width=8, depth=2))
    >>> features = encoder(keras.ops.zeros((1, 16, 16, 16, 8)))
    >>> encoder.add_adapter("prognosis", rank=2)
    >>> adapted = encoder(keras.ops.zeros((1, 16, 16, 16, 8)), adapter="prognosis")
    >>> coarse = encoder(features[0], adapter="prognosis", start=1)  # level 1 only, from level 0
    >>> [tuple(f.shape[1:]) for f in coarse]
    [(8, 8, 8, 16)]
    """

    def __init__(self, backbone: keras.Model | dict[str, Any], input_stride: int | Sequence[int] = 1,
                 adapter_targets: Iterable[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        stride = (input_stride,) * 3 if isinstance(input_stride, int) else tuple(input_stride)
        if len(stride) != 3 or min(stride) < 1:
            raise ValueError(f"input_stride must be one or three positive ints, got {input_stride!r}.")
        self.input_stride = tuple(int(s) for s in stride)
        self.adapter_targets = None if adapter_targets is None else sorted(adapter_targets)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        if not isinstance(backbone, keras.Model) or not hasattr(backbone, "inputs"):
            raise ValueError(f"encoder must be a functional keras.Model, got {type(backbone).__name__}.")
        if len(backbone.inputs) != 1 or len(backbone.inputs[0].shape) != 5:
            raise ValueError(
                "encoder must take one 5D input (batch, D, H, W, channels); got inputs "
                f"{[tuple(t.shape) for t in backbone.inputs]}."
            )
        if len(backbone.outputs) < 1 or any(len(t.shape) != 5 for t in backbone.outputs):
            raise ValueError(
                "encoder must output a list of 5D feature maps (batch, D, H, W, C), finest first; "
                f"got {[tuple(t.shape) for t in backbone.outputs]}."
            )
        has_adaptable = any(isinstance(layer, LowRankAdapters) for layer in backbone._flatten_layers())
        self.backbone = backbone if has_adaptable else _with_adaptable_convs(backbone)
        # Sub-networks from level s-1's features to levels s..: built on first use and not
        # tracked (they are views of the backbone's own layers, weights included).
        object.__setattr__(self, "_levels_from", {})

    @property
    def depth(self) -> int:
        """Number of feature levels the backbone outputs."""
        return len(self.backbone.outputs)

    def levels_from(self, start: int) -> keras.Model:
        """The backbone from level `start - 1`'s feature map to the feature maps of levels
        `start ...`, sharing the backbone's layers (a functional `keras.Model`).

        Raises:
            ValueError: `start` outside `[1, depth - 1]`, or a backbone whose level `start`
                is not computed from level `start - 1`'s output alone.
        """
        start = int(start)
        if not 1 <= start < self.depth:
            raise ValueError(f"A path can start at encoder level 1 to {self.depth - 1}, got {start}.")
        if start not in self._levels_from:
            try:
                tail = keras.Model(self.backbone.outputs[start - 1], self.backbone.outputs[start:],
                                   name=f"{self.backbone.name}_from_level{start}")
            except ValueError as error:
                raise ValueError(
                    f"This encoder's level {start} does not depend on level {start - 1}'s output alone, so a "
                    f"path cannot start there (use adapter_start=0): {error}") from error
            self._levels_from[start] = tail
        return self._levels_from[start]

    def leaf_layers(self) -> list[keras.layers.Layer]:
        """The backbone's layers, nested models flattened, in graph order."""
        return list(_leaf_layers(self.backbone))

    @property
    def input_channels(self) -> int:
        """Channels of the stem features the backbone reads."""
        return self.backbone.inputs[0].shape[-1]

    def feature_shapes(self, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Shapes `(1, d, h, w, c)` of the feature maps for a `(D, H, W)` volume, finest first."""
        grid = tuple(d // s for d, s in zip(input_shape, self.input_stride))
        shape = (1,) + grid + (self.input_channels,)
        return [tuple(s) for s in self.backbone.compute_output_shape(shape)]

    def stem_options(self) -> dict[str, Any]:
        """`ModalityStem` options for a new modality: a patch embedding when input_stride > 1,
        the volume itself when the backbone reads one channel, else a convolution."""
        if self.input_stride != (1, 1, 1):
            return {"kind": "patch", "patch_size": list(self.input_stride)}
        return {"kind": "identity"} if self.input_channels == 1 else {}

    @property
    def adaptable_layers(self) -> list[LowRankAdapters]:
        """The backbone's layers that can carry adapters (`LowRankAdapters`), in graph order."""
        return [layer for layer in self.leaf_layers() if isinstance(layer, LowRankAdapters)]

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """`{name: {"rank", "alpha", "params", "targets"}}` of the adapters this encoder holds."""
        summary = {}
        for layer in self.adaptable_layers:
            for name, spec in layer.adapters.items():
                entry = summary.setdefault(name, {**spec, "params": 0, "targets": []})
                entry["params"] += sum(_numel(w.shape) for w in layer.adapter_weights(name))
                if layer.role not in entry["targets"]:
                    entry["targets"].append(layer.role)
        return summary

    @property
    def path_layers(self) -> list[PathParameters]:
        """The backbone's layers with per-path variables (`PathParameters`), in graph order."""
        return [layer for layer in self.leaf_layers() if isinstance(layer, PathParameters)]

    @property
    def path_norms(self) -> dict[str, dict[str, Any]]:
        """`{name: {"params", "layers"}}` of the per-path GroupNorm copies this encoder holds."""
        summary = {}
        for layer in self.path_layers:
            if isinstance(layer, PathGroupNormalization):
                for name in layer.paths:
                    entry = summary.setdefault(name, {"params": 0, "layers": 0})
                    entry["params"] += sum(_numel(w.shape) for w in layer.path_variables(name))
                    entry["layers"] += 1
        return summary

    def base_weights(self) -> list[keras.Variable]:
        """The backbone's own weights, without any path's adapters or norm copies."""
        path_ids = {id(w) for layer in self.path_layers for name in layer.paths for w in layer.path_variables(name)}
        return [w for w in self.backbone.weights if id(w) not in path_ids]

    def path_weights(self, adapter: str | None = None) -> list[keras.Variable]:
        """The weights a call with `adapter` computes with: the base weights plus that path's
        adapters and norm copies (none for `adapter=None`)."""
        own = [w for layer in self.path_layers if adapter in layer.paths for w in layer.path_variables(adapter)]
        return self.base_weights() + (own if adapter is not None else [])

    def level_layers(self, levels: Iterable[int]) -> list[keras.layers.Layer]:
        """The backbone's leaf layers that compute the feature maps of `levels` (a level's
        layers are those of `levels_from(level)` that `levels_from(level + 1)` lacks).

        Raises:
            ValueError: a level outside `[0, depth - 1]`, or a backbone whose levels are not
                computed one from the previous (see `levels_from`).
        """
        levels = sorted({int(level) for level in levels})
        if not levels or levels[0] < 0 or levels[-1] >= self.depth:
            raise ValueError(f"Encoder levels must be in [0, {self.depth - 1}], got {levels}.")

        def from_level(level):
            if level == 0:
                return set(map(id, self.leaf_layers()))
            if level >= self.depth:
                return set()
            return set(map(id, _leaf_layers(self.levels_from(level))))

        chosen = set().union(*(from_level(level) - from_level(level + 1) for level in levels))
        return [layer for layer in self.leaf_layers() if id(layer) in chosen]

    def add_adapter(self, name: str, rank: int, alpha: float | None = None, targets: Iterable[str] | None = None,
                    start: int = 0, levels: Iterable[int] | None = None, shortcuts: bool = True) -> None:
        """Add adapter `name` of rank `rank` to the backbone's adaptable kernels.

        Args:
            name: the adapter's name (the head whose path uses it).
            rank: rank r of each kernel update.
            alpha: scale numerator (alpha / r); defaults to r.
            targets: roles of the layers to adapt (e.g. `["query", "value"]` for LoRA on
                attention, plus `"mlp"`); default: the encoder's `adapter_targets`.
            start: adapt only the layers of levels `start ...` (see `levels_from`); 0 for all.
            levels: adapt only the layers of these levels (see `level_layers`); default:
                every level from `start`.
            shortcuts: also adapt the 1x1x1 (shortcut) convolutions.

        Raises:
            ValueError: a duplicate name, targets that match no layer of the backbone, or a
                `start` or `levels` this backbone cannot take (see `levels_from`).
        """
        if name in self.adapters:
            raise ValueError(f"The encoder already has an adapter named '{name}'.")
        targets = targets if targets is not None else self.adapter_targets
        candidates = [layer for layer in self._path_candidates(start, levels) if isinstance(layer, LowRankAdapters)]
        if not shortcuts:
            candidates = [layer for layer in candidates if tuple(getattr(layer, "kernel_size", ())) != (1, 1, 1)]
        layers = [layer for layer in candidates if targets is None or layer.role in targets]
        if not layers:
            roles = sorted({layer.role for layer in candidates})
            raise ValueError(f"Adapter targets {list(targets)} match no layer of the encoder (its roles: {roles}).")
        for layer in layers:
            layer.add_adapter(name, rank, alpha)

    def add_path_norm(self, name: str, start: int = 0, levels: Iterable[int] | None = None) -> None:
        """Give path `name` its own GroupNorm scale and shift (copies of the shared ones) in
        the backbone's `PathGroupNormalization` layers of the chosen levels.

        Args:
            name: the path's name (the head whose path uses it).
            start, levels: which levels, as in `add_adapter`.

        Raises:
            ValueError: the chosen levels hold no `PathGroupNormalization` (e.g. an encoder
                saved before per-path normalisation existed, or a ViT), or `name` has copies.
        """
        layers = [layer for layer in self._path_candidates(start, levels) if isinstance(layer, PathGroupNormalization)]
        if not layers:
            raise ValueError("The encoder has no GroupNorm that can hold a per-path copy in the chosen levels "
                             "(PathGroupNormalization: the residual CNN built by this version of unicon_tf; a model "
                             "saved by an older one cannot take path_norm).")
        for layer in layers:
            layer.add_path_norm(name)

    def _path_candidates(self, start, levels):
        """The leaf layers of levels `levels` (default: `start ...`)."""
        if levels is None:
            return self.leaf_layers() if not start else list(_leaf_layers(self.levels_from(start)))
        levels = sorted({int(level) for level in levels})
        if levels and levels[0] < start:
            raise ValueError(f"A path starting at encoder level {start} computes levels {start} to "
                             f"{self.depth - 1} only; it cannot own parameters of levels {levels}.")
        return self.level_layers(levels)

    def call(self, inputs: "tf.Tensor", adapter: str | None = None, start: int = 0) -> list["tf.Tensor"]:
        """Feature maps of levels `start ...` (all levels for `start=0`, from stem features;
        otherwise from level `start - 1`'s feature map), with adapter `adapter` if given."""
        network = self.backbone if not start else self.levels_from(start)
        with adapter_scope(adapter):
            features = network(inputs)
        return list(features) if isinstance(features, (list, tuple)) else [features]  # one level: Keras unwraps it

    def compute_output_spec(self, inputs: keras.KerasTensor, adapter: str | None = None,
                            start: int = 0) -> list[keras.KerasTensor]:
        return (self.backbone if not start else self.levels_from(start)).compute_output_spec(inputs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["backbone"] = keras.saving.serialize_keras_object(self.backbone)
        config.update(input_stride=list(self.input_stride), adapter_targets=self.adapter_targets)
        return config


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _numel(shape):
    return math.prod(int(d) for d in shape)
