"""Issue 23: kinds of real-world fault, each closed by its right behaviour."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import unicon_tf
from conftest import UNICON_ORDER, write_pipeline
from unicon_tf import train
from unicon_tf.train.continual import ContinualModel
from unicon_tf.train.distribute import replica_batches
from unicon_tf.train.precision import optimizer_for, set_precision

# --- 1. every precision trains every task, on one device and under a strategy ------------

TASK_TARGETS = {
    "classification": lambda rng: np.array([0, 1, 1, 0], "int32"),
    "prognosis": lambda rng: np.array([[1.0, 1], [2.0, 0], [3.0, 1], [4.0, 1]], "float32"),
    "segmentation": lambda rng: (rng.uniform(size=(4, 8, 8, 8)) > 0.7).astype("int32"),
}


def _one_step(task, precision, strategy):
    """`(weights before, weights after, optimizer)` of one training step of a fresh 8^3 model."""
    rng = np.random.default_rng(0)
    x = {"ct": rng.normal(size=(4, 8, 8, 8, 1)).astype("float32")}
    y = {task: TASK_TARGETS[task](rng)}
    with strategy.scope() if strategy else tf.device("/cpu:0"):
        keras.utils.set_random_seed(0)
        network = unicon_tf.foundation((8, 8, 8), task=task, width=4, depth=2)
        set_precision(network, precision)
        trainer = ContinualModel(network, {task: task})
        trainer.compile(optimizer=optimizer_for(precision, keras.optimizers.SGD(0.1)))
        before = [np.asarray(v) for v in network.trainable_weights]
        make = lambda: tf.data.Dataset.from_tensors((x, y))  # noqa: E731
        data = replica_batches(strategy, make) if strategy else make()
        history = trainer.fit(data, epochs=1, verbose=0, shuffle=False, steps_per_epoch=1 if strategy else None)
    after = [np.asarray(v) for v in network.trainable_weights]
    return before, after, trainer.optimizer, history.history["loss"][-1]


@pytest.mark.parametrize("distributed", [False, True], ids=["one-device", "mirrored"])
@pytest.mark.parametrize("precision", ["float32", "mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("task", sorted(TASK_TARGETS))
def test_every_precision_trains_every_task(task, precision, distributed):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"]) if distributed else None
    before, after, optimizer, loss = _one_step(task, precision, strategy)
    assert np.isfinite(loss) and loss > 0
    assert all(np.all(np.isfinite(w)) for w in after)
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(after, before)]
    assert max(moved) > 0, "no gradient reached the weights"
    # the head's output layer: its gradient is never zero for a loss > 0
    assert moved[-1] > 0 or moved[-2] > 0
    if precision == "mixed_float16":
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert float(np.asarray(optimizer.dynamic_scale)) == 2.0 ** 15  # finite gradients: the scale is kept
        assert int(np.asarray(optimizer.inner_optimizer.iterations)) == 1  # and the step applied
    else:
        assert int(np.asarray(optimizer.iterations)) == 1


def test_loss_scale_skips_an_overflowing_step_and_halves():
    # mixed_float16's dynamic loss scale: a step whose scaled gradients overflow is skipped
    # (weights unchanged) and the scale halves; the next finite step applies.
    rng = np.random.default_rng(0)
    x = {"ct": rng.normal(size=(4, 8, 8, 8, 1)).astype("float32")}
    y = {"prognosis": TASK_TARGETS["prognosis"](rng)}
    network = set_precision(unicon_tf.foundation((8, 8, 8), task="prognosis", width=4, depth=2), "mixed_float16")
    trainer = ContinualModel(network, {"prognosis": "prognosis"})
    trainer.compile(optimizer=optimizer_for("mixed_float16", keras.optimizers.SGD(0.1)), run_eagerly=True)
    trainer.optimizer.build(trainer.trainable_variables)
    trainer.optimizer.dynamic_scale.assign(3e38)  # scaled loss and gradients: inf
    before = [np.asarray(v) for v in network.trainable_weights]
    trainer.train_on_batch(x, y)
    assert float(np.asarray(trainer.optimizer.dynamic_scale)) == pytest.approx(1.5e38)
    assert int(np.asarray(trainer.optimizer.inner_optimizer.iterations)) == 0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, network.trainable_weights))
    trainer.optimizer.dynamic_scale.assign(2.0 ** 15)
    trainer.train_on_batch(x, y)
    assert int(np.asarray(trainer.optimizer.inner_optimizer.iterations)) == 1
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, network.trainable_weights))


def test_mixed_float16_stages_train_on_one_device(phantom_records, tmp_path):
    # The advertised option end to end: stage 0 (everything trains), then a finetune stage
    # with LwF (a float16 teacher).
    stages = [UNICON_ORDER[0], {"name": "prognosis", "task": "prognosis", "strategy": "finetune", "alpha": 0.5}]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages, depth=2, epochs=1, precision="mixed_float16")
    for stage in stages:
        record = train.train_stage(pipeline, stage["name"], tmp_path / "run", verbose=0)
        assert record["spec"]["training"]["precision"] == "mixed_float16"
        assert all(np.isfinite(v) for v in record["history"][-1].values())
    assert record["plugins"]
    model = keras.models.load_model(tmp_path / "run" / "stages" / "01-prognosis" / "model.keras")
    assert all(w.dtype == "float32" for w in model.weights)
