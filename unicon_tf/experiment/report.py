"""An experiment's `report/report.md`: tables of every aggregate and PNG figures.

- `curves_<task>.png`: per later task, the metric against the fraction of training
  patients, continual and single-task, mean with a 95% band, the single-task score on all
  training patients as a line and where the continual model reaches it;
- `matrix_fold<k>.png`: per fold, the continual stage x task matrix at the largest
  fraction, averaged over seeds.
"""

import pathlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from unicon_tf.evaluate.report import FIGURE_SIZE, _save, plot_matrix, plt
from unicon_tf.files import write_text_atomic

ARM_COLORS = {"continual": "tab:blue", "single_task": "tab:orange", "naive": "tab:red", "joint": "tab:green"}


def _num(value, fmt="{:.3f}"):
    return "-" if value is None else fmt.format(value)


def _interval(ci, fmt="{:.3f}"):
    return "-" if not ci else f"[{_num(ci[0], fmt)}, {_num(ci[1], fmt)}]"


def _p(value):
    return "-" if value is None else f"{value:.3g}"


def plot_fraction_curve(entry: Mapping[str, Any], path: pathlib.Path) -> str:
    """Metric against training fraction, continual and single-task, with 95% bands."""
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for arm, curve in entry["curves"].items():
        points = [c for c in curve if c["mean"] is not None]
        x = [c["fraction"] for c in points]
        ax.plot(x, [c["mean"] for c in points], "o-", color=ARM_COLORS[arm], label=f"{arm} (mean, n={points[0]['n']})"
                if points else arm)
        banded = [c for c in points if c["ci"]]
        if banded:
            ax.fill_between([c["fraction"] for c in banded], [c["ci"][0] for c in banded],
                            [c["ci"][1] for c in banded], color=ARM_COLORS[arm], alpha=0.2)
    reference = entry["reference"]
    if reference:
        ax.axhline(reference["mean"], color=ARM_COLORS["single_task"], linestyle="--",
                   label=f"single-task, all patients: {reference['mean']:.3f}")
        reached = entry["reached_at"]["fraction"]
        if reached is not None:
            ax.axvline(reached, color="gray", linestyle=":", label=f"continual reaches it at {reached:g}")
    ax.set_xlabel("fraction of the stage's training patients")
    ax.set_ylabel(entry["metric"])
    ax.set_title(f"{entry['task']}: data efficiency (95% bands across folds x seeds)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def mean_matrix(cells: Iterable[Mapping[str, Any]], fold: int, fraction: float) -> dict[str, Any]:
    """The continual matrix of a fold at a fraction, averaged over seeds (a matrix dict)."""
    chosen = [c for c in cells if c["arm"] == "continual" and c["fold"] == fold and c["fraction"] == fraction]
    stack = np.array([[[np.nan if v is None else v for v in row] for row in c["matrix"]] for c in chosen])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the cells above the diagonal are all NaN
        mean = np.nanmean(stack, axis=0)
    matrix = [[None if np.isnan(v) else float(v) for v in row] for row in mean]
    return {"matrix": matrix, "tasks": chosen[0]["tasks"], "main_metric": chosen[0]["main_metric"],
            "stages": chosen[0]["stages"], "split": "test",
            "kind": f"fold {fold}, fraction {fraction:g}, mean of {len(chosen)} seed(s)"}


def write_report(out: pathlib.Path | str, experiment: Mapping[str, Any],
                 cells: Sequence[Mapping[str, Any]]) -> pathlib.Path:
    """Write `<out>/report/report.md` and its figures; return its path."""
    folder = pathlib.Path(out) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    plan = experiment["plan"]
    lines = [f"# Experiment: {experiment['pipeline']}", "",
             f"{plan['folds']}-fold patient-level cross-validation over {experiment['patients']} patients "
             f"(stratified on label and event), seeds {list(plan['seeds'])}, fractions {list(plan['fractions'])} "
             f"of each later stage's training patients, arms {['continual'] + list(plan['baselines'])}. "
             "Intervals are 95%: Student-t across folds x seeds for means; for differences, t across folds "
             "(seeds averaged in a fold) and a patient-level paired bootstrap.", "",
             "## Scores (final model of each arm, test split)", "",
             "| fraction | task (metric) | arm | mean | SD | 95% CI | n |", "|---|---|---|---|---|---|---|"]
    for s in experiment["scores"]:
        lines.append(f"| {s['fraction']:g} | {s['task']} ({s['metric']}) | {s['arm']} | {_num(s['mean'])} | "
                     f"{_num(s['sd'])} | {_interval(s['ci'])} | {s['n']} |")
    lines += ["", "## Paired comparisons", "",
              "Each arm's selection rule is stated; a difference across different rules, or against a reference "
              "at chance level, is flagged and not claimed.", "",
              "| fraction | A | B | mean A-B | 95% CI (folds) | folds | t-test p | Wilcoxon p | "
              "bootstrap 95% CI | patient pairs | selection A / B | flags |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in experiment["comparisons"]:
        d = c["difference"]
        rules = " / ".join(", ".join(c[side].get("rules") or ["not recorded"]) for side in ("a", "b"))
        flags = "; ".join(f"**{flag}**" for flag in c.get("flags", [])) or "-"
        lines.append(f"| {c['fraction']:g} | {c['a']['arm']}: {c['a']['task']} | {c['b']['arm']}: {c['b']['task']} | "
                     f"{_num(d['mean'], '{:+.3f}')} | {_interval(d['ci'], '{:+.3f}')} | {c['fold_pairs']} | "
                     f"{_p(c['t_p'])} | {_p(c['wilcoxon_p'])} | {_interval(c['bootstrap']['ci'], '{:+.3f}')} | "
                     f"{c['bootstrap']['pairs']} | {rules} | {flags} |")
    if experiment["transfer"]:
        lines += ["", "## Forgetting and backward transfer", "",
                  "| fraction | arm | forgetting (95% CI) | BWT (95% CI) | average (95% CI) | n |",
                  "|---|---|---|---|---|---|"]
        for t in experiment["transfer"]:
            cells_text = [f"{_num(t[k]['mean'], '{:+.3f}')} {_interval(t[k]['ci'], '{:+.3f}')}"
                          for k in ("forgetting", "backward_transfer", "average")]
            lines.append(f"| {t['fraction']:g} | {t['arm']} | " + " | ".join(cells_text) + f" | {t['forgetting']['n']} |")
    lines += ["", "## Data efficiency", ""]
    for entry in experiment["data_efficiency"]:
        reached = entry["reached_at"]
        if reached:
            where = ("not reached" if reached["fraction"] is None else f"{reached['fraction']:g}")
            ci = ", ".join("not reached" if x is None else f"{x:g}" for x in reached["ci"])
            lines.append(f"- **{entry['task']}**: continual reaches the single-task {entry['metric']} on all "
                         f"training patients ({entry['reference']['mean']:.3f}) at fraction **{where}** "
                         f"(95% bootstrap interval over {reached['replicates']} fold-seed replicates: {ci}).")
        else:
            lines.append(f"- **{entry['task']}**: no single-task arm at fraction 1: no reference to reach.")
        name = plot_fraction_curve(entry, folder / f"curves_{entry['task']}.png")
        lines += ["", f"![{entry['task']}]({name})", ""]
    largest = max(plan["fractions"])
    lines += ["## Stage x task matrices per fold (continual, fraction " + f"{largest:g})", ""]
    for fold in sorted({c["fold"] for c in cells if c["arm"] == "continual" and c["fraction"] == largest}):
        name = plot_matrix(mean_matrix(cells, fold, largest), folder / f"matrix_fold{fold}.png")
        lines.append(f"![fold {fold}]({name})")
    lines += ["", "## Runs", "", "Every number comes from the cells in `experiment.json` (`cells`: arm, fold, "
              "seed, fraction, run folder, `cell.json` record)."]
    report = folder / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
