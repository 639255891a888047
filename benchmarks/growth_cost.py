"""Growth cost: forward time and FLOPs of the four-stage model vs stage 0, and Dice, for
each encoder level the adapter and fusion paths start at (`adapter_start`).

The demo's plan (unicon_tf.demo.FULL: phantom cohort, 24^3 crops at 3 mm around the lesion,
the demo's epochs): stages 0 (classification) and 1 (prognosis, same path) are trained once;
for every start level, stages 2 (segmentation, rank-8 adapters) and 3 (PET: fused CT+PET
path with rank-8 adapters, head segmentation_ctpet) are trained from that same stage-1
model with the same seed. Forward times (batch 4, traced functions) of each level's
four-stage model and of the stage-0 model are measured in turns (A B A B), in one run.
Dice is on the test split, with a paired bootstrap 95% interval of the difference to
start level 0 (today's model).

    python benchmarks/growth_cost.py [--patients 96] [--levels 0 1 2 3] [--json growth_cost.json]
"""

import argparse
import dataclasses
import json
import pathlib
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
import yaml

from unicon_tf import data, train
from unicon_tf.demo import FULL
from unicon_tf.evaluate.scores import paired_bootstrap, predict_head, segmentation_scores
from common import graph_flops, interleaved_seconds

SEGMENTATION_HEADS = ("segmentation", "segmentation_ctpet")


def forward(model, batch):
    """`(run, flops)`: a traced forward pass of every head (what `serving_default` runs),
    and its FLOPs counted from the graph."""
    function = tf.function(lambda inputs: model(inputs, training=False))
    tensors = {m: tf.constant(batch[m]) for m in model.input}
    return (lambda: function(tensors)), graph_flops(function.get_concrete_function(tensors))


def measure(patients=FULL.patients, levels=(0, 1, 2, 3), batch=4, repeats=7, echo=print):
    """Train the demo's stages once per start level; return `{"plan", "levels": [...]}`."""
    plan = dataclasses.replace(FULL, patients=patients)
    crop = (plan.crop,) * 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        echo(f"phantom cohort: {plan.patients} patients, {plan.crop}^3 crops")
        manifest = data.phantom.write_cohort(tmp / "phantom", n=plan.patients, shape=(plan.cohort_shape,) * 3,
                                             spacing=3.0, split_fractions={"train": 1 / 2, "val": 1 / 6})
        records = tmp / "lesion"
        data.ingest(manifest, records, data.Preprocessing(shape=crop, spacing=(3.0,) * 3, center="mask"),
                    verbose=False)
        spec = plan.pipeline(manifest)
        del spec["sources"]
        for stage in spec["stages"]:
            stage["data"] = str(records)
        pipeline = tmp / "pipeline.yaml"
        base = tmp / "base"
        pipeline.write_text(yaml.safe_dump(spec))
        for stage in spec["stages"][:2]:
            echo(f"stage {stage['name']} (shared by every start level)")
            train.train_stage(pipeline, stage["name"], base, verbose=0)

        results, models = [], {}
        for level in levels:
            run = tmp / f"level{level}"
            shutil.copytree(base, run)
            for stage in spec["stages"][2:]:
                stage["adapter_start"] = level
            pipeline.write_text(yaml.safe_dump(spec))
            for stage in spec["stages"][2:]:
                echo(f"adapter_start={level}: stage {stage['name']}")
                train.train_stage(pipeline, stage["name"], run, verbose=0)
            model = keras.models.load_model(run / "stages" / "03-pet" / "model.keras")
            models[level] = model
            dice = {}
            for head in SEGMENTATION_HEADS:
                prediction = predict_head(model, head, records, "test")
                dice[head] = segmentation_scores(prediction["target"], prediction["output"])["dice_per_patient"]
            results.append({"adapter_start": level, "params": model.count_params(), "dice_per_patient": dice})

        stage0 = keras.models.load_model(base / "stages" / "00-classification" / "model.keras")
        rng = np.random.default_rng(0)
        inputs = {m: rng.uniform(-1, 1, (batch,) + crop + (1,)).astype(np.float32) for m in ("ct", "pet")}
        passes = {"stage 0": forward(stage0, inputs)}
        passes.update({f"level {level}": forward(model, inputs) for level, model in models.items()})
        echo(f"forward passes, batch {batch}, {repeats} turns")
        seconds = interleaved_seconds({name: run for name, (run, _) in passes.items()}, repeats)
        flops = {name: count for name, (_, count) in passes.items()}

    reference = next((r for r in results if r["adapter_start"] == 0), None)
    for result in results:
        result["forward_seconds"] = seconds[f"level {result['adapter_start']}"]
        result["forward_ratio"] = result["forward_seconds"] / seconds["stage 0"]
        result["forward_flops_ratio"] = flops[f"level {result['adapter_start']}"] / flops["stage 0"]
        for head, per_patient in result["dice_per_patient"].items():
            result[f"dice_{head}"] = float(np.mean(per_patient))
            if reference is not None:
                result[f"dice_{head}_change_ci95"] = paired_bootstrap(per_patient, reference["dice_per_patient"][head])
    return {"plan": {"patients": plan.patients, "crop": plan.crop, "width": plan.width, "epochs": plan.epochs,
                     "test_patients": len(results[0]["dice_per_patient"]["segmentation"]), "batch": batch},
            "stage0_forward_seconds": seconds["stage 0"], "stage0_forward_flops": flops["stage 0"],
            "levels": results,
            "goal": "four-stage forward <= 2.5x stage 0, segmentation Dice within 0.01 of adapter_start=0"}


def table(result):
    """The start level x forward ratio x Dice table as text."""
    lines = [f"{'adapter_start':>13} {'forward time':>13} {'FLOPs':>7} {'Dice seg':>9} {'Dice ct+pet':>12}  "
             f"{'Dice change vs 0: seg, ct+pet (95% CI)':>38}"]
    for row in result["levels"]:
        change = ", ".join(f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in
                           (row.get(f"dice_{h}_change_ci95", (0.0, 0.0)) for h in SEGMENTATION_HEADS))
        lines.append(f"{row['adapter_start']:>13} {row['forward_ratio']:>12.2f}x {row['forward_flops_ratio']:>6.2f}x "
                     f"{row['dice_segmentation']:>9.3f} {row['dice_segmentation_ctpet']:>12.3f}  {change:>38}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=FULL.patients)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--json", type=pathlib.Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    result = measure(patients=args.patients, levels=args.levels)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
