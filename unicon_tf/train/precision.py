"""Mixed precision for a stage (the stage key `precision`), with Keras dtype policies.

| `precision`       | layers compute in | variables | loss scaling                         |
|-------------------|-------------------|-----------|--------------------------------------|
| `float32`         | float32           | float32   | none                                 |
| `mixed_float16`   | float16           | float32   | `keras.optimizers.LossScaleOptimizer`|
| `mixed_bfloat16`  | bfloat16          | float32   | none (bfloat16 has float32's range)  |
| `auto`            | `auto_precision()`: mixed_bfloat16 where the hardware has bfloat16 |

`auto` picks, on the machine that trains: a GPU of compute capability >= 8.0 (Ampere and
later: bfloat16 tensor cores) or, without a GPU, a CPU with bfloat16 instructions
(AVX512_BF16 or AMX-BF16; oneDNN then runs convolutions and matmuls in bfloat16):
`mixed_bfloat16`; a GPU of compute capability 7.x: `mixed_float16`; otherwise `float32`
(bfloat16 without hardware support is emulated and slower than float32).

Every layer of the network (stems, fusions, the encoder and its LoRA adapters, the heads'
inner layers) follows the policy, except each head's output layer (`Head.output_layer`),
which stays float32, so the outputs (logits, risks), every loss and every metric are
float32. The policy is how a stage trains: the saved `model.keras` is set back to float32
(its variables are float32 under every policy), so a later stage, the Evaluator and the
SavedModel export see a float32 model with float32 signatures.

Source: Keras' mixed precision guide (keras.io/api/mixed_precision) and Micikevicius et
al. 2018, "Mixed Precision Training".
"""

import functools
import pathlib

import keras

from unicon_tf.model import model_parts
from unicon_tf.names import PRECISIONS, check_precision  # noqa: F401 (re-exported)


@functools.cache
def auto_precision() -> str:
    """The precision `auto` stands for on this machine (see the module's table).

    Returns:
        `mixed_bfloat16`, `mixed_float16` or `float32`.

    Example:
    >>> auto_precision() in PRECISIONS
    True
    """
    import tensorflow as tf

    capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
                    for gpu in tf.config.list_physical_devices("GPU")]
    if capabilities:
        best = max(capabilities)
        return "mixed_bfloat16" if best >= (8, 0) else "mixed_float16" if best >= (7, 0) else "float32"
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return "mixed_bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def resolve_precision(precision: str) -> str:
    """`precision`, with `auto` replaced by `auto_precision()`.

    Raises:
        ValueError: `precision` is not one of `PRECISIONS`.
    """
    check_precision(precision)
    return auto_precision() if precision == "auto" else precision


def set_precision(network: keras.Model, precision: str) -> keras.Model:
    """Put every layer of `network` under the dtype policy `precision`, heads' output layers
    in float32 (`float32` puts every layer back).

    Args:
        network: a unicon model (built; its variables keep their float32 values).
        precision: one of `PRECISIONS` (`auto`: `auto_precision()`).

    Returns:
        `network`.

    Example:
    >>> from unicon_tf.model import foundation
    >>> net = set_precision(foundation((8, 8, 8), width=4, depth=2), "mixed_bfloat16")
    >>> net.layers[-1].compute_dtype, net.layers[-1].output_layer.compute_dtype
    ('bfloat16', 'float32')
    >>> set_precision(net, "float32").layers[-1].compute_dtype
    'float32'
    """
    precision = resolve_precision(precision)
    keep = {id(head.output_layer) for head in model_parts(network)["heads"].values()}
    for layer in network._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        layer.dtype_policy = "float32" if id(layer) in keep else precision
    return network


def optimizer_for(precision: str, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """`optimizer`, wrapped in a dynamic `LossScaleOptimizer` for `mixed_float16` (it skips
    the steps whose scaled gradients overflow while it finds the scale)."""
    if resolve_precision(precision) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
