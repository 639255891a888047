"""What the benchmarks share (run them as `python benchmarks/<name>.py`)."""

import argparse
import time

import keras
import numpy as np


def integer_options(doc, **defaults):
    """Parse `--name N` options (`name=default` each) for a benchmark whose docstring is `doc`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser.parse_args()


def interleaved_seconds(functions, repeats):
    """Median wall time of each of `functions` (`{name: fn}`), measured in turns A B A B ...
    so that machine drift during the run affects every one alike; one warm-up call each."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def graph_flops(concrete_function):
    """Floating-point operations of one call of a traced function, counted from its graph.

    TensorFlow's own per-op FLOP statistics (those `tf.compat.v1.profiler` reports: Conv3D,
    MatMul, BiasAdd, ...) for every op that has them, plus the two convolution gradients it
    has none for, each as many multiply-adds as the forward convolution:
    Conv3DBackpropInputV2 and Conv3DBackpropFilterV2 = 2 x |out_backprop| x k^3 x C_in.
    Shapes must be static (trace with fully defined input shapes).
    """
    from tensorflow.python.framework import ops as tf_ops

    graph, total = concrete_function.graph, 0
    for op in graph.get_operations():
        if op.type in ("Conv3DBackpropInputV2", "Conv3DBackpropFilterV2"):
            out_backprop = op.inputs[2].shape
            kernel = op.inputs[1].shape if op.type == "Conv3DBackpropInputV2" else op.outputs[0].shape
            total += 2 * int(np.prod(out_backprop)) * int(np.prod(kernel[:4]))
            continue
        try:
            value = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value
        except (ValueError, TypeError):  # no statistics registered, or a shape unknown
            value = None
        total += int(value or 0)
    return total


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step of a `fit`, in `self.times` (reset by each fit)."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)
