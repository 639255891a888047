"""Training-step time of the ViT encoder vs the residual CNN, stage by stage, in one run.

Both models grow through UNICON's four stages as their pipelines define them (the CNN as
in the demo plan: width 16, depth 4; the ViT as `pipelines/chest_ct_vit.yaml`), at the
pipelines' 24^3 crops and batch 4. Each stage's step (forward, loss, backward, AdamW
update of what the stage trains) is timed for the two models alternately, A B A B, and
printed as milliseconds and the ViT / CNN ratio. The CNN's prognosis stage is `frozen`
here (in the demo it trains on cached features, cheaper still); the ViT's uses rank-2
LoRA on query and value.

    python benchmarks/vit_vs_cnn.py [--size 24] [--batch 4] [--repeats 5]
"""

import pathlib
import time

import keras
import numpy as np
import tensorflow as tf
import yaml

import unicon_tf
from common import integer_options
from unicon_tf.model import model_parts
from unicon_tf.train.continual import ContinualModel
from unicon_tf.train.strategies import configure_trainable

VIT_PIPELINE = pathlib.Path(__file__).parent.parent / "pipelines" / "chest_ct_vit.yaml"
STAGES = [  # (stage, expand options, CNN strategy and rank, ViT strategy and rank)
    ("classification", dict(task="classification"), ("scratch", None), ("scratch", None)),
    ("prognosis", dict(task="prognosis"), ("frozen", None), ("adapters", 2)),
    ("segmentation", dict(task="segmentation"), ("adapters", 8), ("adapters", 8)),
    ("pet", dict(task="segmentation", modality="pet", name="segmentation_ctpet"), ("adapters", 8), ("adapters", 8)),
]


def vit_options():
    encoder = dict(yaml.safe_load(VIT_PIPELINE.read_text())["encoder"])
    encoder.pop("kind")
    return {"encoder": "vit", **encoder}


def targets(task, batch, shape, rng):
    if task == "classification":
        return rng.integers(0, 2, batch).astype("int32")
    if task == "prognosis":
        return np.stack([rng.uniform(1, 10, batch), rng.integers(0, 2, batch)], axis=1).astype("float32")
    return rng.integers(0, 2, (batch,) + shape).astype("int32")


def step_fn(model, stage, options, strategy, rank, inputs, rng, shape, batch):
    """(grown model, a zero-argument function running one training step)."""
    if stage > 0:
        model = unicon_tf.expand(model, adapters=rank, **options)
    head = options.get("name", options["task"])
    configure_trainable(model, stage, "frozen" if strategy == "scratch" else strategy)
    layer = model_parts(model)["heads"][head]
    sub = keras.Model({m: model.input[m] for m in layer.modalities}, {head: model.output[head]})
    trainer = ContinualModel(sub, {head: layer.task})
    trainer.compile(optimizer=keras.optimizers.AdamW(1e-3))
    x = {m: inputs[m] for m in layer.modalities}
    y = {head: targets(layer.task, batch, shape, rng)}
    # The step `fit` runs (train_on_batch would add a sample weight to the batch).
    trainer.make_train_function()
    batches = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    return model, lambda: trainer.train_function(batches)


def main():
    args = integer_options(__doc__, size=24, batch=4, repeats=5)
    shape = (args.size,) * 3
    rng = np.random.default_rng(0)
    inputs = {m: rng.normal(size=(args.batch,) + shape + (1,)).astype("float32") for m in ("ct", "pet")}
    models = {"cnn": unicon_tf.foundation(shape, width=16, depth=4), "vit": unicon_tf.foundation(shape, **vit_options())}
    print(f"{'stage':<16}{'cnn ms/step':>12}{'vit ms/step':>12}{'vit/cnn':>9}{'cnn params':>12}{'vit params':>12}")
    for index, (stage, options, cnn_plan, vit_plan) in enumerate(STAGES):
        steps = {}
        for name, (strategy, rank) in (("cnn", cnn_plan), ("vit", vit_plan)):
            models[name], steps[name] = step_fn(models[name], index, options, strategy, rank, inputs, rng, shape,
                                                args.batch)
            steps[name]()  # trace and warm up
        times = {"cnn": [], "vit": []}
        for _ in range(args.repeats):  # interleaved: A B A B
            for name in ("cnn", "vit"):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        cnn, vit = (1000 * float(np.median(times[n])) for n in ("cnn", "vit"))
        print(f"{stage:<16}{cnn:>12.0f}{vit:>12.0f}{vit / cnn:>9.2f}"
              f"{models['cnn'].count_params():>12,}{models['vit'].count_params():>12,}")


if __name__ == "__main__":
    main()
