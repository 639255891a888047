"""What an experiment's cells say, with their uncertainty.

Every cell (arm, fold, seed, fraction) gives each task its *final* score: the last value
in the task's column of the arm's stage x task matrix (the continual and naive runs: after
the last stage; single-task: the task's own model; joint: the multi-task model).

- `scores`: per fraction, arm and task, the mean, the standard deviation and a 95%
  Student-t interval of the mean across the K x S fold-seed replicates;
- `comparisons`: continual against each baseline, and a CT+PET head against the
  CT-only head of the same task kind (same arm), per fraction and task: the mean
  difference with a t interval, a paired t-test and a Wilcoxon signed-rank test across
  folds (seeds averaged within a fold: K pairs), and a patient-level paired bootstrap
  (patients resampled within each fold-seed test set, the metric recomputed on both arms,
  the difference averaged over fold-seeds: as many pairs as test patients x seeds); each
  side's selection rules (`unicon_tf.train.selection.rule_name`), and `claimed`: False,
  with `flags` saying why, when the two arms were selected by different rules or the
  reference (AUC, C-index) is at chance level (its 95% interval across folds reaches 0.5);
- `transfer`: per fraction and arm (continual, naive), forgetting and backward transfer
  (`unicon_tf.evaluate.matrix.summarize`) with their intervals;
- `data_efficiency`: per later task, the continual and single-task scores at each
  fraction, and the smallest fraction at which the continual mean reaches the
  single-task mean on all training patients, with a bootstrap interval over replicates.

Example:
>>> summary_interval([0.70, 0.74, 0.72])["ci"]  # doctest: +ELLIPSIS
[0.67..., 0.769...]
"""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from unicon_tf.evaluate.matrix import summarize
from unicon_tf.tasks import task_kind
from unicon_tf.train.selection import rule_key, rule_name
from unicon_tf.evaluate.scores import bootstrap_interval, patient_bootstrap, resampled_metric  # noqa: F401

if TYPE_CHECKING:
    from unicon_tf.experiment.runner import ExperimentPlan

LEVEL = 0.95


def summary_interval(values: Sequence[float | None], level: float = LEVEL) -> dict[str, Any]:
    """`{"n", "mean", "sd", "ci"}` of the defined values: the Student-t interval of the mean
    (None where it needs two values)."""
    v = np.array([x for x in values if x is not None and not np.isnan(x)], np.float64)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None}
    mean = float(v.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci": None}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Paired t-test and Wilcoxon signed-rank test (two-sided) of `a` against `b`:
    `{"t_p", "wilcoxon_p"}`, None where undefined (fewer than 2 pairs; the t-test when the
    differences have no spread, Wilcoxon's when they are all zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a - b
    if len(d) < 2:
        return {"t_p": None, "wilcoxon_p": None}
    spread = not np.allclose(d, d[0], rtol=0, atol=1e-12)
    return {"t_p": float(stats.ttest_rel(a, b).pvalue) if spread else None,
            "wilcoxon_p": None if np.allclose(d, 0, rtol=0, atol=1e-12) else float(stats.wilcoxon(d).pvalue)}


def aggregate(cells: Sequence[Mapping[str, Any]], plan: "ExperimentPlan", resamples: int = 2000) -> dict[str, Any]:
    """`{"scores", "comparisons", "transfer", "data_efficiency"}` of an experiment's cells.

    Args:
        cells: cell records (`arm`, `fold`, `seed`, `fraction`, `tasks`, `task_kinds`,
            `modalities`, `matrix`, `final`, `predictions`, `run`).
        plan: the `ExperimentPlan`.
        resamples: bootstrap resamples.
    """
    index = {(c["arm"], c["fold"], c["seed"], c["fraction"]): c for c in cells}
    reference = next(c for c in cells if c["arm"] == "continual")
    tasks, kinds = reference["tasks"], dict(zip(reference["tasks"], reference["task_kinds"]))
    replicates = [(k, s) for k in range(plan.folds) for s in plan.seeds]

    def final(arm, fraction, task):
        return [(k, s, index[arm, k, s, fraction]["final"].get(task)) for k, s in replicates
                if (arm, k, s, fraction) in index]

    scores = []
    for fraction in plan.fractions:
        for arm in plan.arms:
            for task in tasks:
                values = final(arm, fraction, task)
                scores.append({"fraction": fraction, "arm": arm, "task": task, "metric": task_kind(kinds[task]).main_metric,
                               **summary_interval([v for _, _, v in values]),
                               "values": [{"fold": k, "seed": s, "value": v,
                                           "run": index[arm, k, s, fraction]["run"]} for k, s, v in values]})

    comparisons = []
    for fraction in plan.fractions:
        for baseline in plan.arms[1:]:
            for task in tasks:
                comparisons.append(_compare(index, replicates, fraction, ("continual", task), (baseline, task),
                                            resamples, plan.folds))
        for arm in plan.arms:
            modalities = reference.get("modalities", {})
            for fused in tasks:
                for ct in tasks:
                    if (ct != fused and kinds[ct] == kinds[fused] and len(modalities.get(fused, [])) > 1
                            and set(modalities.get(ct, [])) < set(modalities[fused])):
                        comparisons.append(_compare(index, replicates, fraction, (arm, fused), (arm, ct),
                                                    resamples, plan.folds))

    transfer = []
    for fraction in plan.fractions:
        for arm in plan.arms:
            summaries = [summarize(index[arm, k, s, fraction]["matrix"]) for k, s in replicates
                         if (arm, k, s, fraction) in index and len(index[arm, k, s, fraction]["matrix"]) == len(tasks)
                         and len(tasks) > 1 and arm in ("continual", "naive")]
            if summaries:
                transfer.append({"fraction": fraction, "arm": arm,
                                 **{key: summary_interval([s[key] for s in summaries])
                                    for key in ("forgetting", "backward_transfer", "average")}})

    return {"scores": scores, "comparisons": comparisons, "transfer": transfer,
            "data_efficiency": [_data_efficiency(final, plan, task, kinds[task], resamples) for task in tasks[1:]]}


def _compare(index, replicates, fraction, first, second, resamples, folds):
    """One paired comparison of `(arm, task)` against `(arm, task)` at a fraction."""
    (arm_a, task_a), (arm_b, task_b) = first, second
    present = [(k, s) for k, s in replicates if (arm_a, k, s, fraction) in index and (arm_b, k, s, fraction) in index]
    per_fold = {}
    for k, s in present:
        a, b = index[arm_a, k, s, fraction]["final"].get(task_a), index[arm_b, k, s, fraction]["final"].get(task_b)
        if a is not None and b is not None and not np.isnan(a) and not np.isnan(b):
            per_fold.setdefault(k, []).append((a, b))
    fold_a = [float(np.mean([a for a, _ in v])) for _, v in sorted(per_fold.items())]
    fold_b = [float(np.mean([b for _, b in v])) for _, v in sorted(per_fold.items())]
    pairs = [(index[arm_a, k, s, fraction]["predictions"][task_a], index[arm_b, k, s, fraction]["predictions"][task_b])
             for k, s in present if task_a in index[arm_a, k, s, fraction].get("predictions", {})
             and task_b in index[arm_b, k, s, fraction].get("predictions", {})]
    difference = summary_interval([a - b for a, b in zip(fold_a, fold_b)])
    rules = {side: sorted({rule_name(_rule(index[arm, k, s, fraction], task)) for k, s in present})
             for side, (arm, task) in (("a", first), ("b", second))}
    keys = {side: {rule_key(_rule(index[arm, k, s, fraction], task)) for k, s in present}
            for side, (arm, task) in (("a", first), ("b", second))}
    like = len(keys["a"] | keys["b"]) <= 1
    kind = next((c["task_kinds"][c["tasks"].index(task_b)] for c in index.values()
                 if task_b in c.get("tasks", []) and "task_kinds" in c), None)
    b_scores = summary_interval(fold_b)
    chance = None if kind is None else task_kind(kind).constant_chance
    at_chance = chance is not None and b_scores["ci"] is not None and b_scores["ci"][0] <= chance
    flags = ([] if like else ["NOT like-for-like: the arms were selected by different rules"]) + (
        [f"{arm_b}: {task_b} at chance level (95% CI of its fold means reaches {chance})"] if at_chance else [])
    return {"fraction": fraction, "a": {"arm": arm_a, "task": task_a, "rules": rules["a"]},
            "b": {"arm": arm_b, "task": task_b, "rules": rules["b"]},
            "kind": "modality" if arm_a == arm_b else "arm", "difference": difference,
            "fold_pairs": len(fold_a), **paired_tests(fold_a, fold_b),
            "bootstrap": patient_bootstrap(pairs, resamples=resamples),
            "like_for_like": like, "b_at_chance": at_chance, "claimed": like and not at_chance, "flags": flags}


def _rule(cell, task):
    """The selection record of the model that holds `task` in a cell (None when unrecorded)."""
    selection = cell.get("selection") or []
    tasks = cell.get("tasks") or []
    return selection[tasks.index(task)] if task in tasks and tasks.index(task) < len(selection) else None


def _data_efficiency(final, plan, task, kind, resamples):
    """Continual and single-task scores of a later task per fraction, and where continual
    reaches the single-task score on all training patients."""
    curves = {arm: [{"fraction": f, **summary_interval([v for _, _, v in final(arm, f, task)])} for f in plan.fractions]
              for arm in ("continual", "single_task") if arm in plan.arms}
    entry = {"task": task, "metric": task_kind(kind).main_metric, "curves": curves, "reference": None, "reached_at": None}
    if "single_task" not in plan.arms or 1.0 not in plan.fractions:
        return entry
    reference = {(k, s): v for k, s, v in final("single_task", 1.0, task) if v is not None}
    continual = {f: {(k, s): v for k, s, v in final("continual", f, task) if v is not None} for f in plan.fractions}
    replicates = [r for r in reference if all(r in continual[f] for f in plan.fractions)]
    if not replicates:
        return entry
    table = np.array([[continual[f][r] for f in plan.fractions] for r in replicates])  # replicate x fraction
    target = np.array([reference[r] for r in replicates])
    fractions = np.array(plan.fractions + (np.inf,))

    def crossing(rows):
        means = table[rows[0]].mean(axis=0)
        reached = np.flatnonzero(means >= target[rows[0]].mean())
        return float(fractions[reached[0]] if len(reached) else np.inf)

    everyone = np.arange(len(replicates))
    estimate = crossing([everyone])
    low, high = bootstrap_interval(crossing, [len(replicates)], resamples=resamples, method="nearest")
    entry["reference"] = {"arm": "single_task", "fraction": 1.0, **summary_interval(target)}
    entry["reached_at"] = {"fraction": None if np.isinf(estimate) else estimate,
                           "ci": [None if np.isinf(x) else x for x in (low, high)],
                           "replicates": len(replicates)}
    return entry
