"""`report.md` with PNG figures: what a continual run did, to look at rather than read.

Figures (matplotlib, Agg backend, fixed pixel sizes):

- `matrix_<kind>.png`: the stage x task heatmap of the continual run and of each baseline;
- `learning_curves.png`: training and validation loss of every stage;
- `kaplan_meier.png`: survival of the test patients split at the median predicted risk;
- `overlay_<head>.png`: CT and PET slices through the lesion with the truth (green) and
  the prediction (red) contours, for each segmentation head;
- `pet_gain.png`: per-patient Dice of the CT+PET head against the CT-only ones.
"""


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sksurv.nonparametric import kaplan_meier_estimator  # noqa: E402

from unicon_tf.data import dataset  # noqa: E402
from unicon_tf.evaluate.matrix import as_array, summarize  # noqa: E402
from unicon_tf.evaluate.scores import paired_bootstrap  # noqa: E402
from unicon_tf.run import Run  # noqa: E402
from unicon_tf.train.metrics import METRIC_NAMES  # noqa: E402

FIGURE_SIZE = (8.0, 5.0)  # inches
DPI = 100  # so every figure is 800 x 500 pixels


def _save(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def plot_matrix(result, path):
    """Heatmap of a matrix dict (rows: after stage; columns: task)."""
    values = as_array(result["matrix"])
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(result["tasks"])), [f"{t}\n({METRIC_NAMES[m]})" for t, m in zip(result["tasks"], result["main_metric"])],
                  fontsize=8)
    ax.set_yticks(range(len(result["stages"])), [f"after {s}" for s in result["stages"]], fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_title(f"{result['kind']}: stage x task ({result['split']} split)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(records, path):
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


def plot_kaplan_meier(prediction, path):
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


def plot_overlays(prediction, path, patients=3):
    """CT (and PET) axial slices through the lesion, truth and prediction contours."""
    ds = dataset(prediction["data"], "test", task="segmentation", batch_size=64, shuffle=False, with_meta=True)
    images = {}
    for inputs, _, meta in ds:
        for k, pid in enumerate(meta["patient_id"].numpy()):
            images[pid.decode()] = {m: v[k, ..., 0].numpy() for m, v in inputs.items()}
    order = np.argsort([-np.sum(t > 0) for t in prediction["target"]])[:patients]
    columns = [m for m in ("ct", "pet") if m in next(iter(images.values()))]
    fig, axes = plt.subplots(len(order), len(columns), figsize=FIGURE_SIZE, squeeze=False)
    for row, index in enumerate(order):
        truth = prediction["target"][index]
        guess = np.argmax(prediction["output"][index], axis=-1)
        z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2
        for col, modality in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(images[prediction["patient_id"][index]][modality][:, :, z].T, cmap="gray", origin="lower")
            for mask, color in ((truth, "lime"), (guess, "red")):
                if (mask[:, :, z] > 0).any():
                    ax.contour((mask[:, :, z] > 0).T.astype(float), levels=[0.5], colors=color, linewidths=1)
            ax.set_title(f"{prediction['patient_id'][index]} {modality} z={z}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _table(result, fmt="{:.3f}"):
    header = "| after stage | " + " | ".join(f"{t} ({METRIC_NAMES[m]})" for t, m in
                                           zip(result["tasks"], result["main_metric"])) + " |"
    lines = [header, "|" + "---|" * (len(result["tasks"]) + 1)]
    for stage, row in zip(result["stages"], result["matrix"]):
        lines.append(f"| {stage} | " + " | ".join("" if v is None else fmt.format(v) for v in row) + " |")
    return lines


def pet_gain(continual, baselines):
    """Dice of the fused CT+PET head against the CT-only segmentation (continual and baseline).

    Each gain comes with a paired-bootstrap 95% interval over the test patients
    (`..._ci`) when both sides were scored on the same patients, whose per-patient Dice
    are then kept under `per_patient` (for `plot_pet_gain`).
    """
    kinds = dict(zip(continual["tasks"], continual["task_kinds"]))
    final = continual["matrix"][-1]
    values = dict(zip(continual["tasks"], final))
    fused = [h for h in continual["tasks"] if kinds[h] == "segmentation" and "pet" in h]
    ct_only = [h for h in continual["tasks"] if kinds[h] == "segmentation" and h not in fused]
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
        gain["ct_baseline_dice"] = single["matrix"][index][index]
        gain["gain_vs_ct_baseline"] = values[fused[0]] - gain["ct_baseline_dice"]
        _add_interval(gain, "gain_vs_ct_baseline", fused_metrics, single["metrics"][index][index],
                      f"{ct_only[0]} (single-task)")
    return gain


def _add_interval(gain, key, fused, reference, reference_name):
    """`gain[key + "_ci"]`: the paired bootstrap interval, if both were scored on the same patients."""
    ids = fused.get("patient_ids")
    if ids and ids == reference.get("patient_ids"):
        gain[key + "_ci"] = list(paired_bootstrap(fused["dice_per_patient"], reference["dice_per_patient"]))
        gain["per_patient"][gain["fused_head"]] = fused["dice_per_patient"]
        gain["per_patient"][reference_name] = reference["dice_per_patient"]


def plot_pet_gain(gain, path):
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


def format_gain(gain):
    """The PET gain as text lines, e.g. for the CLI and the report."""
    def interval(key):
        ci = gain.get(key + "_ci")
        return f" (95% CI {ci[0]:+.3f} to {ci[1]:+.3f}, paired bootstrap over {gain['patients']} patients)" if ci else ""

    lines = [f"Dice of {gain['fused_head']} (CT+PET) {gain['fused_dice']:.3f} vs {gain['ct_head']} (CT) "
             f"{gain['ct_dice']:.3f}: {gain['gain_vs_ct_head']:+.3f}" + interval("gain_vs_ct_head")]
    if "ct_baseline_dice" in gain:
        lines.append(f"vs the CT-only single-task baseline {gain['ct_baseline_dice']:.3f}: "
                     f"{gain['gain_vs_ct_baseline']:+.3f}" + interval("gain_vs_ct_baseline"))
    return lines


def _dice_lines(result):
    """Both Dice figures of every segmentation head on the final model (markdown lines)."""
    final = dict(zip(result["tasks"], result["metrics"][-1]))
    heads = [(t, final[t]) for t, kind in zip(result["tasks"], result["task_kinds"])
             if kind == "segmentation" and final[t] is not None and "dice_pooled" in final[t]]
    if not heads:
        return []
    lines = ["", "## Dice", "", f"| head | {METRIC_NAMES['dice']} | {METRIC_NAMES['dice_pooled']} |", "|---|---|---|"]
    lines += [f"| {head} | {m['dice']:.3f} | {m['dice_pooled']:.3f} |" for head, m in heads]
    return lines + ["", "The per-patient mean gives every patient the same weight (a missed small lesion "
                    "counts fully); pooled over voxels, large lesions dominate. The matrix and blessing use the "
                    "per-patient mean."]


def write_report(run_dir, continual, records, baselines=None):
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
    single = baselines.get("single_task")
    reference = [single["matrix"][j][j] for j in range(len(single["tasks"]))] if single else None
    if reference is not None and len(reference) != len(continual["tasks"]):
        reference = reference[: len(continual["tasks"])]
    summary = summarize(continual["matrix"], reference)
    lines = [f"# Continual run: {run_dir}", "", f"Evaluated on the `{continual['split']}` split of each stage's data.",
             "", "## Stage x task (continual)", "", *_table(continual), ""]
    lines.append("![continual](" + plot_matrix(continual, out / "matrix_continual.png") + ")")
    lines += ["", "## Summary", "", "| measure | value |", "|---|---|"]
    for key in ("average", "backward_transfer", "forgetting", "forward_transfer"):
        if summary.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | {summary[key]:+.4f} |")
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
        lines += ["", f"## Baseline: {kind}", "", *_table(result), "",
                  f"![{kind}](" + plot_matrix(result, out / f"matrix_{kind}.png") + ")"]
    lines += ["", "## Learning curves", "", "![curves](" + plot_learning_curves(records, out / "learning_curves.png") + ")"]
    for head, prediction in continual["predictions"].items():
        if prediction["task"] == "prognosis":
            lines += ["", f"## Kaplan-Meier ({head})", "",
                      "![km](" + plot_kaplan_meier(prediction, out / "kaplan_meier.png") + ")"]
        if prediction["task"] == "segmentation":
            lines += ["", f"## Segmentation overlays ({head})", "",
                      f"![{head}](" + plot_overlays(prediction, out / f"overlay_{head}.png") + ")"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report, summary, gain
