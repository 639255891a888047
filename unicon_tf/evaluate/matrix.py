"""The stage x task matrix and what it says about a continual run.

`R[i][j]` is the main metric of task j (the head added by stage j) after stage i, defined
for j <= i (NaN elsewhere). With T stages:

- average metric: `mean_j R[T-1][j]`, every task on the final model;
- backward transfer (Lopez-Paz and Ranzato 2017): `mean_{j<T-1} R[T-1][j] - R[j][j]`;
  negative when learning later tasks hurt earlier ones;
- forgetting (Chaudhry et al. 2018): `mean_{j<T-1} max_{j<=l<T-1} R[l][j] - R[T-1][j]`,
  the drop of each earlier task from its best value to its final value;
- forward transfer against the respective baselines: `mean_j R[j][j] - b_j`, where `b_j` is
  a model trained from scratch on stage j's data alone (UNICON's comparison).

All metrics here are "higher is better" (AUC, C-index, Dice).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def as_array(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> np.ndarray:
    """A float array from nested lists with None for undefined cells."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=np.float64)


def summarize(matrix: Sequence[Sequence[float | None]] | np.ndarray,
              baselines: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Average metric, BWT, forgetting (overall and per task) and forward transfer.

    Args:
        matrix: T x T nested lists (or array), `matrix[i][j]` for j <= i.
        baselines: optional length-T list of respective-baseline values (None to skip).

    Returns:
        dict with `average`, `backward_transfer`, `forgetting`, `forgetting_per_task`,
        `forward_transfer` and `forward_transfer_per_task` (None where undefined).

    Example:
    >>> summarize([[0.8, None], [0.7, 0.9]])["backward_transfer"]
    -0.1
    """
    r = as_array(matrix)
    t = r.shape[0]
    last = r[t - 1, :t]
    out = {"average": _mean(last)}
    earlier = range(t - 1)
    out["backward_transfer"] = _mean([r[t - 1, j] - r[j, j] for j in earlier]) if t > 1 else None
    per_task = [float(np.nanmax(r[j:t - 1, j]) - r[t - 1, j]) for j in earlier]
    out["forgetting_per_task"] = per_task
    out["forgetting"] = _mean(per_task) if per_task else None
    if baselines is not None:
        gains = [None if b is None else float(r[j, j] - b) for j, b in enumerate(baselines)]
        out["forward_transfer_per_task"] = gains
        out["forward_transfer"] = _mean([g for g in gains if g is not None])
    return out


def _mean(values):
    values = [v for v in values if v is not None and not np.isnan(v)]
    return round(float(np.mean(values)), 10) if values else None


def bless(previous_row: Sequence[float | None], row: Sequence[float | None], tasks: Sequence[str],
          tolerance: float = 0.01, threshold: float = 0.0, tolerances: Mapping[str, float] | None = None,
          baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Whether a stage may be pushed: no earlier task fell by more than its tolerance since
    the previous stage, the stage's own task (the last one) reaches its threshold and, with
    `baseline`, its single-task baseline minus `min_vs_baseline`.

    Args:
        previous_row: the main metric of each earlier task after the previous stage
            (matrix row i - 1, `len(tasks) - 1` values; empty for the first stage).
        row: the main metric of every task after this stage (matrix row i, `len(tasks)` values).
        tasks: task (column) names, for the reasons.
        tolerance: largest allowed drop of an earlier task's metric (absolute).
        threshold: smallest acceptable metric of the stage's own task.
        tolerances: optional `{task: tolerance}` overrides.
        baseline: optional baseline-aware rule (the stage's `bless: {min_vs_baseline}`):
            `{"delta"}` and, when the single-task baseline of the same run was scored,
            `value`, `comparison` (`unicon_tf.evaluate.scores.paired_difference`: the
            difference and its 95% paired-bootstrap interval over patients), `at_chance`,
            `interval`, `rule` and `own_rule` (the two arms' selection rules,
            `unicon_tf.train.selection.describe_rule`) and `same_rule`. Without `value`
            (no baseline), or across different rules, the stage is not blessed.

    Returns:
        `{"blessed": bool, "reasons": [str, ...]}`, reasons given either way.

    Example:
    >>> bless([0.9], [0.85, 0.7], ["classification", "prognosis"])["blessed"]
    False
    >>> verdict = bless([], [0.55], ["segmentation Dice"], baseline={"delta": 0.02, "value": 0.70,
    ...     "comparison": {"difference": -0.15, "ci": [-0.2, -0.1], "pairs": 8}, "at_chance": False,
    ...     "rule": "best_val", "own_rule": "best_val", "same_rule": True})
    >>> verdict["blessed"], verdict["reasons"][-1][:59]
    (False, 'segmentation Dice: 0.5500 is below its single-task baseline')
    """
    before_row, after_row = as_array([list(previous_row)]), as_array([list(row)])
    stage = len(tasks) - 1
    tolerances = tolerances or {}
    reasons, blessed = [], True
    for j in range(stage):
        allowed = tolerances.get(tasks[j], tolerance)
        before, after = before_row[0, j], after_row[0, j]
        drop = before - after
        if np.isnan(drop):
            reasons.append(f"{tasks[j]}: not measured ({before} -> {after})")
            blessed = False
        elif drop > allowed + 1e-12:
            reasons.append(f"{tasks[j]}: fell from {before:.4f} to {after:.4f} (drop {drop:.4f} > tolerance {allowed})")
            blessed = False
        else:
            reasons.append(f"{tasks[j]}: {before:.4f} -> {after:.4f} (drop {max(drop, 0.0):.4f} <= tolerance {allowed})")
    own = after_row[0, stage]
    if np.isnan(own):
        reasons.append(f"{tasks[stage]}: not measured (non-finite outputs, or a split it cannot be scored on)")
        blessed = False
    elif own < threshold:
        reasons.append(f"{tasks[stage]}: {own:.4f} is below the threshold {threshold}")
        blessed = False
    else:
        reasons.append(f"{tasks[stage]}: {own:.4f} reaches the threshold {threshold}")
    if baseline is not None:
        verdict, reason = _versus_baseline(tasks[stage], own, baseline)
        blessed = blessed and verdict
        reasons.append(reason)
    return {"blessed": blessed, "reasons": reasons}


def _versus_baseline(task, own, baseline):
    """`(passes, reason)` of the rule `bless: {min_vs_baseline: delta}` (see `bless`)."""
    delta = baseline["delta"]
    rule = f"bless rule min_vs_baseline {delta}"
    if baseline.get("value") is None or np.isnan(baseline["value"]):
        return False, (f"{task}: {rule}: no scored single-task baseline of this run to compare with "
                       "(train it: `unicon-tf baselines --kind single_task`, or run the pipeline with `unicon-tf run`)")
    if not baseline.get("same_rule", True):
        return False, (f"{task}: {rule}: not compared, the arms were selected differently (this stage: "
                       f"{baseline['own_rule']}; single-task: {baseline['rule']})")
    comparison = baseline["comparison"]
    ci = comparison.get("ci")
    interval = (f" (95% CI {ci[0]:+.4f} to {ci[1]:+.4f}, paired bootstrap over {comparison['pairs']} patients)"
                if ci else " (no interval: the patients differ)")
    rules = f"; both arms {baseline['rule']}" if baseline.get("rule") else ""
    chance = ""
    if baseline.get("at_chance"):
        low, high = baseline.get("interval") or (float("nan"), float("nan"))
        chance = (f"; the single-task baseline is at chance level (95% CI {low:.3f} to {high:.3f} reaches "
                  f"{baseline.get('chance', 0.5):.3f}): no gain is claimed against it")
    difference = comparison["difference"]
    if difference < -delta - 1e-12:
        return False, (f"{task}: {own:.4f} is below its single-task baseline {baseline['value']:.4f} by "
                       f"{-difference:.4f}{interval}, more than the {rule}{rules}{chance}")
    return True, (f"{task}: {own:.4f} vs its single-task baseline {baseline['value']:.4f}: {difference:+.4f}"
                  f"{interval}, within the {rule}{rules}{chance}")
