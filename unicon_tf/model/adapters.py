"""Low-rank adapters (LoRA) on Conv3D and Dense kernels, selected per call path.

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
"""

import contextlib
import contextvars

import keras
from keras import ops

_ACTIVE_ADAPTER = contextvars.ContextVar("unicon_tf_active_adapter", default=None)


@contextlib.contextmanager
def adapter_scope(name):
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


def active_adapter():
    """The adapter name active in the current `adapter_scope`, or None."""
    return _ACTIVE_ADAPTER.get()


class LowRankAdapters:
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

    def add_adapter(self, name, rank, alpha=None):
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

    def adapter_weights(self, name):
        """The (A, B) variables of adapter `name`."""
        return self._adapter_weights[name]

    @property
    def kernel(self):
        kernel = self._kernel
        name = active_adapter()
        if name in self._adapter_weights:
            down, up = self._adapter_weights[name]
            scale = self.adapters[name]["alpha"] / self.adapters[name]["rank"]
            kernel = ops.cast(kernel + scale * ops.matmul(down, up), self.compute_dtype)
        return kernel

    # The Keras layers' own (de)serialisation of variables covers only kernel and bias.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
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

    def __init__(self, *args, adapters=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_adapters(adapters)

    @classmethod
    def from_conv3d(cls, conv):
        """A new `AdaptableConv3D` with `conv`'s configuration (weights not copied)."""
        return cls.from_config(conv.get_config())

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def get_config(self):
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

    def __init__(self, *args, role="mlp", adapters=None, **kwargs):
        super().__init__(*args, **kwargs)
        if role not in self.ROLES:
            raise ValueError(f"Unknown projection role '{role}': expected one of {list(self.ROLES)}.")
        self.role = role
        self._init_adapters(adapters)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def get_config(self):
        config = super().get_config()
        config.update(role=self.role, adapters={name: dict(spec) for name, spec in self.adapters.items()})
        return config
