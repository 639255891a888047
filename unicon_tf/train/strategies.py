"""Which variables a stage trains, and which plugins guard the rest.

| strategy   | trains                                        | guarded by                        |
|------------|-----------------------------------------------|-----------------------------------|
| `frozen`   | the stage's new head, stem and fusion         | nothing needed: old outputs are   |
|            |                                               | bit-identical                     |
| `adapters` | as `frozen`, plus the new head's own encoder  | nothing needed (bit-identical)    |
|            | parameters: low-rank adapters, GroupNorm      |                                   |
|            | copies (`path_norm`)                          |                                   |
| `finetune` | as `frozen`, plus the shared encoder          | distillation (alpha) and L2-SP or |
|            |                                               | EWC (beta)                        |
| `naive`    | as `finetune`                                 | nothing: the forgetting baseline  |

Old heads, stems and fusions never train after their stage. Stage 0 trains everything, but
a pretrained encoder (a preset, or `weights:`) trains only under `finetune` and `naive`: at
stage 0 `frozen` and `adapters` train the stem, fusion and head on its published weights.
"""

import keras

from unicon_tf.model import model_parts
from unicon_tf.model.adapters import PathParameters
from unicon_tf.names import STRATEGIES, check_strategy  # noqa: F401 (re-exported)


def set_trainable(layer: keras.layers.Layer, value: bool) -> None:
    """Set `trainable` on a layer and on every layer nested in it, each explicitly.

    `layer.trainable = value` is not enough under the TensorFlow backend: the assignment
    is skipped when the attribute already equals `value`, which leaves the children of a
    loaded (or partly frozen) layer as they were.
    """
    for sub in layer._flatten_layers(include_self=True):
        keras.layers.Layer.trainable.fset(sub, bool(value))


def configure_trainable(network: keras.Model, stage: int, strategy: str, pretrained: bool = False) -> list[str]:
    """Set which variables of `network` train in `stage` under `strategy`.

    Args:
        network: the unicon model (already expanded for this stage).
        stage: the stage number; parts whose `stage` equals it are new.
        strategy: one of `STRATEGIES`.
        pretrained: the encoder holds published weights (a preset, or `weights:`): it
            trains only under `finetune` and `naive`, at stage 0 too (under `frozen` and
            `adapters` only the first head, stems and fusion train: a single-task baseline
            of an `adapters` stage keeps the published encoder, as its continual stage
            does, instead of fine-tuning 100 M weights with BatchNorm in inference mode at
            the head's learning rate, which diverged); without it stage 0 trains the
            encoder from its initialisation.

    Returns:
        The names of the new heads.
    """
    check_strategy(strategy)
    parts = model_parts(network)
    set_trainable(network, True)  # reset every flag before choosing
    new_heads = [name for name, head in parts["heads"].items() if head.stage == stage]
    if not new_heads:
        raise ValueError(f"Stage {stage} added no head to model '{network.name}'.")
    new_adapters = {parts["heads"][h].adapter for h in new_heads} - {None}
    if strategy == "adapters" and not new_adapters and stage > 0:
        raise ValueError("Strategy 'adapters' needs the stage's head to have its own encoder parameters "
                         "(e.g. adapters: 8, or path_norm: true).")
    for group in ("stems", "fusions", "heads"):
        for part in parts[group].values():
            set_trainable(part, part.stage == stage)
    train_encoder = (stage == 0 and not pretrained) or strategy in ("finetune", "naive")
    encoder = parts["encoder"]
    for layer in encoder.leaf_layers():
        set_trainable(layer, train_encoder)
        if isinstance(layer, PathParameters):
            set_trainable(layer, True)  # the shared variables and each path's are set one by one
            for variable in layer.base_variables():
                variable.trainable = train_encoder
            for name in layer.paths:
                for variable in layer.path_variables(name):
                    variable.trainable = name in new_adapters
    return new_heads


def shared_trainable_variables(network: keras.Model) -> list[keras.Variable]:
    """The encoder's base variables that train now (what L2-SP / EWC hold)."""
    encoder = model_parts(network)["encoder"]
    return [v for v in encoder.base_weights() if v.trainable]
