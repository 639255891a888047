"""A head's path through the unicon graph, split where training starts: the frozen prefix
(computed once per patient and cached) and the trainable rest (run at every step).

A layer call is frozen when none of the weights it computes with trains this stage (the
encoder: its base weights plus the calling path's adapters and norm copies; any other
layer: its trainable weights) and every tensor it reads is frozen; the model's inputs are
frozen. The *frontier* is the set of tensors the trainable rest (or the head) reads that are
model inputs or frozen outputs of the encoder (or computed from them); a frozen layer call
outside the encoder (an identity stem, an old stem) is cheap and re-runs with the trainable
rest instead of being cached. Two cases that the cached training of `unicon_tf.train.caching` covers with this one
split:

- a new head on a frozen encoder: the frontier is the head's own inputs (the encoder's
  feature maps, plus the volumes a side encoder reads); the trainable rest is the head;
- a new modality on a path that starts at encoder level s > 0 (`expand(...,
  adapter_start=s)`): the frontier is the first modality's base feature maps of levels < s
  and the new modality's volume; the trainable rest is the new stem, the fusion, the
  encoder's levels >= s (with the path's adapters, if any) and the head. Backpropagation
  then never enters the frozen levels < s: on a 117 M I3ResNet-152 with s = 4 a step costs
  layer4 and the head instead of the whole backbone, forward and backward.

Example:
>>> from unicon_tf.model import expand, foundation
>>> from unicon_tf.train.strategies import set_trainable
>>> model = foundation((16, 16, 16), width=4, depth=3, task="segmentation", num_classes=2)
>>> model = expand(model, modality="pet", task="segmentation", num_classes=2, adapter_start=2)
>>> set_trainable(model, False)
>>> for layer in model.layers:
...     if layer.name in ("stem_pet", "fusion_ct_pet_level2", "segmentation_ctpet"):
...         set_trainable(layer, True)
>>> path = head_path(model, "segmentation_ctpet")
>>> [tuple(t.shape[1:]) for t in path.frontier]  # the PET volume, CT levels 0 and 1
[(16, 16, 16, 1), (16, 16, 16, 4), (8, 8, 8, 8)]
>>> path.runs_encoder, [node.operation.name for node in path.nodes]
(True, ['stem_pet', 'fusion_ct_pet_level2', 'encoder', 'segmentation_ctpet'])
"""

import dataclasses
from collections.abc import Sequence

import keras

from unicon_tf.model.encoder import SharedEncoder
from unicon_tf.model.parts import model_parts


@dataclasses.dataclass(frozen=True)
class HeadPath:
    """A head's path split at its frozen prefix (see the module docstring).

    Attributes:
        network: the unicon model the path belongs to.
        head: the head layer.
        frontier: the frozen tensors the trainable rest reads (`KerasTensor`s of `network`,
            each `(None, ...)`), in a fixed order: the order of `extractor()`'s outputs and
            of `__call__`'s values.
        nodes: the trainable rest's layer calls (Keras `Node`s), inputs first, the head's last.
        runs_encoder: whether the frozen prefix calls the shared encoder (what makes caching
            the frontier worth its memory).
    """

    network: keras.Model
    head: keras.layers.Layer
    frontier: tuple
    nodes: tuple
    runs_encoder: bool

    @property
    def reads_volumes(self) -> bool:
        """Whether a model input (a raw volume) is on the frontier: a trainable layer reads it."""
        return any(_node(t).is_input for t in self.frontier)

    def extractor(self) -> keras.Model:
        """The frozen prefix as a model: `{modality: (B, D, H, W, 1)}` -> the frontier's tensors."""
        inputs = {m: self.network.input[m] for m in self.head.modalities}
        return keras.Model(inputs, list(self.frontier), name=f"{self.head.name}_frozen_prefix")

    def __call__(self, values: "Sequence[tf.Tensor] | tf.Tensor", training: bool = False) -> "tf.Tensor":
        """The head's output from the frontier's `values` (same order as `frontier`; a tensor
        when the frontier has one): the trainable rest's layer calls run in graph order, the
        head on its used features."""
        values = values if isinstance(values, (list, tuple)) else [values]  # Keras unwraps a one-output extractor
        computed = {id(tensor): value for tensor, value in zip(self.frontier, values, strict=True)}
        for node in self.nodes:
            if node.operation is self.head:
                args, kwargs = ([computed[id(t)] for t in self.head.used_features(list(node.arguments.args[0]))],), {}
            else:
                args, kwargs = node.arguments.fill_in(computed)
            if getattr(node.operation, "_call_has_training_arg", False):
                kwargs = {**kwargs, "training": training}
            outputs = node.operation(*args, **kwargs)
            computed.update({id(t): v for t, v in zip(node.outputs, keras.tree.flatten(outputs), strict=True)})
        return outputs


def head_path(network: keras.Model, head: str) -> HeadPath:
    """Split head `head`'s path at its frozen prefix, with the weights' current trainability.

    Args:
        network: a unicon model (`foundation`/`expand`), its stage's trainability set
            (`unicon_tf.train.strategies`).
        head: the head's name.

    Returns:
        The `HeadPath`: frontier, trainable layer calls and whether the prefix runs the encoder.

    Raises:
        KeyError: `network` has no head `head`.
    """
    parts = model_parts(network)
    head_layer = parts["heads"][head]
    encoder = parts["encoder"]
    frozen = {}

    def is_frozen(node):
        key = id(node)
        if key not in frozen:
            frozen[key] = node.is_input or (
                not any(w.trainable for w in _call_weights(node, encoder))
                and all(is_frozen(_node(t)) for t in node.arguments.keras_tensors))
        return frozen[key]

    (head_node,) = [n for n in head_layer._inbound_nodes if any(id(t) in _ids(network.outputs) for t in n.outputs)]
    frontier, trainable = {}, {id(head_node): head_node}
    pending = list(head_layer.used_features(list(head_node.arguments.args[0])))
    while pending:
        tensor = pending.pop()
        node = _node(tensor)
        if node.is_input or (is_frozen(node) and _calls(tensor, encoder)):
            frontier.setdefault(id(tensor), tensor)
        elif id(node) not in trainable:
            trainable[id(node)] = node
            pending.extend(node.arguments.keras_tensors)
    depth = {id(node): d for d, nodes in network._nodes_by_depth.items() for node in nodes}
    nodes = sorted(trainable.values(), key=lambda n: -depth[id(n)])
    order = {id(t): i for i, t in enumerate(_graph_tensors(network))}
    frontier = sorted(frontier.values(), key=lambda t: order[id(t)])
    runs_encoder = any(_calls(t, encoder) for t in frontier)
    return HeadPath(network, head_layer, tuple(frontier), tuple(nodes), runs_encoder)


def _node(tensor):
    operation, node_index, _ = tensor._keras_history
    return operation._inbound_nodes[node_index]


def _ids(tensors):
    return {id(t) for t in tensors}


def _call_weights(node, encoder):
    """The weights a layer call computes with (the encoder's: base plus the path's own)."""
    layer = node.operation
    if isinstance(layer, SharedEncoder) and layer is encoder:
        return layer.path_weights(node.arguments.kwargs.get("adapter"))
    return layer.weights


def _calls(tensor, layer):
    """Whether `tensor` is computed by a call of `layer` or from one."""
    node = _node(tensor)
    if node.is_input:
        return False
    return node.operation is layer or any(_calls(t, layer) for t in node.arguments.keras_tensors)


def _graph_tensors(network):
    """The network's tensors, inputs first (a stable order for the frontier)."""
    tensors = []
    for depth in sorted(network._nodes_by_depth, reverse=True):
        for node in network._nodes_by_depth[depth]:
            tensors.extend(node.outputs)
    return tensors
