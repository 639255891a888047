"""The unicon-tf side of `ratios.py` (a worker process, see `workers.py`).

Variants of one training step of the stage-0 foundation model (classification, Adam,
batch in memory), each a `fit` whose per-step wall times come from a callback:

| variant     | what trains                                                               |
|-------------|---------------------------------------------------------------------------|
| `continual` | `ContinualModel` (the package's stage loop and optimizer), float32       |
| `keras`     | a plain `keras.Model.fit` of the same network and loss (the overhead's reference) |
| `bfloat16`  | `ContinualModel` with the network under `mixed_bfloat16` (`set_precision`)  |

Also: FLOPs of the step (counted from its graph), the Conv3D peak at the network's level
shapes and the machine's float32 matmul throughput, the sliding-window inference of the
segmentation network, and the in-process extras (strategy overhead, growth FLOPs, feed,
caching, serving, expand cost).

    python benchmarks/keras_worker.py --threads N   (started by ratios.py)
"""

import argparse
import contextlib
import time

import keras
import numpy as np
import tensorflow as tf

import unicon_tf
from common import StepTimer, graph_flops, interleaved_seconds
from unicon_tf.train import ContinualModel
from unicon_tf.train.optimizers import FusedAdamW
from unicon_tf.tasks.losses import classification_loss
from unicon_tf.train.precision import set_precision
from workers import peak_rss_mb, serve

VARIANTS = ("continual", "keras", "bfloat16")


def batch_of(size, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = {"ct": rng.uniform(-1, 1, (batch,) + (size,) * 3 + (1,)).astype(np.float32)}
    return x, rng.integers(0, 2, batch).astype(np.int32)


class Trainer:
    """A `fit` of `steps` steps per call on one in-memory batch; the call returns the
    median step time of that fit (its first step, which starts the iterator, left out)."""

    def __init__(self, model, x, y):
        self.model, self.timer = model, StepTimer()
        self.data = tf.data.Dataset.from_tensors((x, {"classification": y})).repeat()

    def __call__(self, steps):
        self.model.fit(self.data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[self.timer])
        return float(np.median(self.timer.times[1:]))


def trainer(variant, size, batch, width, depth, strategy=None):
    """A `Trainer` of `variant` (see the module's table), or a `ContinualModel` under `strategy`."""
    x, y = batch_of(size, batch)
    keras.utils.set_random_seed(0)
    with strategy.scope() if strategy else contextlib.nullcontext():
        network = unicon_tf.foundation((size,) * 3, width=width, depth=depth)
        if variant == "keras":
            model = keras.Model(network.input, network.output)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss={"classification": classification_loss})
        else:
            if variant == "bfloat16":
                set_precision(network, "mixed_bfloat16")
            model = ContinualModel(network, {"classification": "classification"})
            model.compile(optimizer=FusedAdamW(1e-4, weight_decay=0.0))  # the stages' optimizer, as Adam
    return Trainer(model, x, y)


def training_step_flops(network, size, batch):
    """FLOPs of one training step (forward, loss, gradients) counted from its graph."""
    x, y = batch_of(size, batch)

    @tf.function
    def step(inputs, labels):
        with tf.GradientTape() as tape:
            loss = classification_loss(labels, network(inputs, training=True)["classification"])
        return tape.gradient(loss, network.trainable_variables)

    return graph_flops(step.get_concrete_function({"ct": tf.constant(x["ct"])}, tf.constant(y)))


class Side:
    def __init__(self):
        self.trainers = {}

    def prepare(self, size, batch, width, depth, variants=VARIANTS):
        """Build and warm `variants` at `size`; `{"params", "step_flops", "threads"}`."""
        keras.backend.clear_session()
        self.trainers = {v: trainer(v, size, batch, width, depth) for v in variants}
        for run in self.trainers.values():
            run(1)
        network = self.trainers["continual"].model.network
        return {"params": network.count_params(), "step_flops": training_step_flops(network, size, batch),
                "threads": tf.config.threading.get_intra_op_parallelism_threads()}

    def step(self, size, variant, steps):
        return self.trainers[variant](steps)

    def peaks(self, size, batch, width, depth, repeats):
        """`{"conv3d": best FLOP/s of a bare Conv3D 3^3 forward pass over the network's level
        shapes (channels width * 2**l at size / 2**l), "conv3d_shape", "matmul": FLOP/s of a
        2048^2 float32 matmul}`."""
        best, shape = 0.0, None
        for level in range(depth):
            channels, side = width * 2**level, size // 2**level
            conv = keras.layers.Conv3D(channels, 3, padding="same")
            x = tf.constant(np.random.default_rng(level).uniform(-1, 1, (batch,) + (side,) * 3 + (channels,)),
                            tf.float32)
            forward = tf.function(lambda inputs, conv=conv: conv(inputs))
            flops = graph_flops(forward.get_concrete_function(x))
            seconds = interleaved_seconds({"conv": lambda f=forward, x=x: f(x).numpy()}, repeats)["conv"]
            if flops / seconds > best:
                best, shape = flops / seconds, f"{channels}ch@{side}^3"
        a = tf.random.stateless_normal((2048, 2048), seed=(0, 0))
        matmul = tf.function(lambda: tf.matmul(a, a))
        seconds = interleaved_seconds({"matmul": lambda: matmul().numpy()}, repeats)["matmul"]
        return {"conv3d": best, "conv3d_shape": shape, "matmul": 2 * 2048**3 / seconds}

    def window(self, volume, patch, overlap, batch, width, depth):
        """Seconds and peak RSS of `unicon_tf.serving.sliding_window` (Gaussian blending, the
        segmentation network's softmax) over a random `volume`."""
        from unicon_tf import serving

        keras.backend.clear_session()
        self.trainers = {}
        network = unicon_tf.foundation(tuple(patch), task="segmentation", width=width, depth=depth)
        forward = tf.function(lambda x: tf.nn.softmax(network(x, training=False)["segmentation"]))

        def predict(patches):
            return forward({"ct": tf.constant(patches["ct"])}).numpy()

        volumes = {"ct": np.random.default_rng(0).uniform(-1, 1, tuple(volume)).astype(np.float32)}
        start = time.perf_counter()
        probabilities = serving.sliding_window(predict, volumes, tuple(patch), overlap=overlap, batch_size=batch)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "output_shape": list(probabilities.shape),
                "params": network.count_params()}

    def extras(self, quick):
        """The in-process ratios of `ratios.py --extras` (see `extras`)."""
        keras.backend.clear_session()
        self.trainers = {}
        return extras(quick)


def extras(quick, size=32, batch=2, width=16, depth=4):
    """Strategy overhead (MirroredStrategy over one CPU device / no strategy), four-stage
    growth FLOPs, and the feed, caching, serving and expand-cost benchmarks folded in."""
    import data_pipeline
    import expand_cost
    import feature_caching
    import serving

    steps, repeats = (4, 2) if quick else (6, 3)
    strategy = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    runs = {"continual": trainer("continual", size, batch, width, depth),
            "mirrored": trainer("continual", size, batch, width, depth, strategy=strategy)}
    seconds = interleaved_seconds({name: lambda run=run: run(steps) for name, run in runs.items()}, repeats)
    return {
        "strategy": {"size": size, "step_seconds": seconds, "overhead": seconds["mirrored"] / seconds["continual"]},
        "growth_flops": growth_flops(24, batch, width, depth),
        "feed": data_pipeline.measure(patients=12 if quick else 24, size=32, batch=2, steps=8 if quick else 12),
        "caching": feature_caching.measure(patients=16 if quick else 24, size=32, epochs=3),
        "serving": serving.measure(size=32, batch=4, repeats=3,
                                   volume_shape=(96, 96, 64) if quick else (128, 128, 96)),
        "expand_cost": expand_cost.measure(size=32, batch=2, repeats=3),
    }


def growth_flops(size, batch, width, depth):
    """Forward FLOPs of the four-stage model (UNICON order, rank-8 adapters) / stage 0, per
    adapter_start; and of one segmentation decoder (the floor sharing cannot remove)."""
    x = {m: tf.zeros((batch,) + (size,) * 3 + (1,)) for m in ("ct", "pet")}

    def flops(model):
        inputs = {m: x[m] for m in model.input}
        return graph_flops(tf.function(lambda i: model(i, training=False)).get_concrete_function(inputs))

    stage0 = unicon_tf.foundation((size,) * 3, width=width, depth=depth)
    reference = flops(stage0)
    with_prognosis = unicon_tf.expand(stage0, task="prognosis")
    decoder = flops(unicon_tf.expand(with_prognosis, task="segmentation")) - flops(with_prognosis)
    result = {"size": size, "segmentation_decoder_vs_stage0": decoder / reference, "adapter_start": {}}
    for start in range(depth):
        model = unicon_tf.expand(unicon_tf.foundation((size,) * 3, width=width, depth=depth), task="prognosis")
        model = unicon_tf.expand(model, task="segmentation", adapters=8, adapter_start=start)
        model = unicon_tf.expand(model, modality="pet", task="segmentation", adapters=8, adapter_start=start)
        result["adapter_start"][str(start)] = flops(model) / reference
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    threads = parser.parse_args().threads
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    side = Side()
    handlers = {"prepare": side.prepare, "step": side.step, "peaks": side.peaks, "window": side.window,
                "extras": side.extras}
    serve(handlers, {"ready": True, "version": f"tensorflow {tf.__version__}, keras {keras.__version__}"})


if __name__ == "__main__":
    main()
