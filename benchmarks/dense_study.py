"""Dense study (issue 17): isolation options, losses and sampling for a new segmentation head
on a frozen classification encoder, against the single-task model trained from scratch.

On a phantom cohort (the small-lesion phantom when `data.phantom.LesionOptions` exists:
`--lesion-radius LOW HIGH` mm and `--lesion-contrast HU` are passed through to it), for
every seed: stage 0 (CT classification, trained end to end) is trained once; every arm
then trains stage 1 (CT segmentation) from that same stage-0 model with the same seed,
through the pipeline (`unicon_tf.train.train_stage`), and the single-task baseline trains a
CT segmentation model from scratch. Per arm:

- per-patient mean Dice on the test split (each patient's Dice averaged over the seeds),
  with a 95% bootstrap interval over test patients, the per-seed means, and the paired
  bootstrap interval of the difference to the single-task baseline;
- forward cost: FLOPs of the grown model's forward pass (every head) / stage 0's;
- trainable parameters of the stage (what its strategy trains);
- forgetting of the old head: the largest absolute change of the classification logits
  on the test split (0 = bit-identical) and the change of its AUC, worst over seeds.

Every stage and the baseline keep their best-on-validation weights (`select: best_val`,
`unicon_tf.train.selection`; `--stage-keys` adds or overrides keys, e.g. `patience`), so
the arms are compared at their selected epochs, `epochs` being a maximum.

`--cohort real-ct --source pyradiomics-3.0.1.tar.gz` runs it on real chest CT with synthetic
lesions (`unicon_tf.data.real_ct`) instead of the phantom.

Writes `dense_study_<cohort>.json`, `.md` (the table) and `.png` (Dice per arm with
intervals) to `--out`.

    python benchmarks/dense_study.py --quick --out /tmp/dense_quick      # minutes: checks it end to end
    python benchmarks/dense_study.py --out results/dense --seeds 0 1 2 \\
        --lesion-radius 4 9 --lesion-contrast 60 [--stage-keys '{"patience": 6}']
    # one process per seed (--out a/0, a/1, ...), then:
    python benchmarks/dense_study.py --merge a/*/dense_study_phantom.json --out results
"""

import argparse
import copy
import json
import pathlib
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
import yaml

from unicon_tf import data, train
from unicon_tf.evaluate.scores import (bootstrap_interval, classification_scores, paired_bootstrap, predict_head,
                                       segmentation_scores)
from unicon_tf.train.strategies import configure_trainable
from common import graph_flops

ADAPTERS = {"strategy": "adapters", "adapters": 8}
ARMS = {  # id -> (label, stage-1 keys); `{deep}` is replaced by the levels >= 1
    "adapters": ("adapters r8, lr 3e-3", ADAPTERS),
    "adapters_lr1e-3": ("adapters r8, lr 1e-3", {**ADAPTERS, "learning_rate": 1e-3}),
    "adapters_r16": ("adapters r16, lr 3e-3", {**ADAPTERS, "adapters": 16}),
    "adapters_side": ("adapters r8 + side encoder", {**ADAPTERS, "side_encoder": "{side}"}),
    "adapters_deep": ("adapters r8 on levels >= 1", {**ADAPTERS, "adapter_levels": "{deep}"}),
    "path_norm": ("adapters r8 + per-path GroupNorm", {**ADAPTERS, "path_norm": True}),
    "side_encoder": ("side encoder (no adapters)", {"strategy": "frozen", "side_encoder": "{side}",
                                                    "cache_features": False}),
    "all_isolation": ("adapters r8 + path norm + side encoder", {**ADAPTERS, "path_norm": True,
                                                                 "side_encoder": "{side}"}),
    "per_patient_dice": ("adapters r8, per-patient Dice", {**ADAPTERS, "loss": {"dice": "per_patient"}}),
    "lesion_ce": ("adapters r8, lesion-weighted CE", {**ADAPTERS, "loss": {"ce_weighting": "lesion"}}),
    "foreground_sampling": ("adapters r8, foreground crops p=0.67", {**ADAPTERS,
                                                                     "sampling": {"foreground_probability": 0.67}}),
    "small_lesion_recipe": ("adapters r8 + path norm + side enc., per-patient Dice, lesion CE",
                            {**ADAPTERS, "path_norm": True, "side_encoder": "{side}",
                             "loss": {"dice": "per_patient", "ce_weighting": "lesion"}}),
    "finetune": ("finetune (LwF a=1 + L2-SP b=1), guarded", {"strategy": "finetune", "alpha": 1.0, "beta": 1.0}),
}
BASELINE = "single_task"
# No `adapter_shortcuts: false` arm: the built-in residual encoder changes channels in its
# stride-2 convolutions, so its blocks have no 1x1x1 shortcut (the option matters for a
# user's backbone); on it that arm is the `adapters` arm exactly.

FULL = dict(patients=96, cohort=64, spacing=2.0, crop=32, width=16, depth=4, classification_epochs=20,
            epochs=24, batch_size=4, seeds=(0, 1), side=8)
QUICK = dict(patients=20, cohort=32, spacing=4.0, crop=16, width=4, depth=3, classification_epochs=1,
             epochs=1, batch_size=4, seeds=(0, 1), side=4)


def cohort(out, plan, lesion_radius=None, lesion_contrast=None, source=None, echo=print):
    """Write and ingest the phantom, or the real-CT cohort when `source` is given (the
    pyradiomics sdist, `unicon_tf.data.real_ct`); return the records folder."""
    options = {}
    if lesion_radius is not None or lesion_contrast is not None:
        options["lesions"] = data.phantom.LesionOptions(
            radius_mm=tuple(lesion_radius) if lesion_radius else None, ct_contrast_hu=lesion_contrast)
    name = "phantom" if source is None else "real-CT cohort"
    echo(f"{name}: {plan['patients']} patients, {plan['cohort']}^3 at {plan['spacing']} mm"
         + (f", lesions {options['lesions']}" if options else ""))
    settings = dict(n=plan["patients"], shape=(plan["cohort"],) * 3, spacing=plan["spacing"],
                    split_fractions={"train": 1 / 2, "val": 1 / 6}, **options)
    if source is None:
        manifest = data.phantom.write_cohort(out / "phantom", **settings)
    else:
        manifest = data.real_ct.write_cohort(out / "real_ct", source, **settings)
    records = out / "records"
    data.ingest(manifest, records, data.Preprocessing(shape=(plan["crop"],) * 3, spacing=(plan["spacing"],) * 3,
                                                      center="mask"), verbose=False)
    return records


def pipeline_spec(name, plan, records, seed, stages, extra):
    return {"name": name, "input_shape": [plan["crop"]] * 3, "modality": "ct",
            "encoder": {"width": plan["width"], "depth": plan["depth"]},
            "defaults": {"epochs": plan["epochs"], "batch_size": plan["batch_size"], "learning_rate": 3e-3,
                         "seed": seed},
            "stages": [{"data": str(records), **extra, **stage} for stage in stages]}


def stage0(plan):
    return {"name": "classification", "task": "classification", "num_classes": 2,
            "epochs": plan["classification_epochs"], "learning_rate": 1e-3}


def arm_stage(arm, plan):
    keys = copy.deepcopy(ARMS[arm][1])
    fill = {"{deep}": list(range(1, plan["depth"])), "{side}": plan["side"]}
    keys = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in keys.items()}
    return {"name": "segmentation", "task": "segmentation", "num_classes": 2, **keys}


def forward_flops(model, crop):
    inputs = {m: tf.zeros((1,) + (crop,) * 3 + (1,)) for m in model.input}
    function = tf.function(lambda x: model(x, training=False))
    return graph_flops(function.get_concrete_function(inputs))


def trainable_params(model, stage, strategy):
    configure_trainable(model, stage, strategy)
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def measure(plan, arms, out, lesion_radius=None, lesion_contrast=None, extra=None, source=None, echo=print):
    extra = {"select": "best_val", **(extra or {})}
    work = pathlib.Path(tempfile.mkdtemp(prefix="dense_study_"))
    try:
        records = cohort(work, plan, lesion_radius, lesion_contrast, source, echo)
        results = {arm: {"dice": [], "forgetting_max_abs": [], "auc_change": []} for arm in [*arms, BASELINE]}
        flops0 = None
        for seed in plan["seeds"]:
            base = work / f"seed{seed}" / "base"
            pipe = work / f"seed{seed}" / "pipeline.yaml"
            pipe.parent.mkdir(parents=True, exist_ok=True)
            pipe.write_text(yaml.safe_dump(pipeline_spec("study", plan, records, seed, [stage0(plan)], extra)))
            echo(f"seed {seed}: stage 0 (classification)")
            train.train_stage(pipe, "classification", base, verbose=0)
            model0 = keras.models.load_model(base / "stages" / "00-classification" / "model.keras")
            old = predict_head(model0, "classification", records, "test")
            auc0 = classification_scores(old["target"], old["output"])["auc"]
            flops0 = flops0 or forward_flops(model0, plan["crop"])
            for arm in arms:
                echo(f"seed {seed}: {arm}")
                run_dir = work / f"seed{seed}" / arm
                shutil.copytree(base, run_dir)
                stage = arm_stage(arm, plan)
                pipe.write_text(yaml.safe_dump(pipeline_spec("study", plan, records, seed, [stage0(plan), stage],
                                                             extra)))
                train.train_stage(pipe, "segmentation", run_dir, verbose=0)
                model = keras.models.load_model(run_dir / "stages" / "01-segmentation" / "model.keras")
                entry = results[arm]
                entry["dice"].append(_dice(model, "segmentation", records))
                now = predict_head(model, "classification", records, "test")
                entry["forgetting_max_abs"].append(float(np.max(np.abs(now["output"] - old["output"]))))
                entry["auc_change"].append(classification_scores(now["target"], now["output"])["auc"] - auc0)
                if seed == plan["seeds"][0]:
                    entry["flops_ratio"] = forward_flops(model, plan["crop"]) / flops0
                    entry["trainable_params"] = trainable_params(model, 1, stage.get("strategy", "frozen"))
                    entry["label"], entry["stage"] = ARMS[arm][0], stage
            echo(f"seed {seed}: single-task baseline (segmentation from scratch)")
            single = {"name": "segmentation", "task": "segmentation", "num_classes": 2}
            pipe.write_text(yaml.safe_dump(pipeline_spec("single", plan, records, seed, [single], extra)))
            train.train_stage(pipe, "segmentation", work / f"seed{seed}" / BASELINE, verbose=0)
            model = keras.models.load_model(work / f"seed{seed}" / BASELINE / "stages" / "00-segmentation" /
                                            "model.keras")
            entry = results[BASELINE]
            entry["dice"].append(_dice(model, "segmentation", records))
            entry["forgetting_max_abs"].append(None)
            entry["auc_change"].append(None)
            if seed == plan["seeds"][0]:
                entry["flops_ratio"] = forward_flops(model, plan["crop"]) / flops0
                entry["trainable_params"] = int(model.count_params())
                entry["label"], entry["stage"] = "single-task model from scratch", single
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarise(results, plan, {"cohort": "phantom" if source is None else "real-ct",
                                     "source": None if source is None else pathlib.Path(source).name,
                                     "lesion_radius_mm": lesion_radius, "lesion_contrast_hu": lesion_contrast,
                                     "stage_keys": extra})


def _dice(model, head, records):
    prediction = predict_head(model, head, records, "test")
    return segmentation_scores(prediction["target"], prediction["output"])["dice_per_patient"]


def summarise(results, plan, phantom):
    """Per arm: mean Dice over patients of the seed-averaged per-patient Dice, intervals."""
    reference = np.mean(results[BASELINE]["dice"], axis=0)
    rows = []
    for arm, entry in results.items():
        per_patient = np.mean(entry["dice"], axis=0)  # (patients,), averaged over seeds
        forgetting = [f for f in entry["forgetting_max_abs"] if f is not None]
        auc = [a for a in entry["auc_change"] if a is not None and np.isfinite(a)]
        rows.append({
            "arm": arm, "label": entry["label"], "stage": entry["stage"],
            "dice": float(per_patient.mean()),
            "dice_ci95": bootstrap_interval(lambda r: per_patient[r[0]].mean(axis=-1), [len(per_patient)],
                                            vectorized=True),
            "dice_per_seed": [float(np.mean(d)) for d in entry["dice"]],
            "dice_vs_single_task": None if arm == BASELINE else float(per_patient.mean() - reference.mean()),
            "dice_vs_single_task_ci95": None if arm == BASELINE else paired_bootstrap(per_patient, reference),
            "missed_patients": int(np.sum(per_patient == 0.0)),
            "flops_ratio": entry["flops_ratio"], "trainable_params": entry["trainable_params"],
            "forgetting_max_abs": max(forgetting) if forgetting else None,
            "auc_change_worst": min(auc) if auc else None,
            "dice_per_patient_by_seed": entry["dice"],
            "forgetting_by_seed": entry["forgetting_max_abs"], "auc_change_by_seed": entry["auc_change"],
        })
    return {"plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()}, "phantom": phantom,
            "test_patients": len(reference), "rows": rows}


def merge(parts):
    """One result from the results of runs on the same cohort with different seeds (e.g. one
    process per seed): every arm's per-seed lists joined, summarised again."""
    first = parts[0]
    results = {}
    for part in parts:
        if (part["phantom"], {k: v for k, v in part["plan"].items() if k != "seeds"}) != (
                first["phantom"], {k: v for k, v in first["plan"].items() if k != "seeds"}):
            raise SystemExit("--merge: the results differ in more than their seeds")
        for row in part["rows"]:
            entry = results.setdefault(row["arm"], {"dice": [], "forgetting_max_abs": [], "auc_change": [],
                                                    **{k: row[k] for k in ("label", "stage", "flops_ratio",
                                                                           "trainable_params")}})
            entry["dice"] += row["dice_per_patient_by_seed"]
            entry["forgetting_max_abs"] += row["forgetting_by_seed"]
            entry["auc_change"] += row["auc_change_by_seed"]
    plan = {**first["plan"], "seeds": [s for part in parts for s in part["plan"]["seeds"]]}
    return summarise(results, plan, first["phantom"])


def markdown(result):
    plan = result["plan"]
    lines = [f"Dense study: {plan['patients']} {result['phantom'].get('cohort', 'phantom')} patients ({result['test_patients']} test), "
             f"{plan['crop']}^3 crops at {plan['spacing']} mm, width {plan['width']}, depth {plan['depth']}, "
             f"stage-0 epochs {plan['classification_epochs']}, stage-1 epochs {plan['epochs']}, seeds {plan['seeds']}; "
             f"phantom {result['phantom']}.",
             "",
             "| arm | Dice (per-patient mean) | 95% CI | per seed | vs single-task (95% CI) | missed | "
             "forward FLOPs / stage 0 | trainable params | forgetting: max abs logit change | AUC change |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def optional(value, spec):
        return "-" if value is None else format(value, spec)

    for row in result["rows"]:
        vs, difference = row["dice_vs_single_task_ci95"], row.get("dice_vs_single_task")
        lines.append(
            f"| {row['label']} | {row['dice']:.3f} | [{row['dice_ci95'][0]:.3f}, {row['dice_ci95'][1]:.3f}] | "
            f"{', '.join(f'{d:.3f}' for d in row['dice_per_seed'])} | "
            f"{'-' if vs is None else f'{difference:+.3f} [{vs[0]:+.3f}, {vs[1]:+.3f}]'} | "
            f"{row['missed_patients']} | "
            f"{row['flops_ratio']:.2f}x | {row['trainable_params']:,} | "
            f"{optional(row['forgetting_max_abs'], '.3g')} | {optional(row['auc_change_worst'], '+.3f')} |")
    return "\n".join(lines) + "\n"


def figure(result, path):
    """A PNG of every arm's per-patient mean Dice with its 95% interval, the single-task
    baseline's interval shaded, and each seed's mean as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    base = next(r for r in rows if r["arm"] == BASELINE)
    ax.axvspan(*base["dice_ci95"], color="0.85", label="single-task 95% CI")
    for y, row in enumerate(rows):
        low, high = row["dice_ci95"]
        ax.errorbar(row["dice"], y, xerr=[[row["dice"] - low], [high - row["dice"]]], fmt="o", capsize=3,
                    color="C3" if row["arm"] == BASELINE else "C0")
        ax.plot(row["dice_per_seed"], [y] * len(row["dice_per_seed"]), ".", color="0.3")
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("per-patient Dice (mean over test patients; dots: seeds)")
    ax.set_title(f"{result['phantom'].get('cohort', 'phantom')}: {result['test_patients']} test patients, "
                 f"seeds {result['plan']['seeds']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny cohort and models, 1 epoch: checks it runs.")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("dense_study"))
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="Stage-1 and baseline epochs (maximum with select).")
    parser.add_argument("--classification-epochs", type=int, default=None, help="Stage-0 epochs.")
    parser.add_argument("--crop", type=int, default=None, help="Side of the ingested crops and the model input (voxels).")
    parser.add_argument("--lesion-radius", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    parser.add_argument("--lesion-contrast", type=float, default=None, metavar="HU")
    parser.add_argument("--cohort", choices=("phantom", "real-ct"), default="phantom",
                        help="The phantom, or real chest CT with synthetic lesions (unicon_tf.data.real_ct).")
    parser.add_argument("--source", type=pathlib.Path, default=None,
                        help="--cohort real-ct: the pyradiomics 3.0.1 sdist (.tar.gz) or a folder of *_image.nrrd.")
    parser.add_argument("--width", type=int, default=None, help="Encoder width (channels of its first level).")
    parser.add_argument("--depth", type=int, default=None, help="Encoder levels.")
    parser.add_argument("--cohort-shape", type=int, default=None, help="Side of the generated CT grid (voxels).")
    parser.add_argument("--merge", type=pathlib.Path, nargs="+", default=None, metavar="JSON",
                        help="Join the results of runs that differ only in their seeds (one process per seed).")
    parser.add_argument("--stage-keys", type=json.loads, default={},
                        help="JSON of pipeline keys for every stage (e.g. model selection).")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    for key, value in (("seeds", args.seeds and tuple(args.seeds)), ("patients", args.patients),
                       ("epochs", args.epochs), ("crop", args.crop),
                       ("classification_epochs", args.classification_epochs), ("width", args.width),
                       ("depth", args.depth), ("cohort", args.cohort_shape)):
        if value:
            plan[key] = value
    if not args.merge and (args.cohort == "real-ct") != (args.source is not None):
        parser.error("--source goes with --cohort real-ct, and --cohort real-ct needs it")
    start = time.monotonic()

    def echo(message):
        print(f"[{(time.monotonic() - start) / 60:5.1f} min] {message}", flush=True)

    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
    else:
        result = measure(plan, args.arms, args.out, args.lesion_radius, args.lesion_contrast, args.stage_keys,
                         args.source, echo)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dense_study_{result['phantom'].get('cohort', args.cohort).replace('-', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    figure(result, stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
