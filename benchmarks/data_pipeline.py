"""Data benchmarks, measured in one run and printed as ratios.

1. Ingestion throughput (patients/s) of the phantom cohort with 1 and with 2 workers.
2. Feed ratio: the training-step time of a model fed by the TFRecord pipeline divided by
   its step time on a batch already in memory (target <= 1.05: the input pipeline keeps up).

    python benchmarks/data_pipeline.py [--patients 48] [--size 32] [--steps 20]
"""

import pathlib
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import unicon_tf
from unicon_tf import data
from common import StepTimer, integer_options


def median_step(model, ds, steps):
    timer = StepTimer()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer], shuffle=False)
    return float(np.median(timer.times[2:]))  # skip tracing and warm-up steps


def main():
    args = integer_options(__doc__, patients=48, size=32, batch=2, steps=20)
    result = measure(args.patients, args.size, args.batch, args.steps)
    rates = result["ingestion_patients_per_s"]
    print(f"ingestion: {rates['1']:.1f} patients/s with 1 worker, {rates['2']:.1f} with 2 "
          f"(speed-up {rates['2'] / rates['1']:.2f}x)")
    for augment, row in result["feed"].items():
        print(f"feed ratio (augment={augment}): {row['ratio']:.3f} "
              f"(TFRecord step {row['fed_step_s'] * 1000:.0f} ms / in-memory step {row['memory_step_s'] * 1000:.0f} ms)")


def measure(patients=48, size=32, batch=2, steps=20):
    """`{"ingestion_patients_per_s": {"1", "2"}, "feed": {augment: {"ratio", ...}}}`."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        manifest = data.phantom.write_cohort(tmp / "cohort", n=patients, shape=(2 * size,) * 3, spacing=3.0)
        prep = data.Preprocessing(shape=(size,) * 3, spacing=(6.0,) * 3)
        rates = {}
        for workers in (1, 2):
            start = time.perf_counter()
            data.ingest(manifest, tmp / f"records{workers}", prep, workers=workers, verbose=False)
            rates[str(workers)] = patients / (time.perf_counter() - start)

        model = unicon_tf.foundation((size,) * 3, task="classification")
        model.compile(optimizer="adam", loss={"classification": keras.losses.SparseCategoricalCrossentropy(True)})
        feed = {}
        for augment in (False, True):
            pipeline = data.dataset(tmp / "records2", "train", task="classification", batch_size=batch,
                                    augment=augment, seed=0, modalities=["ct"], drop_remainder=True).repeat()
            inputs, target = next(iter(pipeline))
            in_memory = tf.data.Dataset.from_tensors((inputs, {"classification": target})).repeat()
            fed = pipeline.map(lambda x, y: (x, {"classification": y}))
            memory_step = median_step(model, in_memory, steps)
            fed_step = median_step(model, fed, steps)
            feed[str(augment)] = {"ratio": fed_step / memory_step, "fed_step_s": fed_step, "memory_step_s": memory_step}
    return {"ingestion_patients_per_s": rates, "feed": feed}


if __name__ == "__main__":
    main()
