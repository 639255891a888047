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
from common import integer_options, median_seconds


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    args = integer_options(__doc__, size=32, batch=4, repeats=5)
    shape = (args.size,) * 3
    model = unicon_tf.foundation(shape, task="classification")
    model = unicon_tf.expand(model, task="prognosis")
    model = unicon_tf.expand(model, task="segmentation")
    model = unicon_tf.expand(model, modality="pet", task="segmentation")
    rng = np.random.default_rng(0)
    batch = {m: rng.uniform(-1, 1, (args.batch,) + shape + (1,)).astype(np.float32) for m in ("ct", "pet")}
    with tempfile.TemporaryDirectory() as tmp:
        version = serving.export_model(model, pathlib.Path(tmp), "bench")
        signature = tf.saved_model.load(str(version)).signatures["serving_default"]
        tensors = {m: tf.constant(v) for m, v in batch.items()}
        served = median_seconds(lambda: signature(**tensors), args.repeats)
        keras_predict = median_seconds(lambda: model.predict(batch, verbose=0), args.repeats)
        print(f"serving_default: {served / args.batch * 1000:.0f} ms/volume; model.predict: "
              f"{keras_predict / args.batch * 1000:.0f} ms/volume; ratio {served / keras_predict:.2f}")

        segmentation = tf.saved_model.load(str(version)).signatures["segmentation"]
        predict = serving.inference.signature_predictor(segmentation, "probabilities")
        volume = {"ct": rng.uniform(-1, 1, (256, 256, 128)).astype(np.float32)}
        before = peak_rss_mb()
        start = time.perf_counter()
        probabilities = serving.sliding_window(predict, volume, shape, overlap=0.5, batch_size=4)
        seconds = time.perf_counter() - start
        print(f"sliding window over 256x256x128 (patch {args.size}^3, overlap 0.5): {seconds:.1f} s, "
              f"peak RSS +{peak_rss_mb() - before:.0f} MB (output {probabilities.nbytes / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
