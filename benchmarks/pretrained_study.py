"""Pretrained study (issue 24 item 8): arms of different `unicon-tf experiment` runs compared
head by head on the same test patients, against one reference arm.

`unicon-tf experiment` compares a continual run with its baselines inside one experiment.
Comparing encoders (the pretrained frozen Astra I3ResNet-152 + heads against the
from-scratch CNN foundation and the single-task model) takes two experiments on the same
cohort with the same folds (same patients, `--fold-seed`, `--seeds`); this script pairs
their cells (fold, seed, fraction) and heads by patient id. Per head and arm:

- the main metric (AUC, C-index, per-patient Dice) averaged over the fold x seed test sets,
  with a 95% bootstrap interval over patients (each fold-seed set resampled);
- its mean per seed (over folds);
- the difference to the reference arm with its paired patient-bootstrap interval
  (`unicon_tf.evaluate.scores.patient_bootstrap`).

Writes `pretrained_study.json` and `.md` to `--out`. The whole study (cohort, two
experiments, this comparison) is `benchmarks/pretrained_study/run.sh`:

    python benchmarks/pretrained_study.py --out results/pretrained_study_real_ct --reference single_task \\
        --arm pretrained=exp_pretrained:continual --arm scratch=exp_scratch:continual \\
        --arm single_task=exp_scratch:single_task [--fraction 1.0]
"""

import argparse
import json
import pathlib

import numpy as np

from unicon_tf.evaluate.scores import bootstrap_interval, patient_bootstrap, resampled_metric
from unicon_tf.tasks import task_kind


def read_cells(folder, arm, fraction):
    """`{(fold, seed): cell record}` of one arm of an experiment at `fraction`."""
    cells = {}
    for path in sorted(pathlib.Path(folder).glob(f"cells/fold*/seed*/frac*/{arm}/cell.json")):
        record = json.loads(path.read_text())
        if abs(record["fraction"] - fraction) < 1e-9:
            cells[(record["fold"], record["seed"])] = record
    if not cells:
        raise SystemExit(f"{folder}: no finished '{arm}' cell at fraction {fraction} (cells/*/*/*/{arm}/cell.json)")
    return cells


def arm_scores(cells, head):
    """Mean metric, interval and per-seed means of one head over an arm's cells."""
    keys = sorted(k for k, c in cells.items() if head in c["predictions"])
    predictions = [cells[k]["predictions"][head] for k in keys]
    values = [p["value"] for p in predictions]

    def statistic(rows):
        return np.nanmean([resampled_metric(p, r) for p, r in zip(predictions, rows)], axis=0)

    low, high = bootstrap_interval(statistic, [len(p["patient_ids"]) for p in predictions], vectorized=True)
    seeds = sorted({seed for _, seed in keys})
    return {"task": predictions[0]["task"], "metric": task_kind(predictions[0]["task"]).main_metric,
            "mean": float(np.mean(values)), "ci95": [float(low), float(high)],
            "per_seed": {str(s): float(np.mean([v for (f, seed), v in zip(keys, values) if seed == s]))
                         for s in seeds},
            "cells": len(keys), "patients": len({pid for p in predictions for pid in p["patient_ids"]})}


def compare(arms, reference):
    """Per head: every arm's scores and its paired difference to `reference`."""
    heads = sorted({h for cells in arms.values() for c in cells.values() for h in c["predictions"]})
    table = {}
    for head in heads:
        rows = {}
        for name, cells in arms.items():
            if not any(head in c["predictions"] for c in cells.values()):
                continue
            rows[name] = arm_scores(cells, head)
            if name != reference and reference in arms:
                pairs = [(cells[k]["predictions"][head], arms[reference][k]["predictions"][head])
                         for k in sorted(cells) if k in arms[reference] and head in cells[k]["predictions"]
                         and head in arms[reference][k]["predictions"]]
                boot = patient_bootstrap(pairs)
                rows[name]["vs_reference"] = {
                    "difference": float(np.mean([a["value"] - b["value"] for a, b in pairs])) if pairs else None,
                    "ci95": boot["ci"], "patient_pairs": boot["pairs"]}
        table[head] = rows
    return table


def markdown(result):
    lines = [f"Pretrained study: reference arm `{result['reference']}`, fraction {result['fraction']}; arms: "
             + ", ".join(f"`{n}` = {s}" for n, s in result["arms"].items()) + ".", ""]
    for head, rows in result["table"].items():
        metric = next(iter(rows.values()))["metric"]
        lines += [f"**{head}** ({metric})", "",
                  f"| arm | {metric} | 95% CI | per seed | vs {result['reference']} (95% CI) | cells |",
                  "|---|---|---|---|---|---|"]
        for name, row in rows.items():
            vs = row.get("vs_reference")
            shown = "-" if not vs or vs["difference"] is None else (
                f"{vs['difference']:+.3f}" + (f" [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]" if vs["ci95"] else ""))
            lines.append(f"| {name} | {row['mean']:.3f} | [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] | "
                         f"{', '.join(f'{v:.3f}' for v in row['per_seed'].values())} | {shown} | {row['cells']} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=EXPERIMENT:ARM",
                        help="An arm: a name, an experiment folder and its arm (continual, single_task, ...).")
    parser.add_argument("--reference", required=True, help="The arm every other arm is compared with.")
    parser.add_argument("--fraction", type=float, default=1.0, help="The training fraction compared.")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    specs = {}
    for entry in args.arm:
        name, _, where = entry.partition("=")
        folder, _, arm = where.rpartition(":")
        if not (name and folder and arm):
            parser.error(f"--arm {entry!r}: expected NAME=EXPERIMENT:ARM")
        specs[name] = (folder, arm)
    if args.reference not in specs:
        parser.error(f"--reference {args.reference!r} is not one of the arms {sorted(specs)}")
    arms = {name: read_cells(folder, arm, args.fraction) for name, (folder, arm) in specs.items()}
    result = {"reference": args.reference, "fraction": args.fraction,
              "arms": {n: f"{f}:{a}" for n, (f, a) in specs.items()}, "table": compare(arms, args.reference)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrained_study.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "pretrained_study.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
