"""Per-path encoder parameters: low-rank adapters (LoRA) on Conv3D and Dense kernels, and
per-path GroupNorm scale and shift, selected per call path.

A shared encoder serves several heads. A head added with `adapters=r` must see the encoder
with its own low-rank kernel update while every other head keeps seeing the original
kernels. `AdaptableConv3D` (the residual CNN's convolutions) and `AdaptableDense` (the
ViT's attention and MLP projections) therefore hold any number of named adapters and
apply the one that is *active* when they are called; `adapter_scope(name)` activates one
for the duration of a call (the encoder sets it around its backbone, see `SharedEncoder`).

With an adapter `a` of rank r the effective kernel is

    W_a = W + (alpha / r) * reshape(A_a @ B_a),   A_a: kernel.shape[:-1] + (r,), B_a: (r, C_out)

and B_a starts at zero, so a fresh adapter leaves the path's outputs unchanged (LoRA, Hu
et al. 2021, arXiv 2106.09685). The layout of A and B follows Keras' own `enable_lora`.

`PathGroupNormalization` (the residual CNN's GroupNorms) holds, per named path, its own
copy of the scale (gamma) and shift (beta), initialised to the shared ones: a path
with its own normalisation starts as the base path and trains its copy only, while
every other path keeps reading the shared gamma and beta (per-path normalisation, as
task-specific BatchNorm/GroupNorm parameters in Mudrakarta et al. 2019, "K for the price
of 1", arXiv 1810.10703). Both kinds are `PathParameters`: the training loop trains a
new path's variables (`path_variables`) and freezes the shared ones (`base_variables`).
"""

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from unicon_tf.model.group_norm import GroupNormalization

if TYPE_CHECKING:
    import tensorflow as tf

_ACTIVE_ADAPTER = contextvars.ContextVar("unicon_tf_active_adapter", default=None)


@contextlib.contextmanager
def adapter_scope(name: str | None) -> Iterator[None]:
    """Make adapter `name` (or None: no adapter) the active one inside the block.

    Args:
        name: adapter name, or None for the base kernels.

    Example:
    >>> conv = AdaptableConv3D(4, 3, padding="same")
    >>> _ = conv(keras.ops.zeros((1, 8, 8, 8, 2)))
    >>> conv.add_adapter("segmentation", rank=2)
    >>> with adapter_scope("segmentation"):
    ...     y = conv(keras.ops.ones((1, 8, 8, 8, 2)))
    """
    token = _ACTIVE_ADAPTER.set(name)
    try:
        yield
    finally:
        _ACTIVE_ADAPTER.reset(token)


def active_adapter() -> str | None:
    """The adapter name active in the current `adapter_scope`, or None."""
    return _ACTIVE_ADAPTER.get()


class PathParameters:
    """Mixin: a layer holding shared (base) variables and variables of named call paths.

    Each subclass provides `paths` (names of the paths with their own variables here),
    `path_variables(name)` (the variables path `name` alone reads) and `base_variables()`
    (the shared variables every other path reads).
    """


class LowRankAdapters(PathParameters):
    """Mixin: named LoRA adapters on a Keras layer whose weight is `self._kernel`.

    The layer's `role` says which kind of projection it is (`conv`, `query`, `key`,
    `value`, `out`, `mlp`), so an encoder can put adapters on some roles only.
    """

    role = "conv"

    def _init_adapters(self, adapters):
        self.adapters = {name: dict(spec) for name, spec in (adapters or {}).items()}
        self._adapter_weights = {}

    def _build_adapters(self):
        pending, self.adapters = self.adapters, {}
        for name, spec in pending.items():
            self.add_adapter(name, **spec)

    def add_adapter(self, name: str, rank: int, alpha: float | None = None) -> None:
        """Create adapter `name` of rank `rank` (B = 0, so outputs do not change yet).

        Args:
            name: the adapter's name (the head that uses it).
            rank: the rank r of the kernel update, >= 1.
            alpha: scale numerator (update scaled by alpha / r); defaults to `rank`.

        Raises:
            ValueError: the layer is not built, already has `name`, or rank < 1.
        """
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before adding adapters.")
        if name in self.adapters:
            raise ValueError(f"Layer '{self.name}' already has an adapter named '{name}'.")
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"Adapter rank must be >= 1, got {rank}.")
        self._tracker.unlock()  # same pattern as Keras' enable_lora
        try:
            down = self.add_weight(
                name=f"{name}_lora_a",
                shape=tuple(self._kernel.shape[:-1]) + (rank,),
                initializer="he_uniform",
                dtype="float32",
            )
            up = self.add_weight(
                name=f"{name}_lora_b", shape=(rank, self._kernel.shape[-1]), initializer="zeros", dtype="float32"
            )
        finally:
            self._tracker.lock()
        self._adapter_weights[name] = (down, up)
        self.adapters[name] = {"rank": rank, "alpha": float(alpha if alpha is not None else rank)}

    def adapter_weights(self, name: str) -> tuple[keras.Variable, keras.Variable]:
        """The (A, B) variables of adapter `name`."""
        return self._adapter_weights[name]

    @property
    def paths(self) -> list[str]:
        return list(self.adapters)

    def path_variables(self, name: str) -> list[keras.Variable]:
        return list(self._adapter_weights[name])

    def base_variables(self) -> list[keras.Variable]:
        return [v for v in (self._kernel, self.bias) if v is not None]

    @property
    def kernel(self) -> "keras.Variable | tf.Tensor":
        kernel = self._kernel
        name = active_adapter()
        if name in self._adapter_weights:
            down, up = self._adapter_weights[name]
            scale = self.adapters[name]["alpha"] / self.adapters[name]["rank"]
            kernel = ops.cast(kernel + scale * ops.matmul(down, up), self.compute_dtype)
        return kernel

    # The Keras layers' own (de)serialisation of variables covers only kernel and bias.
    def save_own_variables(self, store: dict[str, Any]) -> None:
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store: dict[str, Any]) -> None:
        keras.layers.Layer.load_own_variables(self, store)


@keras.saving.register_keras_serializable(package="unicon_tf")
class AdaptableConv3D(LowRankAdapters, keras.layers.Conv3D):
    """A `Conv3D` that can carry several named low-rank adapters.

    Outside an `adapter_scope` (or in the scope of an adapter this layer does not hold)
    it computes exactly what `keras.layers.Conv3D` computes with the same weights.

    Args:
        adapters: dict `{name: {"rank": r, "alpha": a}}` of adapters to create on build
            (used when a saved model is loaded; add new ones with `add_adapter`).
        **kwargs: any `keras.layers.Conv3D` argument.

    Example:
    >>> conv = AdaptableConv3D(8, 3, padding="same")
    >>> y = conv(keras.ops.zeros((2, 16, 16, 16, 4)))
    >>> conv.add_adapter("prognosis", rank=2)
    >>> sorted(conv.adapters)
    ['prognosis']
    """

    def __init__(self, *args: Any, adapters: Mapping[str, Mapping[str, float]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_adapters(adapters)

    @classmethod
    def from_conv3d(cls, conv: keras.layers.Conv3D) -> "AdaptableConv3D":
        """A new `AdaptableConv3D` with `conv`'s configuration (weights not copied)."""
        return cls.from_config(conv.get_config())

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        self._build_adapters()

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["adapters"] = {name: dict(spec) for name, spec in self.adapters.items()}
        return config


@keras.saving.register_keras_serializable(package="unicon_tf")
class AdaptableDense(LowRankAdapters, keras.layers.Dense):
    """A `Dense` projection that can carry several named low-rank adapters.

    Applied to the last axis of any-rank input (tokens `(batch, N, C)` or a token grid
    `(batch, d, h, w, C)`). Outside an `adapter_scope` of one of its adapters it computes
    exactly what `keras.layers.Dense` computes with the same weights.

    Args:
        role: what the projection is, for choosing where adapters go: `query`, `key`,
            `value`, `out` (attention) or `mlp`.
        adapters: dict `{name: {"rank": r, "alpha": a}}` of adapters to create on build.
        **kwargs: any `keras.layers.Dense` argument.

    Example:
    >>> query = AdaptableDense(8, role="query")
    >>> y = query(keras.ops.zeros((2, 10, 8)))
    >>> query.add_adapter("segmentation", rank=8)
    >>> tuple(query.adapter_weights("segmentation")[0].shape)
    (8, 8)
    """

    ROLES = ("query", "key", "value", "out", "mlp")

    def __init__(self, *args: Any, role: str = "mlp", adapters: Mapping[str, Mapping[str, float]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if role not in self.ROLES:
            raise ValueError(f"Unknown projection role '{role}': expected one of {list(self.ROLES)}.")
        self.role = role
        self._init_adapters(adapters)

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        self._build_adapters()

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(role=self.role, adapters={name: dict(spec) for name, spec in self.adapters.items()})
        return config


@keras.saving.register_keras_serializable(package="unicon_tf")
class PathGroupNormalization(PathParameters, GroupNormalization):
    """A `GroupNormalization` whose scale and shift can have a copy per named path.

    Outside an `adapter_scope` of one of its paths it computes exactly what
    `keras.layers.GroupNormalization` computes with the same weights (it reads the
    same gamma and beta variables).

    Args:
        path_norms: names of the paths with their own gamma and beta, created on build
            (used when a saved model is loaded; add new ones with `add_path_norm`).
        **kwargs: any `keras.layers.GroupNormalization` argument.

    Example:
    >>> norm = PathGroupNormalization(groups=2)
    >>> x = keras.random.normal((1, 4, 4, 4, 4), seed=0)
    >>> y = norm(x)
    >>> norm.add_path_norm("segmentation")
    >>> _ = norm.path_variables("segmentation")[0].assign(2.0 * keras.ops.ones((4,)))
    >>> with adapter_scope("segmentation"):
    ...     z = norm(x)
    >>> bool(keras.ops.all(norm(x) == y)), bool(keras.ops.all(keras.ops.isclose(z, 2.0 * y)))
    (True, True)
    """

    def __init__(self, *args: Any, path_norms: Iterable[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.scale or not self.center:
            raise ValueError("PathGroupNormalization needs scale=True and center=True (it copies gamma and beta).")
        self._pending_paths = list(path_norms or [])
        self._path_norms = {}

    def build(self, input_shape: tuple) -> None:
        super().build(input_shape)
        pending, self._pending_paths = self._pending_paths, []
        for name in pending:
            self.add_path_norm(name)

    # Keras' build assigns self.gamma / self.beta; the properties pick the active path's copy.
    @property
    def gamma(self) -> keras.Variable:
        own = self._path_norms.get(active_adapter())
        return own[0] if own else self._gamma

    @gamma.setter
    def gamma(self, value: keras.Variable) -> None:
        self._gamma = value

    @property
    def beta(self) -> keras.Variable:
        own = self._path_norms.get(active_adapter())
        return own[1] if own else self._beta

    @beta.setter
    def beta(self, value: keras.Variable) -> None:
        self._beta = value

    def add_path_norm(self, name: str) -> None:
        """Give path `name` its own gamma and beta, copies of the shared ones (outputs unchanged).

        Raises:
            ValueError: the layer is not built, or already has a copy for `name`.
        """
        if not self.built:
            raise ValueError(f"Layer '{self.name}' must be built before adding per-path norms.")
        if name in self._path_norms:
            raise ValueError(f"Layer '{self.name}' already has a per-path norm named '{name}'.")
        self._tracker.unlock()
        try:
            copies = tuple(
                self.add_weight(name=f"{name}_{kind}", shape=tuple(shared.shape), initializer="zeros", dtype=shared.dtype)
                for kind, shared in (("gamma", self._gamma), ("beta", self._beta)))
        finally:
            self._tracker.lock()
        copies[0].assign(self._gamma)
        copies[1].assign(self._beta)
        self._path_norms[name] = copies

    @property
    def paths(self) -> list[str]:
        return list(self._path_norms) + list(self._pending_paths)

    def path_variables(self, name: str) -> list[keras.Variable]:
        return list(self._path_norms[name])

    def base_variables(self) -> list[keras.Variable]:
        return [self._gamma, self._beta]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["path_norms"] = self.paths
        return config
