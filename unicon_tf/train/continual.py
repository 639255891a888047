"""`ContinualModel`: a stage's training loop over a unicon network (TensorFlow backend).

    loss = sum over this stage's heads of task_loss(head)
         + sum over active plugins of plugin.penalty   (alpha x distillation, beta x L2-SP / EWC)

The network is the functional model that gets saved; the wrapper only adds the training
step, and its plugins keep the teacher out of Keras' variable tracking, so the teacher is
never part of the network's weights.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from unicon_tf.model import model_parts
from unicon_tf.model.paths import HeadPath, head_path
from unicon_tf.train.distribute import gather_valid, replica_logs, split_replica_inputs
from unicon_tf.tasks import task_kind

if TYPE_CHECKING:
    from unicon_tf.train.plugins import Plugin


class OptimizerBuiltFirst:
    """Mixin for a `keras.Model` with its own `train_step`: Keras' train function, with the
    optimizer's variables built first (in the strategy's scope, on one device too).

    Variables created while a `tf.function` is first traced make TensorFlow trace it a
    second time, and Keras builds the optimizer lazily inside the first step on one device:
    built here, the train step is traced once (tracing is most of a small stage's start;
    `benchmarks/stage_startup.py`: 0.51x the time of a first fit).
    """

    def make_train_function(self, force: bool = False) -> Callable[..., Any]:
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        return super().make_train_function(force)


class ContinualModel(OptimizerBuiltFirst, keras.Model):
    """Trains the heads of one stage; logs every head's loss, plugin terms and task metrics.

    Args:
        network: the unicon model (inputs dict -> outputs dict).
        heads: `{head name: task}` trained this stage; targets come as `y[head]`, optional
            per-patient sample weights (Keras' third element of a batch) as one `(B,)`
            array or `{head: (B,)}`; they weight the task losses (not the plugin terms or
            the reported metrics).
        loss_options: `{head: options}` of the task kinds' `loss_options` (e.g.
            `{"segmentation": {"dice": "per_patient"}}`); heads not named use the defaults.
        plugins: `Plugin`s adding loss terms. An inactive one (e.g. a `Distillation` with
            alpha = 0) is only evaluated in `test_step`, to report (here: how far old
            heads moved from the teacher).
        **kwargs: `keras.Model` arguments.

    Example:
    >>> import numpy as np
    >>> from unicon_tf.model import foundation
    >>> network = foundation((8, 8, 8), task="prognosis", width=4, depth=2)
    >>> x = {"ct": np.random.default_rng(0).normal(size=(4, 8, 8, 8, 1)).astype("float32")}
    >>> y = {"prognosis": np.array([[1.0, 1], [2.0, 0], [3.0, 1], [4.0, 1]], "float32")}
    >>> trainer = ContinualModel(network, {"prognosis": "prognosis"})
    >>> trainer.compile(optimizer=keras.optimizers.AdamW(3e-4))
    >>> history = trainer.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, shuffle=False)
    >>> sorted(history.history)
    ['loss', 'prognosis_c_index', 'prognosis_loss']
    """

    def __init__(self, network: keras.Model, heads: Mapping[str, str], plugins: Iterable["Plugin"] = (),
                 loss_options: Mapping[str, Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network
        self.heads = dict(heads)
        self.task_losses = {h: task_kind(t).loss((loss_options or {}).get(h)) for h, t in self.heads.items()}
        self.plugins = list(plugins)
        classes = _num_classes(network, self.heads)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        names = [f"{h}_loss" for h in self.heads] + [p.name for p in self.plugins]
        names += [f"{h}_{p.name}" for p in self.plugins for h in p.heads]
        self.term_trackers = {name: keras.metrics.Mean(name=name) for name in names}
        self.head_metrics = {h: task_kind(t).metrics(h, classes.get(h, 2)) for h, t in self.heads.items()}

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return [self.loss_tracker, *self.term_trackers.values(), *(m for ms in self.head_metrics.values() for m in ms)]

    def call(self, inputs: Mapping[str, tf.Tensor], training: bool = False) -> dict[str, tf.Tensor]:
        return self.network(inputs, training=training)

    def _task_terms(self, targets, outputs, sample_weight):
        """`{head_loss: value}`; `sample_weight` is None, one `(B,)` array or `{head: (B,)}`."""
        def weight(head):
            return sample_weight.get(head) if isinstance(sample_weight, dict) else sample_weight

        return {f"{h}_loss": self.task_losses[h](targets[h], outputs[h], sample_weight=weight(h)) for h in self.heads}

    def _loss(self, inputs, targets, sample_weight, outputs, training):
        """`(loss, {term name: value})`: each head's task loss plus each plugin's weighted
        penalty (in training only the active plugins'), and, for logging only, each plugin's
        unweighted per-head terms (`<head>_<plugin>`, e.g. `classification_distillation`)."""
        terms = self._task_terms(targets, outputs, sample_weight)
        penalties = {}
        for plugin in self.plugins:
            if training and not plugin.active:
                continue
            per_head = plugin.head_terms(inputs, outputs)
            terms.update({f"{h}_{plugin.name}": value for h, value in per_head.items()})
            penalties[plugin.name] = plugin.penalty(inputs, outputs, per_head)
        loss = tf.add_n([terms[f"{h}_loss"] for h in self.heads] + list(penalties.values()))
        return loss, {**terms, **penalties}

    def train_step(self, data: tuple) -> dict[str, tf.Tensor]:
        inputs, targets, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs, valid = split_replica_inputs(inputs)
        if valid is not None:
            return self._replica_train_step(inputs, valid, targets, sample_weight)
        with tf.GradientTape() as tape:
            outputs = self(inputs, training=True)
            loss, terms = self._loss(inputs, targets, sample_weight, outputs, training=True)
            # Scaled inside the tape (mixed_float16's LossScaleOptimizer): a loss scaled
            # outside it has no gradient.
            scaled = self.optimizer.scale_loss(loss)
        self._apply_gradients(tape, scaled)
        return self._record(loss, terms, targets, outputs)

    def _apply_gradients(self, tape, scaled):
        """The optimizer's step on the gradients of `scaled` (the loss, scaled for mixed
        precision, taken in `tape`); a loss scale optimizer unscales them and skips a step
        whose gradients overflowed."""
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)

    def _replica_train_step(self, inputs, valid, targets, sample_weight):
        """One replica's step under a `tf.distribute` strategy (see `unicon_tf.train.distribute`).

        Each replica computes the global batch's loss from the gathered outputs and targets
        (so the Cox risk sets span the global batch) and takes its gradient divided by the
        replicas in sync: the optimizer sums the replicas' gradients.
        """
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            local = self(inputs, training=True)
            inputs, targets, sample_weight, outputs = self._gather(inputs, valid, targets, sample_weight, local)
            loss, terms = self._loss(inputs, targets, sample_weight, outputs, training=True)
            scaled = self.optimizer.scale_loss(loss / replicas)
        self._apply_gradients(tape, scaled)
        return replica_logs(self._record(loss, terms, targets, outputs))

    def _gather(self, inputs, valid, targets, sample_weight, outputs):
        """The global batch's inputs (only when a plugin reads them, else the local ones),
        targets, sample weights and outputs, on every replica."""
        reads_inputs = any(p.heads for p in self.plugins)
        gathered = gather_valid((inputs if reads_inputs else None, targets, sample_weight, outputs), valid)
        return (gathered[0] if reads_inputs else inputs,) + tuple(gathered[1:])

    def test_step(self, data: tuple) -> dict[str, tf.Tensor]:
        inputs, targets, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        inputs, valid = split_replica_inputs(inputs)
        outputs = self(inputs, training=False)
        if valid is not None:
            inputs, targets, sample_weight, outputs = self._gather(inputs, valid, targets, sample_weight, outputs)
        loss, terms = self._loss(inputs, targets, sample_weight, outputs, training=False)
        logs = self._record(loss, terms, targets, outputs)
        return logs if valid is None else replica_logs(logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing: under a strategy, Keras' fit builds the model by drawing a first batch from
        a new iterator, which reshuffles the data relative to one device. The network is built
        already; the optimizer is built by `make_train_function` (`OptimizerBuiltFirst`)."""

    def _record(self, loss, terms, targets, outputs):
        self.loss_tracker.update_state(loss)
        for name, value in terms.items():
            if name in self.term_trackers:
                self.term_trackers[name].update_state(value)
        for head, metrics in self.head_metrics.items():
            for metric in metrics:
                metric.update_state(targets[head], outputs[head])
        return {m.name: m.result() for m in self.metrics}


class CachedHeadModel(ContinualModel):
    """Trains one head's path on its cached frozen prefix (the `frozen` strategy's fast path).

    Args:
        network: the unicon model the head belongs to.
        head: the head's name.
        task: the head's task.
        path: the head's `HeadPath` (its frozen prefix's frontier and trainable rest);
            default: `head_path(network, head)` with the weights' current trainability.
        **kwargs: `ContinualModel`'s `loss_options` and `keras.Model`'s arguments.

    The inputs are the frontier's values in `path.frontier` order (what `path.extractor()`
    computes), the targets `{head: y}`.
    """

    def __init__(self, network: keras.Model, head: str, task: str, path: HeadPath | None = None,
                 **kwargs: Any) -> None:
        super().__init__(network, {head: task}, **kwargs)
        self.head_path = path or head_path(network, head)

    def call(self, features: Sequence[tf.Tensor], training: bool = False) -> dict[str, tf.Tensor]:
        return {self.head_path.head.name: self.head_path(list(features), training=training)}


def _num_classes(network, heads):
    parts = model_parts(network)["heads"]
    return {h: getattr(parts[h], "num_classes", 2) for h in heads}
