"""A stage's first training step: the optimizer built before the train function is traced
(`ContinualModel.make_train_function`, the default) against Keras' own one-device behaviour,
which builds it lazily inside the first step.

TensorFlow traces a `tf.function` twice when variables are created during its first trace
(once to lift their initialisers, once more for the function itself); Keras, on one device,
creates the optimizer's slot variables there. On the small models of the suite and of a
phantom study, tracing the train step is most of a stage's start, so each model pays it
once instead of twice. Measured in turns A B A B (`common.interleaved_seconds`): building
a CT model with a prognosis head, expanding it with a segmentation head on adapters,
compiling and fitting one epoch of two steps; printed as the ratio of the medians and the
number of times the train step was traced.

    python benchmarks/stage_startup.py [--repeats 3] [--size 16]
"""

import keras
import numpy as np
import tensorflow as tf
from common import integer_options, interleaved_seconds

import unicon_tf
from unicon_tf.train.continual import ContinualModel
from unicon_tf.train.strategies import configure_trainable


class LazyOptimizer(ContinualModel):
    """Keras' one-device default: the optimizer is built inside the first traced step."""

    def make_train_function(self, force=False):
        return keras.Model.make_train_function(self, force)


def fit_once(trainer_class, size, traces):
    keras.utils.set_random_seed(0)
    model = unicon_tf.expand(unicon_tf.foundation((size,) * 3, width=8, depth=3), task="prognosis")
    model = unicon_tf.expand(model, task="segmentation", adapters=2)
    configure_trainable(model, unicon_tf.describe(model)["heads"]["segmentation"]["stage"], "adapters")

    class Counted(trainer_class):
        def train_step(self, data):
            traces[trainer_class.__name__] = traces.get(trainer_class.__name__, 0) + 1
            return super().train_step(data)

    trainer = Counted(model, {"segmentation": "segmentation"})
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-3))
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, size, size, size, 1)).astype("float32")
    mask = (np.abs(volume[..., 0]) > 1.0).astype("int32")
    data = tf.data.Dataset.from_tensors(({"ct": volume}, {"segmentation": mask})).repeat(2)
    trainer.fit(data, epochs=1, verbose=0)


def main():
    options = integer_options(__doc__, repeats=3, size=16)
    tf.get_logger().setLevel("ERROR")  # every fit builds a new model: TensorFlow's retracing notice is expected
    traces = {}
    seconds = interleaved_seconds({name: (lambda c=cls: fit_once(c, options.size, traces))
                                   for name, cls in (("built first", ContinualModel),
                                                     ("keras lazy", LazyOptimizer))}, options.repeats)
    calls = options.repeats + 1
    print(f"model {options.size}^3, {calls} fits each (one warm-up), median seconds per fit:")
    for name, value in seconds.items():
        print(f"  {name:<12} {value:6.2f} s")
    print(f"train step traced per fit: built first {traces['ContinualModel'] / calls:g}, "
          f"keras lazy {traces['LazyOptimizer'] / calls:g}")
    print(f"ratio built first / keras lazy: {seconds['built first'] / seconds['keras lazy']:.2f}")


if __name__ == "__main__":
    main()
