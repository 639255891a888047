"""`report.md` with PNG figures: what a continual run did, to look at rather than read.

Figures (matplotlib, Agg backend, fixed pixel sizes):

- `matrix_<kind>.png`: the stage x task heatmap of the continual run and of each baseline;
- `learning_curves.png`: training and validation loss of every stage;
- `kaplan_meier.png`: survival of the test patients split at the median predicted risk;
- `overlay_<head>.png`: CT and PET slices through the lesion with the truth (green) and
  the prediction (red) contours, for each segmentation head: the best- and the
  worst-scoring test patients (per-patient Dice);
- `pet_gain.png`: per-patient Dice of the CT+PET head against the CT-only ones.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sksurv.nonparametric import kaplan_meier_estimator  # noqa: E402

from unicon_tf.data import dataset  # noqa: E402
from unicon_tf.evaluate.matrix import as_array, summarize  # noqa: E402
from unicon_tf.evaluate.scores import paired_bootstrap, paired_difference  # noqa: E402
from unicon_tf.train.selection import describe_rule, rule_key  # noqa: E402
from unicon_tf.run import Run  # noqa: E402
from unicon_tf.tasks import TASKS, metric_name, task_kind  # noqa: E402

FIGURE_SIZE = (8.0, 5.0)  # inches
DPI = 100  # so every figure is 800 x 500 pixels


def _save(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def plot_matrix(result: Mapping[str, Any], path: pathlib.Path) -> str:
    """Heatmap of a matrix dict (rows: after stage; columns: task)."""
    values = as_array(result["matrix"])
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(result["tasks"])), [f"{t}\n({metric_name(m)})" for t, m in zip(result["tasks"], result["main_metric"])],
                  fontsize=8)
    ax.set_yticks(range(len(result["stages"])), [f"after {s}" for s in result["stages"]], fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_title(f"{result['kind']}: stage x task ({result['split']} split)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(records: Sequence[Mapping[str, Any]], path: pathlib.Path) -> str:
    """Loss and validation loss per epoch of every stage, one panel each."""
    fig, axes = plt.subplots(1, len(records), figsize=FIGURE_SIZE, squeeze=False)
    for ax, record in zip(axes[0], records):
        history = record["history"]
        epochs = range(1, len(history) + 1)
        for key, style in (("loss", "-"), ("val_loss", "--")):
            if history and key in history[0]:
                ax.plot(epochs, [h[key] for h in history], style, label=key)
        ax.set_title(record["stage"], fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_kaplan_meier(prediction: Mapping[str, Any], path: pathlib.Path) -> str:
    """Kaplan-Meier curves of the high- and low-risk halves (split at the median risk)."""
    survival, risk = prediction["target"], np.asarray(prediction["output"]).reshape(-1)
    high = risk > np.median(risk)
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for group, label in ((~high, "risk <= median"), (high, "risk > median")):
        if group.any():
            times, probability = kaplan_meier_estimator(survival[group, 1].astype(bool), survival[group, 0])
            ax.step(np.r_[0.0, times], np.r_[1.0, probability], where="post", label=f"{label} (n={group.sum()})")
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.05)
    ax.set_title("Kaplan-Meier by predicted risk (test split)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def overlay_patients(dice: Sequence[float] | np.ndarray, patients: int = 2) -> list[tuple[int, str]]:
    """`[(position, label)]`: the `patients` best- and worst-scoring patients by per-patient
    Dice (best first, then worst from the lowest up), each once.

    Example:
    >>> overlay_patients([0.9, 0.1, 0.5, 0.7, 0.0], patients=2)
    [(0, 'best'), (3, 'best'), (4, 'worst'), (1, 'worst')]
    """
    order = sorted(range(len(dice)), key=lambda i: (-dice[i], i))
    best = order[:patients]
    worst = [i for i in reversed(order) if i not in best][:patients]
    return [(i, "best") for i in best] + [(i, "worst") for i in worst]


def plot_overlays(prediction: Mapping[str, Any], path: pathlib.Path, patients: int = 2) -> str:
    """CT (and PET) axial slices through the lesion, truth (green) and prediction (red)
    contours, for the `patients` best- and worst-scoring test patients (per-patient Dice)."""
    ds = dataset(prediction["data"], "test", task=prediction["task"], batch_size=64, shuffle=False, with_meta=True)
    images = {}
    for inputs, _, meta in ds:
        for k, pid in enumerate(meta["patient_id"].numpy()):
            images[pid.decode()] = {m: v[k, ..., 0].numpy() for m, v in inputs.items()}
    dice = task_kind(prediction["task"]).scores(prediction["target"], prediction["output"])["dice_per_patient"]
    chosen = overlay_patients(dice, patients)
    columns = [m for m in ("ct", "pet") if m in next(iter(images.values()))]
    fig, axes = plt.subplots(len(chosen), len(columns), figsize=FIGURE_SIZE, squeeze=False)
    for row, (index, rank) in enumerate(chosen):
        truth = prediction["target"][index]
        guess = np.argmax(prediction["output"][index], axis=-1)
        z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2
        for col, modality in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(images[prediction["patient_id"][index]][modality][:, :, z].T, cmap="gray", origin="lower")
            for mask, color in ((truth, "lime"), (guess, "red")):
                if (mask[:, :, z] > 0).any():
                    ax.contour((mask[:, :, z] > 0).T.astype(float), levels=[0.5], colors=color, linewidths=1)
            ax.set_title(f"{rank}: {prediction['patient_id'][index]} Dice {dice[index]:.2f} {modality} z={z}",
                         fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


FIGURES = {
    "kaplan_meier": ("## Kaplan-Meier ({head})", "km", plot_kaplan_meier, "kaplan_meier.png"),
    "overlays": ("## Segmentation overlays ({head}): best and worst test patients", "{head}", plot_overlays,
                 "overlay_{head}.png"),
}
"""A task kind's `figure` -> (heading, alt text, `plot(prediction, path)`, file name) in the report."""


def _table(result, fmt="{:.3f}"):
    header = "| after stage | " + " | ".join(f"{t} ({metric_name(m)})" for t, m in
                                           zip(result["tasks"], result["main_metric"])) + " |"
    lines = [header, "|" + "---|" * (len(result["tasks"]) + 1)]
    for stage, row in zip(result["stages"], result["matrix"]):
        lines.append(f"| {stage} | " + " | ".join("" if v is None else fmt.format(v) for v in row) + " |")
    return lines


def format_rules(result: Mapping[str, Any]) -> str | None:
    """`selection: <task> <rule>; ...`: the rule that kept each task's model of an
    evaluated arm (`evaluate_run`'s or `evaluate_baselines`' dict), or None if unrecorded."""
    records = result.get("selection")
    if records is None:
        return None
    return "selection: " + "; ".join(f"{task} {describe_rule(record)}"
                                     for task, record in zip(result["tasks"], records))


def comparisons(continual: Mapping[str, Any],
                baselines: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each task's model against its single-task baseline, like for like or flagged.

    The continual value is the task's score after its own stage (the matrix diagonal, as
    forward transfer takes it). A difference is claimed only when both arms were selected
    by the same rule (`unicon_tf.train.selection.rule_key`) and the baseline is better
    than chance on the test split (`at_chance` of `unicon_tf.evaluate.scores.head_metrics`).

    Args:
        continual: `evaluate_run`'s result.
        baselines: `{kind: matrix dict}`; only `single_task` is compared.

    Returns:
        A list, one dict per task: `task`, `metric`, `continual`, `baseline`, `rules`
        (`{arm: describe_rule}`), `same_rule`, `continual_at_chance`, `baseline_at_chance`,
        `difference`, `ci` (paired bootstrap over patients), `pairs` and `claimed`
        (whether the difference may be read as a gain or loss), `flags` (why not).
    """
    single = baselines.get("single_task")
    if not single:
        return []
    rows = []
    for j, task in enumerate(continual["tasks"]):
        if task not in single["tasks"]:
            continue
        b = single["tasks"].index(task)
        ours, theirs = continual["metrics"][j][j], single["metrics"][b][b]
        own_rule = (continual.get("selection") or [None] * (j + 1))[j]
        base_rule = (single.get("selection") or [None] * (b + 1))[b]
        kind, metric = continual["task_kinds"][j], continual["main_metric"][j]
        row = {"task": task, "metric": metric, "continual": continual["matrix"][j][j],
               "baseline": single["matrix"][b][b],
               "rules": {"continual": describe_rule(own_rule), "single_task": describe_rule(base_rule)},
               "same_rule": rule_key(own_rule) == rule_key(base_rule),
               "continual_at_chance": ours.get("at_chance"), "baseline_at_chance": theirs.get("at_chance"),
               "difference": None, "ci": None, "pairs": 0, "flags": []}
        if row["continual"] is not None and row["baseline"] is not None:
            compared = paired_difference(kind, ours, theirs)
            row.update(difference=compared["difference"], ci=compared["ci"], pairs=compared["pairs"])
        if not row["same_rule"]:
            row["flags"].append("NOT like-for-like: the arms were selected by different rules")
        for arm, metrics in (("single-task baseline", theirs), ("continual model", ours)):
            if metrics.get("at_chance"):
                low, high = metrics["interval"]
                row["flags"].append(f"{arm} at chance level (95% CI {low:.3f} to {high:.3f} reaches "
                                    f"{metrics['chance']:.3f})")
        row["claimed"] = row["same_rule"] and not theirs.get("at_chance") and row["difference"] is not None
        rows.append(row)
    return rows


def format_comparisons(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """`comparisons`' rows as text lines (CLI and report), each arm's rule stated."""
    lines = []
    for row in rows:
        name = metric_name(row["metric"])
        ci = (f" (95% CI {row['ci'][0]:+.3f} to {row['ci'][1]:+.3f}, paired bootstrap over {row['pairs']} patients)"
              if row["ci"] else "")
        diff = ("" if row["difference"] is None else
                f": {row['difference']:+.3f}{ci}" if row["claimed"] else ": no gain or loss claimed")
        value = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{row['task']} ({name}): continual {value(row['continual'])} "
                     f"[{row['rules']['continual']}] vs single-task {value(row['baseline'])} "
                     f"[{row['rules']['single_task']}]{diff}"
                     + "".join(f"; {flag}" for flag in row["flags"]))
    return lines


def pet_gain(continual: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Dice of the fused CT+PET head against the CT-only segmentation (continual and baseline).

    Each gain comes with a paired-bootstrap 95% interval over the test patients
    (`..._ci`) when both sides were scored on the same patients, whose per-patient Dice
    are then kept under `per_patient` (for `plot_pet_gain`).
    """
    kinds = dict(zip(continual["tasks"], continual["task_kinds"]))
    final = continual["matrix"][-1]
    values = dict(zip(continual["tasks"], final))
    fused = [h for h in continual["tasks"] if task_kind(kinds[h]).dense and "pet" in h]
    ct_only = [h for h in continual["tasks"] if task_kind(kinds[h]).dense and h not in fused]
    if not fused or not ct_only:
        return None
    final_metrics = dict(zip(continual["tasks"], continual["metrics"][-1]))
    fused_metrics = final_metrics[fused[0]]
    gain = {"fused_head": fused[0], "ct_head": ct_only[0], "fused_dice": values[fused[0]],
            "ct_dice": values[ct_only[0]], "gain_vs_ct_head": values[fused[0]] - values[ct_only[0]],
            "patients": fused_metrics.get("patients"), "per_patient": {}}
    _add_interval(gain, "gain_vs_ct_head", fused_metrics, final_metrics[ct_only[0]], f"{ct_only[0]} (continual)")
    single = baselines.get("single_task")
    if single:
        index = single["tasks"].index(ct_only[0])
        rules = continual.get("selection") or [None] * len(continual["tasks"])
        fused_rule = rules[continual["tasks"].index(fused[0])]
        base_rule = (single.get("selection") or [None] * (index + 1))[index]
        base_metrics = single["metrics"][index][index]
        gain["ct_baseline_dice"] = single["matrix"][index][index]
        gain["rules"] = {"fused": describe_rule(fused_rule), "ct_baseline": describe_rule(base_rule)}
        gain["flags"] = [] if rule_key(fused_rule) == rule_key(base_rule) else [
            "NOT like-for-like: the arms were selected by different rules"]
        if base_metrics.get("at_chance"):
            gain["flags"].append("the CT-only single-task baseline is at chance level")
        if not gain["flags"]:
            gain["gain_vs_ct_baseline"] = values[fused[0]] - gain["ct_baseline_dice"]
            _add_interval(gain, "gain_vs_ct_baseline", fused_metrics, base_metrics, f"{ct_only[0]} (single-task)")
    return gain


def _add_interval(gain, key, fused, reference, reference_name):
    """`gain[key + "_ci"]`: the paired bootstrap interval, if both were scored on the same patients."""
    ids = fused.get("patient_ids")
    if ids and ids == reference.get("patient_ids"):
        gain[key + "_ci"] = list(paired_bootstrap(fused["dice_per_patient"], reference["dice_per_patient"]))
        gain["per_patient"][gain["fused_head"]] = fused["dice_per_patient"]
        gain["per_patient"][reference_name] = reference["dice_per_patient"]


def plot_pet_gain(gain: Mapping[str, Any], path: pathlib.Path) -> str:
    """Per-patient Dice of the CT+PET head against each CT-only reference (above the diagonal: PET helped)."""
    fused = gain["per_patient"][gain["fused_head"]]
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    ax.plot([0, 1], [0, 1], color="gray", linewidth=1)
    for (name, dice), marker in zip([(k, v) for k, v in gain["per_patient"].items() if k != gain["fused_head"]], "o^s"):
        ax.scatter(dice, fused, marker=marker, alpha=0.7, label=f"CT only: {name}, mean {np.mean(dice):.3f}")
    ax.set_xlabel("Dice, CT only")
    ax.set_ylabel(f"Dice, {gain['fused_head']} (CT+PET, mean {np.mean(fused):.3f})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"PET gain per test patient (n={len(fused)})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def format_gain(gain: Mapping[str, Any]) -> list[str]:
    """The PET gain as text lines, e.g. for the CLI and the report."""
    def interval(key):
        ci = gain.get(key + "_ci")
        return f" (95% CI {ci[0]:+.3f} to {ci[1]:+.3f}, paired bootstrap over {gain['patients']} patients)" if ci else ""

    lines = [f"Dice of {gain['fused_head']} (CT+PET) {gain['fused_dice']:.3f} vs {gain['ct_head']} (CT) "
             f"{gain['ct_dice']:.3f}: {gain['gain_vs_ct_head']:+.3f}" + interval("gain_vs_ct_head")]
    if "ct_baseline_dice" in gain:
        rules = f" [{gain['rules']['fused']} vs {gain['rules']['ct_baseline']}]"
        if gain["flags"]:
            lines.append(f"vs the CT-only single-task baseline {gain['ct_baseline_dice']:.3f}{rules}: no gain "
                         "claimed; " + "; ".join(gain["flags"]))
        else:
            lines.append(f"vs the CT-only single-task baseline {gain['ct_baseline_dice']:.3f}: "
                         f"{gain['gain_vs_ct_baseline']:+.3f}" + interval("gain_vs_ct_baseline") + rules)
    return lines


def _dice_lines(result):
    """Both Dice figures of every segmentation head on the final model (markdown lines)."""
    final = dict(zip(result["tasks"], result["metrics"][-1]))
    heads = [(t, final[t]) for t in result["tasks"] if final[t] is not None and "dice_pooled" in final[t]]
    if not heads:
        return []
    lines = ["", "## Dice", "", f"| head | {metric_name('dice')} | {metric_name('dice_pooled')} |", "|---|---|---|"]
    lines += [f"| {head} | {m['dice']:.3f} | {m['dice_pooled']:.3f} |" for head, m in heads]
    return lines + ["", "The per-patient mean gives every patient the same weight (a missed small lesion "
                    "counts fully); pooled over voxels, large lesions dominate. The matrix and blessing use the "
                    "per-patient mean."]


def _selection_row(stage, record, validation):
    """A markdown row of the model-selection table: the rule, the epoch kept, the
    validation split's size and the stage's own head on it (flagged at chance level)."""
    record = record or {}
    value = "-"
    if validation and validation.get("interval"):
        metric = next(kind.main_metric for kind in TASKS.values() if kind.main_metric in validation)
        low, high = validation["interval"]
        value = f"{metric_name(metric)} {validation[metric]:.3f} ({low:.3f} to {high:.3f})"
    chance = "-" if not validation or validation.get("at_chance") is None else (
        f"**yes** (chance {validation['chance']:.3f})" if validation["at_chance"] else "no")
    epoch = f"{record.get('epoch', '-')} of {record.get('epochs_run', '-')}"
    return (f"| {stage} | {describe_rule(record or None)} | {epoch} | {record.get('val_patients', '-')} | {value} | "
            f"{chance} |")


def write_report(run_dir: pathlib.Path | str, continual: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                 baselines: Mapping[str, Mapping[str, Any]] | None = None,
                 ) -> tuple[pathlib.Path, dict[str, Any], dict[str, Any] | None]:
    """Write `<run>/report/report.md` and its figures.

    Args:
        run_dir: the run directory.
        continual: `evaluate_run`'s result (with `predictions`).
        records: the stages' records (stage.json contents, `Run.stage_records`).
        baselines: `{kind: matrix dict}` of evaluated baselines (optional).

    Returns:
        `(report, summary, gain)`: the path of report.md; `summarize`'s dict of the
        continual matrix, with forward transfer when a single-task baseline is given;
        `pet_gain`'s dict, or None when the run has no CT+PET head.
    """
    baselines = baselines or {}
    out = Run(run_dir).report_dir
    out.mkdir(parents=True, exist_ok=True)
    compared = comparisons(continual, baselines)
    claimed = {row["task"]: row["baseline"] for row in compared if row["claimed"]}
    reference = [claimed.get(task) for task in continual["tasks"]] if compared else None
    summary = summarize(continual["matrix"], reference)
    lines = [f"# Continual run: {run_dir}", "", f"Evaluated on the `{continual['split']}` split of each stage's data.",
             "", "## Stage x task (continual)", "", *_table(continual), "", format_rules(continual) or "", ""]
    lines.append("![continual](" + plot_matrix(continual, out / "matrix_continual.png") + ")")
    lines += ["", "## Summary", "", "| measure | value |", "|---|---|"]
    for key in ("average", "backward_transfer", "forgetting", "forward_transfer"):
        if summary.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | {summary[key]:+.4f} |")
    if compared:
        lines += ["", "## Against the single-task baselines", "",
                  "Each task after its own stage against its single-task model, with the rule each arm's epoch "
                  "was selected by. A difference is claimed (and enters forward transfer) only when both arms "
                  "follow the same rule and the baseline is better than chance.", "",
                  *[f"- {line}" for line in format_comparisons(compared)]]
    lines += ["", "## Model selection", "", "| stage | rule | kept epoch | validation patients | "
              "validation metric (95% CI) | at chance on validation |", "|---|---|---|---|---|---|"]
    for stage, record, validation in zip(continual["stages"], continual.get("selection") or [],
                                         continual.get("validation") or []):
        lines.append(_selection_row(stage, record, validation))
    gain = pet_gain(continual, baselines)
    if gain:
        lines += ["", "## PET", "", *[f"- {line}" for line in format_gain(gain)]]
        if gain["per_patient"]:
            lines += ["", "![pet gain](" + plot_pet_gain(gain, out / "pet_gain.png") + ")"]
    lines += _dice_lines(continual)
    lines += ["", "## Blessing", "", "Judged on each head's main metric: AUC, C-index, and for segmentation the "
              "per-patient mean Dice (not the pooled one)."]
    for blessing in continual["blessing"]:
        lines.append(f"- **{blessing['stage']}**: {'blessed' if blessing['blessed'] else 'NOT blessed'}; "
                     + "; ".join(blessing["reasons"]))
    for kind, result in baselines.items():
        lines += ["", f"## Baseline: {kind}", "", *_table(result), "", format_rules(result) or "", "",
                  f"![{kind}](" + plot_matrix(result, out / f"matrix_{kind}.png") + ")"]
    lines += ["", "## Learning curves", "", "![curves](" + plot_learning_curves(records, out / "learning_curves.png") + ")"]
    for head, prediction in continual["predictions"].items():
        figure = task_kind(prediction["task"]).figure
        if figure is not None:
            title, alt, plot, file = (text.format(head=head) if isinstance(text, str) else text
                                      for text in FIGURES[figure])
            lines += ["", title, "", f"![{alt}](" + plot(prediction, out / file) + ")"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report, summary, gain
