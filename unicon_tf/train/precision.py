"""Mixed precision for a stage (the stage key `precision`), with Keras dtype policies.

| `precision`       | layers compute in | variables | loss scaling                         |
|-------------------|-------------------|-----------|--------------------------------------|
| `float32`         | float32           | float32   | none                                 |
| `mixed_float16`   | float16           | float32   | `keras.optimizers.LossScaleOptimizer`|
| `mixed_bfloat16`  | bfloat16          | float32   | none (bfloat16 has float32's range)  |

Every layer of the network (stems, fusions, the encoder and its LoRA adapters, the heads'
inner layers) follows the policy, except each head's output layer (`Head.output_layer`),
which stays float32, so the outputs (logits, risks), every loss and every metric are
float32. The policy is how a stage trains: the saved `model.keras` is set back to float32
(its variables are float32 under every policy), so a later stage, the Evaluator and the
SavedModel export see a float32 model with float32 signatures.

Source: Keras' mixed precision guide (keras.io/api/mixed_precision) and Micikevicius et
al. 2018, "Mixed Precision Training".
"""

import keras

from unicon_tf.model import model_parts
from unicon_tf.names import PRECISIONS, check_precision  # noqa: F401 (re-exported)


def set_precision(network, precision):
    """Put every layer of `network` under the dtype policy `precision`, heads' output layers
    in float32 (`float32` puts every layer back).

    Args:
        network: a unicon model (built; its variables keep their float32 values).
        precision: one of `PRECISIONS`.

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
    check_precision(precision)
    keep = {id(head.output_layer) for head in model_parts(network)["heads"].values()}
    for layer in network._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        layer.dtype_policy = "float32" if id(layer) in keep else precision
    return network


def optimizer_for(precision, optimizer):
    """`optimizer`, wrapped in a dynamic `LossScaleOptimizer` for `mixed_float16` (it skips
    the steps whose scaled gradients overflow while it finds the scale)."""
    check_precision(precision)
    if precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
