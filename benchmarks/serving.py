"""Serving benchmarks, measured in one run:

1. latency per volume of the exported `serving_default` signature (tf.saved_model.load)
   against `model.predict` on the same batch, as a ratio;
2. peak memory (RSS increase) and time of sliding-window segmentation over a
   256 x 256 x 128 volume with a 32^3 patch.

    python benchmarks/serving.py [--size 32] [--batch 4] [--repeats 5]
"""

import pathlib
import resource
import tempfile
import time

import numpy as np
import tensorflow as tf

import unicon_tf
from unicon_tf import serving
from common import integer_options, interleaved_seconds


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    args = integer_options(__doc__, size=32, batch=4, repeats=5)
    result = measure(args.size, args.batch, args.repeats)
    print(f"serving_default: {result['served_ms_per_volume']:.0f} ms/volume; model.predict: "
          f"{result['predict_ms_per_volume']:.0f} ms/volume; ratio {result['ratio']:.2f}")
    print(f"sliding window over {'x'.join(map(str, result['window_volume']))} (patch {args.size}^3, overlap 0.5): "
          f"{result['window_seconds']:.1f} s, peak RSS +{result['window_peak_rss_mb']:.0f} MB "
          f"(output {result['window_output_mb']:.0f} MB)")


def measure(size=32, batch=4, repeats=5, volume_shape=(256, 256, 128)):
    """`{"ratio" (serving_default / model.predict), ..., "window_seconds", "window_peak_rss_mb"}`."""
    shape = (size,) * 3
    model = unicon_tf.foundation(shape, task="classification")
    model = unicon_tf.expand(model, task="prognosis")
    model = unicon_tf.expand(model, task="segmentation")
    model = unicon_tf.expand(model, modality="pet", task="segmentation")
    rng = np.random.default_rng(0)
    inputs = {m: rng.uniform(-1, 1, (batch,) + shape + (1,)).astype(np.float32) for m in ("ct", "pet")}
    with tempfile.TemporaryDirectory() as tmp:
        version = serving.export_model(model, pathlib.Path(tmp), "bench")
        signature = tf.saved_model.load(str(version)).signatures["serving_default"]
        tensors = {m: tf.constant(v) for m, v in inputs.items()}
        seconds = interleaved_seconds({"served": lambda: signature(**tensors),
                                       "predict": lambda: model.predict(inputs, verbose=0)}, repeats)

        segmentation = tf.saved_model.load(str(version)).signatures["segmentation"]
        predict = serving.inference.signature_predictor(segmentation, "probabilities")
        volume = {"ct": rng.uniform(-1, 1, volume_shape).astype(np.float32)}
        before = peak_rss_mb()
        start = time.perf_counter()
        probabilities = serving.sliding_window(predict, volume, shape, overlap=0.5, batch_size=4)
        window_seconds = time.perf_counter() - start
    return {"ratio": seconds["served"] / seconds["predict"],
            "served_ms_per_volume": seconds["served"] / batch * 1000,
            "predict_ms_per_volume": seconds["predict"] / batch * 1000,
            "window_volume": list(volume_shape), "window_seconds": window_seconds,
            "window_peak_rss_mb": peak_rss_mb() - before, "window_output_mb": probabilities.nbytes / 2**20}


if __name__ == "__main__":
    main()
