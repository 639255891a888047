"""A 3D vision transformer encoder (ViT), the family UNICON's foundation model belongs to.

The ViT reads the token grid of a patch embedding (the modality stem, `ModalityStem(kind=
"patch")`), adds a position embedding, runs pre-norm transformer blocks and returns the
hidden states of chosen blocks as feature volumes `(batch, D/p, H/p, W/p, hidden)`, the
last one after the final LayerNorm:

    tokens -> + position embedding -> [x + attn(norm1(x)); x + mlp(norm2(x))] x num_layers
           -> outputs [hidden state of block l for l in feature_layers] + [norm(last)]

It follows MONAI's `monai.networks.nets.ViT` (Dosovitskiy et al. 2021, arXiv 2010.11929;
as used by UNETR, Hatamizadeh et al. 2022, arXiv 2103.10504) layer for layer, so a MONAI
state dict loads into it (`unicon_tf.model.pretrained`). The attention projections
`query`, `key`, `value`, `out` and the MLP's `mlp1`/`mlp2` are `AdaptableDense` layers:
LoRA adapters go on the roles the encoder is told (query and value by default, as LoRA's
authors and UNICON do).

Every layer is a node of one functional Keras graph, so the encoder is called once per
input path exactly like the residual CNN (see `SharedEncoder`), and saves with `.keras`.
"""

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from unicon_tf.options import VIT_OPTIONS
from unicon_tf.model.adapters import AdaptableDense
from unicon_tf.model.encoder import SharedEncoder
from unicon_tf.model.families import EncoderFamily, register
from unicon_tf.model.pretrained import load_pretrained

if TYPE_CHECKING:
    import tensorflow as tf

POSITIONS = ("learned", "sincos")
DEFAULT_ADAPTER_TARGETS = ("query", "value")


def resize_axis(table: "tf.Tensor", axis: int, size: "int | tf.Tensor") -> "tf.Tensor":
    """Resize `table` along `axis` to `size` by linear interpolation, half-pixel centres.

    The sampling of `torch.nn.functional.interpolate(..., mode="trilinear",
    align_corners=False)` along one axis: source index `(i + 0.5) * in / out - 0.5`,
    clamped at 0. `size` may be a tensor (a grid known only at run time).
    """
    size_in = int(table.shape[axis])
    source = (ops.arange(size, dtype="float32") + 0.5) * (size_in / ops.cast(size, "float32")) - 0.5
    source = ops.maximum(source, 0.0)
    low = ops.minimum(ops.floor(source), float(size_in - 1))
    weight = ops.reshape(source - low, [-1 if i == axis else 1 for i in range(len(table.shape))])
    low = ops.cast(low, "int32")
    high = ops.minimum(low + 1, size_in - 1)
    return ops.take(table, low, axis=axis) * (1.0 - weight) + ops.take(table, high, axis=axis) * weight


def sincos_position_embedding(grid: Sequence["int | tf.Tensor"], channels: int,
                              temperature: float = 10000.0) -> "tf.Tensor":
    """Fixed 3D sine-cosine position embedding `(d, h, w, channels)`, as MONAI builds it.

    Channels are six equal groups: sin/cos of the second axis, of the first, of the third
    (`monai.networks.blocks.pos_embed_utils.build_sincos_position_embedding`). The grid
    may hold tensors (sizes known only at run time).

    Raises:
        ValueError: `channels` is not divisible by 6.
    """
    if channels % 6:
        raise ValueError(f"A 3D sin-cos position embedding needs hidden_size divisible by 6, got {channels}.")
    sixth = channels // 6
    omega = 1.0 / (temperature ** (np.arange(sixth, dtype=np.float32) / sixth))
    axes = ops.meshgrid(*[ops.arange(n, dtype="float32") for n in grid], indexing="ij")
    first, second, third = (ops.reshape(a, (-1, 1)) * omega[None] for a in axes)
    parts = [ops.sin(second), ops.cos(second), ops.sin(first), ops.cos(first), ops.sin(third), ops.cos(third)]
    return ops.reshape(ops.concatenate(parts, axis=1), (*grid, channels))


@keras.saving.register_keras_serializable(package="unicon_tf")
class PositionEmbedding(keras.layers.Layer):
    """Adds a position embedding to a token grid `(batch, d, h, w, C)`.

    A `learned` embedding is a weight `(gd * gh * gw, C)` for the grid `grid` it was made
    for (MONAI's `position_embeddings` without the batch axis); on another grid it is
    resized trilinearly (half-pixel centres, as `F.interpolate(align_corners=False)`).
    A `sincos` embedding is computed for the grid it meets.

    Args:
        grid: `(gd, gh, gw)`, the token grid of the learned weight.
        kind: `learned` or `sincos`.
        temperature: the sin-cos frequency base.
        **kwargs: `keras.layers.Layer` arguments.

    Example:
    >>> layer = PositionEmbedding((2, 2, 2), kind="learned")
    >>> tuple(layer(keras.ops.zeros((1, 4, 4, 4, 6))).shape)
    (1, 4, 4, 4, 6)
    """

    def __init__(self, grid: Sequence[int], kind: str = "learned", temperature: float = 10000.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in POSITIONS:
            raise ValueError(f"Unknown position embedding '{kind}': expected one of {list(POSITIONS)}.")
        self.grid = tuple(int(g) for g in grid)
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"position grid must be three positive ints, got {grid!r}.")
        self.kind = kind
        self.temperature = float(temperature)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        channels = input_shape[-1]
        if self.kind == "learned":
            self.embedding = self.add_weight(
                name="position_embeddings", shape=(math.prod(self.grid), channels),
                initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            )
        elif channels % 6:
            raise ValueError(f"A 3D sin-cos position embedding needs hidden_size divisible by 6, got {channels}.")

    def table(self, grid: Sequence["int | tf.Tensor"], channels: int) -> "tf.Tensor":
        """The embedding `(d, h, w, channels)` for token grid `grid` (ints or tensors)."""
        if self.kind == "sincos":
            return sincos_position_embedding(grid, channels, self.temperature)
        table = ops.reshape(self.embedding, self.grid + (channels,))
        for axis, (size, trained) in enumerate(zip(grid, self.grid)):
            if not (isinstance(size, int) and size == trained):
                table = resize_axis(table, axis, size)
        return table

    def call(self, tokens: "tf.Tensor") -> "tf.Tensor":
        shape = ops.shape(tokens)
        return tokens + ops.cast(self.table(tuple(shape[1:4]), int(tokens.shape[-1])), tokens.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(grid=list(self.grid), kind=self.kind, temperature=self.temperature)
        return config


@keras.saving.register_keras_serializable(package="unicon_tf")
class SelfAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention over all tokens of a grid (no weights).

    Takes `[query, key, value]`, each `(batch, ..., C)` with the same token layout, splits
    C into `num_heads` heads of `C / num_heads` (MONAI's `(heads, head_dim)` order) and
    returns softmax(q k^T / sqrt(head_dim)) v in the query's shape.

    Args:
        num_heads: number of heads; must divide C.
        **kwargs: `keras.layers.Layer` arguments.
    """

    def __init__(self, num_heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)

    def call(self, qkv: Sequence["tf.Tensor"]) -> "tf.Tensor":
        query, key, value = qkv
        shape = ops.shape(query)
        channels = query.shape[-1]
        head_dim = channels // self.num_heads

        def heads(x):
            x = ops.reshape(x, (shape[0], -1, self.num_heads, head_dim))
            return ops.transpose(x, (0, 2, 1, 3))

        q, k, v = heads(query), heads(key), heads(value)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (head_dim**-0.5)
        attended = ops.matmul(ops.softmax(scores, axis=-1), v)
        return ops.reshape(ops.transpose(attended, (0, 2, 1, 3)), shape)

    def compute_output_shape(self, input_shapes: Sequence[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        return tuple(input_shapes[0])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(num_heads=self.num_heads)
        return config


def default_feature_layers(num_layers: int) -> list[int]:
    """The blocks whose hidden states UNETR reads: a quarter, half and three quarters deep.

    For 12 blocks this is MONAI UNETR's `hidden_states_out[3], [6], [9]` (1-based 3, 6, 9).
    """
    return sorted({min(num_layers, max(1, int(num_layers * k / 4 + 0.5))) for k in (1, 2, 3)})


def vit_backbone(position_grid: Sequence[int], hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, position: str = "learned", feature_layers: Iterable[int] | None = None,
                 qkv_bias: bool = False, dropout: float = 0.0, name: str = "vit") -> keras.Model:
    """The 3D ViT as a functional backbone from a token grid to its hidden-state volumes.

    Args:
        position_grid: `(gd, gh, gw)`, token grid of the learned position embedding (the
            pretraining grid; other grids are interpolated).
        hidden_size: token width C; divisible by `num_heads` (and by 6 for `sincos`).
        num_layers: transformer blocks.
        num_heads: attention heads.
        mlp_dim: hidden units of each block's MLP.
        position: `learned` or `sincos`.
        feature_layers: 1-based blocks whose hidden states are output, before the final
            norm (default `default_feature_layers(num_layers)`); the final normalised
            state is always the last output.
        qkv_bias: bias on the query, key and value projections (MONAI's `qkv_bias`).
        dropout: dropout rate after the position embedding, in the MLP and after attention.
        name: the model's name.

    Returns:
        A functional `keras.Model` from `(d, h, w, hidden_size)` tokens (spatial dims free)
        to a list of `len(feature_layers) + 1` volumes `(d, h, w, hidden_size)`.

    Raises:
        ValueError: inconsistent sizes or out-of-range feature layers.

    Example:
    >>> backbone = vit_backbone((2, 2, 2), hidden_size=24, num_layers=2, num_heads=2, mlp_dim=48)
    >>> [tuple(f.shape[1:]) for f in backbone(keras.ops.zeros((1, 2, 2, 2, 24)))]
    [(2, 2, 2, 24), (2, 2, 2, 24), (2, 2, 2, 24)]
    """
    if min(hidden_size, num_layers, num_heads, mlp_dim) < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads}), "
                         f"and num_layers ({num_layers}) and mlp_dim ({mlp_dim}) positive.")
    feature_layers = default_feature_layers(num_layers) if feature_layers is None else sorted(set(feature_layers))
    if not feature_layers or feature_layers[0] < 1 or feature_layers[-1] > num_layers:
        raise ValueError(f"feature_layers must be blocks 1..{num_layers}, got {feature_layers}.")

    inputs = keras.Input((None, None, None, hidden_size), name="patch_tokens")
    x = PositionEmbedding(position_grid, kind=position, name="position_embedding")(inputs)
    x = keras.layers.Dropout(dropout, name="position_dropout")(x)
    states = []
    for i in range(num_layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_norm1")(x)
        q, k, v = (AdaptableDense(hidden_size, use_bias=qkv_bias, role=role, name=f"block{i}_{role}")(h)
                   for role in ("query", "key", "value"))
        h = SelfAttention(num_heads, name=f"block{i}_attention")([q, k, v])
        h = AdaptableDense(hidden_size, role="out", name=f"block{i}_out")(h)
        h = keras.layers.Dropout(dropout, name=f"block{i}_attention_dropout")(h)
        x = keras.layers.Add(name=f"block{i}_attention_add")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_norm2")(x)
        h = AdaptableDense(mlp_dim, activation="gelu", role="mlp", name=f"block{i}_mlp1")(h)
        h = keras.layers.Dropout(dropout, name=f"block{i}_mlp_dropout1")(h)
        h = AdaptableDense(hidden_size, role="mlp", name=f"block{i}_mlp2")(h)
        h = keras.layers.Dropout(dropout, name=f"block{i}_mlp_dropout2")(h)
        x = keras.layers.Add(name=f"block{i}_mlp_add")([x, h])
        states.append(x)
    final = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")(x)
    return keras.Model(inputs, [states[layer - 1] for layer in feature_layers] + [final], name=name)


def is_vit(backbone: keras.Model) -> bool:
    """Whether a backbone is this module's ViT (it has a `PositionEmbedding`)."""
    return any(isinstance(layer, PositionEmbedding) for layer in backbone.layers)


def vit_summary(encoder: SharedEncoder) -> dict[str, Any]:
    """The ViT hyper-parameters of a `SharedEncoder` around `vit_backbone`, for `describe`."""
    backbone = encoder.backbone
    layers = {layer.name: layer for layer in backbone.layers}
    num_layers = sum(1 for name in layers if name.endswith("_attention") and name.startswith("block"))
    producers = [t._keras_history.operation.name for t in backbone.outputs]
    position = layers["position_embedding"]
    return {
        "kind": "vit",
        "patch_size": list(encoder.input_stride),
        "hidden_size": int(backbone.inputs[0].shape[-1]),
        "num_layers": num_layers,
        "num_heads": layers["block0_attention"].num_heads,
        "mlp_dim": layers["block0_mlp1"].units,
        "position": position.kind,
        "position_grid": list(position.grid),
        "feature_layers": [int(p[len("block"):].split("_")[0]) + 1 for p in producers[:-1]],
        "adapter_targets": encoder.adapter_targets,
    }


def vit_encoder(input_shape: tuple[int, int, int], patch_size: int | tuple[int, int, int] = 16,
                position_grid: tuple[int, int, int] | None = None,
                adapter_targets: Iterable[str] = DEFAULT_ADAPTER_TARGETS, **options: Any) -> SharedEncoder:
    """The `vit` family's `SharedEncoder` for volumes of `input_shape` (`foundation(encoder="vit")`).

    Args:
        input_shape: `(D, H, W)` voxels, each divisible by the patch size.
        patch_size: the patch embedding's patch, one int or per axis.
        position_grid: the learned position embedding's token grid (default the model's).
        adapter_targets: the attention projections LoRA adapters go on by default.
        **options: `vit_backbone`'s.

    Raises:
        ValueError: a patch size that is not one or three positive ints, or that does not
            divide `input_shape`.

    Example:
    >>> encoder = vit_encoder((16, 16, 16), patch_size=8, hidden_size=24, num_layers=2, num_heads=2, mlp_dim=48)
    >>> encoder.input_stride
    (8, 8, 8)
    """
    patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be one or three positive ints, got {patch_size!r}.")
    if any(d % p for d, p in zip(input_shape, patch)):
        raise ValueError(f"input_shape {input_shape} is not divisible by the ViT's patch size {patch}.")
    grid = tuple(d // p for d, p in zip(input_shape, patch))
    backbone = vit_backbone(position_grid or grid, **options)
    return SharedEncoder(backbone, input_stride=patch, adapter_targets=adapter_targets, name="encoder")



register(EncoderFamily("vit", VIT_OPTIONS, vit_encoder, is_vit, vit_summary, levels=False, load_weights=load_pretrained))
