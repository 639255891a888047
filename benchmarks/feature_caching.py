"""Feature caching with the `frozen` strategy: epoch time of a new prognosis head trained on
cached encoder features against running the frozen encoder at every step (target >= 5x).

Both runs train the same stage of the same pipeline from the same stage-0 model, in one
process; the printed ratio is median epoch time without caching / with caching.

    python benchmarks/feature_caching.py [--patients 48] [--size 32] [--epochs 4]
"""

import pathlib
import shutil
import tempfile
import time

import keras
import numpy as np
import yaml

from unicon_tf import data, train
from common import integer_options


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def main():
    args = integer_options(__doc__, patients=48, size=32, epochs=4)
    result = measure(args.patients, args.size, args.epochs)
    print(f"prognosis head, frozen encoder, {args.patients} patients at {args.size}^3:")
    print(f"  epoch with cached features {result['cached_epoch_s']:.3f} s, encoder every step "
          f"{result['uncached_epoch_s']:.3f} s")
    print(f"  speed-up per epoch: {result['speedup_per_epoch']:.1f}x "
          f"(whole stage incl. the caching pass: {result['speedup_stage']:.2f}x over {args.epochs} epochs)")


def measure(patients=48, size=32, epochs=4):
    """`{"cached_epoch_s", "uncached_epoch_s", "speedup_per_epoch", "speedup_stage"}`."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        manifest = data.phantom.write_cohort(tmp / "cohort", n=patients, shape=(size,) * 3, spacing=3.0)
        prep = data.Preprocessing(shape=(size,) * 3, spacing=(3.0,) * 3, center="mask")
        data.ingest(manifest, tmp / "records", prep, verbose=False)
        stages = [{"name": "classification", "task": "classification", "epochs": 1},
                  {"name": "prognosis", "task": "prognosis", "strategy": "frozen", "augment": False}]
        spec = {"name": "caching", "input_shape": [size] * 3, "defaults": {"epochs": epochs},
                "stages": [{**s, "data": str(tmp / "records")} for s in stages]}
        pipeline = tmp / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump(spec))
        train.train_stage(pipeline, "classification", tmp / "base", verbose=0)

        per_epoch, totals = {}, {}
        for cached in (True, False):
            run = tmp / f"run_{cached}"
            shutil.copytree(tmp / "base", run)
            spec["stages"][1]["cache_features"] = cached
            pipeline.write_text(yaml.safe_dump(spec))
            timer = EpochTimer()
            start = time.perf_counter()
            record = train.train_stage(pipeline, "prognosis", run, verbose=0, callbacks=[timer])
            totals[cached] = time.perf_counter() - start
            assert record["cached_features"] is cached
            per_epoch[cached] = float(np.median(timer.seconds[1:]))  # first epoch includes tracing
    return {"cached_epoch_s": per_epoch[True], "uncached_epoch_s": per_epoch[False],
            "speedup_per_epoch": per_epoch[False] / per_epoch[True], "speedup_stage": totals[False] / totals[True]}


if __name__ == "__main__":
    main()
