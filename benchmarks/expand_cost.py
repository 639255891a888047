"""Forward cost of a growing model, as ratios to the stage-0 model, measured in one run.

A head on an existing path reuses that path's encoder features (near-zero extra cost); a
head with adapters or on a new modality runs the shared encoder once more.

    python benchmarks/expand_cost.py [--size 32] [--batch 2] [--repeats 5]
"""

import numpy as np

import unicon_tf
from common import integer_options, interleaved_seconds


STEPS = [
    ("stage 0: classification", None),
    ("+ prognosis (same path)", dict(task="prognosis")),
    ("+ segmentation (same path)", dict(task="segmentation")),
    ("+ prognosis, adapters=8", dict(task="prognosis", name="prognosis_lora", adapters=8)),
    ("+ pet, segmentation_ctpet", dict(modality="pet", task="segmentation")),
]


def measure(size=32, batch=2, repeats=5):
    """`[{"model", "params", "forward_seconds", "ratio"}]`, one row per growth step."""
    shape = (size,) * 3
    rng = np.random.default_rng(0)
    volumes = {m: rng.normal(size=(batch,) + shape + (1,)).astype("float32") for m in ("ct", "pet")}
    model, models = unicon_tf.foundation(shape), []
    for label, options in STEPS:
        if options:
            model = unicon_tf.expand(model, **options)
        models.append((label, model))
    seconds = interleaved_seconds(
        {label: (lambda m=m: m({k: volumes[k] for k in m.input}, training=False)) for label, m in models}, repeats)
    base = seconds[STEPS[0][0]]
    return [{"model": label, "params": m.count_params(), "forward_seconds": seconds[label],
             "ratio": seconds[label] / base} for label, m in models]


def main():
    args = integer_options(__doc__, size=32, batch=2, repeats=5)
    print(f"{'model':<30}{'params':>12}{'forward s':>12}{'ratio':>8}")
    for row in measure(args.size, args.batch, args.repeats):
        print(f"{row['model']:<30}{row['params']:>12,}{row['forward_seconds']:>12.3f}{row['ratio']:>8.2f}")


if __name__ == "__main__":
    main()
