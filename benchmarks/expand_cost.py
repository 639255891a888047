"""Forward cost of a growing model, as ratios to the stage-0 model, measured in one run.

A head on an existing path reuses that path's encoder features (near-zero extra cost); a
head with adapters or on a new modality runs the shared encoder once more.

    python benchmarks/expand_cost.py [--size 32] [--batch 2] [--repeats 5]
"""

import numpy as np

import unicon_tf
from common import integer_options, median_seconds


def main():
    args = integer_options(__doc__, size=32, batch=2, repeats=5)
    shape = (args.size,) * 3
    rng = np.random.default_rng(0)
    volumes = {m: rng.normal(size=(args.batch,) + shape + (1,)).astype("float32") for m in ("ct", "pet")}

    steps = [
        ("stage 0: classification", None),
        ("+ prognosis (same path)", dict(task="prognosis")),
        ("+ segmentation (same path)", dict(task="segmentation")),
        ("+ prognosis, adapters=8", dict(task="prognosis", name="prognosis_lora", adapters=8)),
        ("+ pet, segmentation_ctpet", dict(modality="pet", task="segmentation")),
    ]
    model = unicon_tf.foundation(shape)
    base = None
    print(f"{'model':<30}{'params':>12}{'forward s':>12}{'ratio':>8}")
    for label, options in steps:
        if options:
            model = unicon_tf.expand(model, **options)
        inputs = {m: volumes[m] for m in model.input}
        seconds = median_seconds(lambda: model(inputs, training=False), args.repeats)
        base = base or seconds
        print(f"{label:<30}{model.count_params():>12,}{seconds:>12.3f}{seconds / base:>8.2f}")


if __name__ == "__main__":
    main()
