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

Every fraction the experiments ran is compared (or those given with `--fraction`), each on
the (fold, seed) cells that every arm finished. Writes
`pretrained_study.json`, `.md` and `curves_<head>.png` (each arm's metric against the
fraction, with its 95% band) to `--out`. The whole study (cohort, two
experiments, this comparison) is `benchmarks/pretrained_study/run.sh`:

    python benchmarks/pretrained_study.py --out results/pretrained_study_real_ct --reference single_task \\
        --arm pretrained=exp_pretrained:continual --arm scratch=exp_scratch:continual \\
        --arm single_task=exp_scratch:single_task [--fraction 0.25 --fraction 1.0]
"""

import argparse
import json
import pathlib

import numpy as np

from unicon_tf.evaluate.scores import bootstrap_interval, patient_bootstrap, resampled_metric
from unicon_tf.tasks import task_kind


def read_cells(folder, arm, step_budget="epochs"):
    """`{fraction: {(fold, seed): cell record}}` of one arm of an experiment, under one step
    budget (`unicon-tf experiment --step-budget`: its fraction < 1 cells are `frac{f}-steps`)."""
    cells = {}
    for path in sorted(pathlib.Path(folder).glob(f"cells/fold*/seed*/frac*/{arm}/cell.json")):
        record = json.loads(path.read_text())
        if record["fraction"] < 1 and path.parent.parent.name.endswith("-steps") != (step_budget == "steps"):
            continue
        cells.setdefault(float(record["fraction"]), {})[(record["fold"], record["seed"])] = record
    if not cells:
        raise SystemExit(f"{folder}: no finished '{arm}' cell (cells/*/*/*/{arm}/cell.json)")
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
    lines = [f"Pretrained study: reference arm `{result['reference']}`; arms: "
             + ", ".join(f"`{n}` = {s}" for n, s in result["arms"].items()) + ".", ""]
    if "from_previous" in result:
        lines += [f"Fraction(s) {', '.join(result['from_previous']['fractions'])} as written in "
                  f"`{result['from_previous']['file']}` (cells not re-read).", ""]
    heads = sorted({h for table in result["fractions"].values() for h in table})
    for head in heads:
        rows_by_fraction = {f: t[head] for f, t in result["fractions"].items() if head in t}
        metric = next(iter(next(iter(rows_by_fraction.values())).values()))["metric"]
        lines += [f"**{head}** ({metric})", "",
                  f"| fraction | arm | {metric} | 95% CI | per seed | vs {result['reference']} (95% CI) | cells |",
                  "|---|---|---|---|---|---|---|"]
        for fraction, rows in rows_by_fraction.items():
            for name, row in rows.items():
                vs = row.get("vs_reference")
                shown = "-" if not vs or vs["difference"] is None else (
                    f"{vs['difference']:+.3f}" + (f" [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]" if vs["ci95"] else ""))
                lines.append(f"| {fraction} | {name} | {row['mean']:.3f} | [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] | "
                             f"{', '.join(f'{v:.3f}' for v in row['per_seed'].values())} | {shown} | {row['cells']} |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(result, out):
    """`curves_<head>.png`: each arm's metric against the training fraction, 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = sorted({h for table in result["fractions"].values() for h in table})
    for head in heads:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        arms = sorted({a for t in result["fractions"].values() for a in t.get(head, {})})
        for arm in arms:
            points = sorted((float(f), t[head][arm]) for f, t in result["fractions"].items() if arm in t.get(head, {}))
            x = [f for f, _ in points]
            axis.plot(x, [r["mean"] for _, r in points], marker="o", label=arm)
            axis.fill_between(x, [r["ci95"][0] for _, r in points], [r["ci95"][1] for _, r in points], alpha=0.15)
            metric = points[0][1]["metric"]
        axis.set_xlabel("fraction of the later stages' training patients")
        axis.set_ylabel(metric)
        axis.set_title(head)
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / f"curves_{head}.png", dpi=120)
        plt.close(figure)


def keep_previous(previous, compared, arms, args):
    """The fractions of an earlier result that `compared` does not hold (their cell records are
    gone; their numbers are kept as written).

    Raises:
        SystemExit: the earlier result has other arms, another reference or step budget.
    """
    if set(previous["arms"]) != arms or previous["reference"] != args.reference \
            or previous.get("step_budget", "epochs") != args.step_budget:
        raise SystemExit(f"{args.previous}: its arms {sorted(previous['arms'])}, reference "
                         f"{previous['reference']!r} and step budget {previous.get('step_budget')!r} are not this "
                         f"study's ({sorted(arms)}, {args.reference!r}, {args.step_budget!r})")
    return {f: table for f, table in previous["fractions"].items() if f not in compared}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=EXPERIMENT:ARM",
                        help="An arm: a name, an experiment folder and its arm (continual, single_task, ...).")
    parser.add_argument("--reference", required=True, help="The arm every other arm is compared with.")
    parser.add_argument("--fraction", type=float, action="append",
                        help="A training fraction to compare (repeat; default: every fraction the arms share).")
    parser.add_argument("--step-budget", choices=("epochs", "steps"), default="epochs",
                        help="Which fraction < 1 cells to read (the experiments' --step-budget).")
    parser.add_argument("--previous", type=pathlib.Path, metavar="JSON",
                        help="An earlier pretrained_study.json with the same arms and step budget: its fractions "
                             "that these cells do not hold are kept as written (listed under `from_previous`).")
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
    cells = {name: read_cells(folder, arm, args.step_budget) for name, (folder, arm) in specs.items()}
    fractions = sorted(args.fraction or set.intersection(*(set(c) for c in cells.values())))
    for name, by_fraction in cells.items():
        missing = [f for f in fractions if f not in by_fraction]
        if missing:
            parser.error(f"arm {name!r} has no finished cell at fraction(s) {missing}")
    compared = {}
    for f in fractions:  # like for like: the (fold, seed) cells every arm finished
        common = set.intersection(*(set(c[f]) for c in cells.values()))
        if not common:
            parser.error(f"fraction {f}: no (fold, seed) cell finished in every arm")
        compared[str(f)] = compare({n: {k: v for k, v in c[f].items() if k in common} for n, c in cells.items()},
                                   args.reference)
    kept = keep_previous(json.loads(args.previous.read_text()), compared, set(specs), args) if args.previous else {}
    result = {"reference": args.reference, "arms": {n: f"{f}:{a}" for n, (f, a) in specs.items()},
              "step_budget": args.step_budget,
              "fractions": dict(sorted({**compared, **kept}.items(), key=lambda item: float(item[0]))),
              **({"from_previous": {"file": str(args.previous), "fractions": sorted(kept, key=float)}} if kept else {})}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrained_study.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "pretrained_study.md").write_text(markdown(result))
    plot_curves(result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
