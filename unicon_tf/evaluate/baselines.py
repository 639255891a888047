"""Score the baselines `unicon_tf.train.baselines` trained, each into
`<run>/baselines/<kind>/evaluation/matrix.json`, in the continual run's matrix format
(single-task: only the diagonal; naive: the full matrix; joint: one row, after all stages).
"""

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from unicon_tf.evaluate.evaluator import evaluate_run, score_stage
from unicon_tf.tasks import task_kind
from unicon_tf.files import write_json_atomic
from unicon_tf.run import BASELINES, Run, StageFolder, matrix_file


def evaluate_baselines(run_dir: pathlib.Path | str,
                       trained: Mapping[str, Sequence[StageFolder]]) -> dict[str, dict[str, Any]]:
    """Score trained baselines and save each one's matrix.

    Args:
        run_dir: the continual run's directory.
        trained: `{kind: [StageFolder, ...]}` as `train_baselines` returns it.

    Returns:
        `{kind: matrix dict}` with `run`, `kind`, `pipeline`, `split`, `stages`, `tasks`,
        `task_kinds`, `main_metric`, `matrix`, `metrics` and `selection` (the selection
        record of each task's model: per stage; joint: its one model's, per task) (naive:
        `evaluate_run`'s result without `predictions`).
    """
    run = Run(run_dir)
    results = {}
    for kind, folders in trained.items():
        if kind == "naive":
            results[kind] = evaluate_run(run.baseline_dir(kind), write_predictions=False, kind=kind)
            results[kind].pop("predictions")
            continue
        scored = [score_stage(f, "test", write_predictions=False) for f in folders]
        if kind == "joint":
            rows, matrix, metrics = ["all stages"], [scored[0]["row"]], [scored[0]["metrics"]]
            selection = [scored[0]["selection"]] * len(scored[0]["tasks"])
        else:
            n = len(scored)
            rows = [s["stage"] for s in scored]
            matrix = [[s["row"][0] if i == j else None for j in range(n)] for i, s in enumerate(scored)]
            metrics = [[s["metrics"][0] if i == j else None for j in range(n)] for i, s in enumerate(scored)]
            selection = [s["selection"] for s in scored]
        tasks = [t for s in scored for t in s["tasks"]]
        kinds = [t for s in scored for t in s["task_kinds"]]
        results[kind] = {"run": str(run.baseline_dir(kind)), "kind": kind, "pipeline": run.pipeline, "split": "test",
                         "stages": rows, "tasks": tasks, "task_kinds": kinds,
                         "main_metric": [task_kind(t).main_metric for t in kinds], "matrix": matrix, "metrics": metrics,
                         "selection": selection}
        write_json_atomic(matrix_file(run.baseline_dir(kind)), results[kind])
    return results


def load_baselines(run_dir: pathlib.Path | str) -> dict[str, dict[str, Any]]:
    """`{kind: matrix dict}` of the baselines already evaluated under `<run_dir>/baselines/`."""
    found = {}
    for kind in BASELINES:
        path = matrix_file(Run(run_dir).baseline_dir(kind))
        if path.exists():
            found[kind] = json.loads(path.read_text())
    return found
