"""Run an experiment: folds x seeds x training fractions x arms, each cell through the components.

    <out>/examples/<source>-<key>/                   the pipeline's sources, ingested once (ExampleGen)
    <out>/folds.json                                 the patients, their strata and the folds
    <out>/data/<cohort>/fold{k}/all/                 fold k's splits (records copied, bytes unchanged)
    <out>/data/<cohort>/fold{k}/seed{s}-frac{f}/     the same, its train split cut to fraction f
    <out>/cells/fold{k}/seed{s}/foundation/          stage 0, trained once per fold and seed
    <out>/cells/fold{k}/seed{s}/frac{f}/continual/   the continual run (a copy of the foundation run,
                                                     then the later stages through `LocalRunner`)
    <out>/cells/fold{k}/seed{s}/frac{f}/continual/baselines/<kind>/   the baselines' runs
    <out>/cells/fold{k}/seed{s}/frac{f}/<arm>/cell.json   a finished cell: its matrix, final
                                                     scores and per-patient test predictions

A cell is one arm (`continual` or a baseline) at one fold, seed and fraction. At fraction
f every stage after the first trains on f of its training patients (stratified, nested
across fractions); stage 0, the foundation, always trains on all of them, once per fold and
seed: each fraction's continual run starts as a copy of the foundation run, whose
lineage makes the Trainer and Evaluator of stage 0 cache hits. Validation and test splits
never change with f. A cell whose `cell.json` exists is not run again; an interrupted cell
resumes inside (the runner's cache skips finished component runs; an interrupted stage
continues from its checkpoint).

Each unfinished cell runs in a fresh child process (spawned, one cell per process) unless
`isolate_cells=False`: a process that trains model after model keeps growing, although every
`keras.Model`, layer and variable is freed after its cell (Keras' train functions stay alive,
reachable from no Python module, and `keras.backend.clear_session()` frees nothing: the
long-standing upstream leak, keras-team/keras#17458, #21090), so one process running a grid
grows by ~45 MB per cell on a small CNN and by GBs on the preset
(`benchmarks/experiment_memory.py`).
A child's memory goes back to the system when it exits; finished cells are read in this
process.

Example:
>>> experiment = run_experiment("pipelines/chest_ct.yaml", "experiments/chest_ct",
...                             ExperimentPlan(folds=5, seeds=(0, 1), fractions=(0.25, 0.5, 1.0)))  # doctest: +SKIP
"""

import contextlib
import dataclasses
import json
import math
import pathlib
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any


from unicon_tf.components import COMPONENTS, LocalRunner, fingerprint
from unicon_tf.evaluate import evaluate_baselines, evaluate_run, head_metrics, predict_head
from unicon_tf.tasks import task_kind
from unicon_tf.experiment.folds import make_folds, pool_patients, read_patients, training_subset, write_split
from unicon_tf.files import atomic_folder, folder_lock, write_json_atomic
from unicon_tf.model.storage import copy_run_file, load_model
from unicon_tf.processes import run_in_child
from unicon_tf.run import BASELINES, ResumeWithoutCheckpointWarning, Run, StageError
from unicon_tf.train import train_baselines
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline, with_overrides

ARMS = ("continual",) + BASELINES
STEP_BUDGETS = ("epochs", "steps")


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """What an experiment runs.

    Args:
        folds: K of the patient-level K-fold cross-validation (>= 2).
        seeds: training seeds; each also draws its own training subsets.
        fractions: shares of each later stage's training patients, in (0, 1].
        baselines: arms beside the continual run (`single_task`, `naive`, `joint`).
        val_fraction: share of a fold's non-test patients kept for validation.
        fold_seed: the seed of the fold partition.
        step_budget: `epochs` (each later stage trains for its epochs at every fraction:
            fewer optimizer steps on fewer patients) or `steps` (at fraction f < 1 its
            `epochs`, `patience`, `min_epochs` and `smoothing` are divided by f, rounded up:
            about as many steps as at fraction 1, the fixed compute budget of data-scarcity
            comparisons).
    """

    folds: int = 5
    seeds: tuple = (0,)
    fractions: tuple = (1.0,)
    baselines: tuple = ("single_task", "naive")
    val_fraction: float = 0.25
    fold_seed: int = 0
    step_budget: str = "epochs"

    def __post_init__(self):
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}.")
        if not self.seeds or not self.fractions:
            raise ValueError("an experiment needs at least one seed and one fraction.")
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}.")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"unknown baseline(s) {sorted(unknown)}: expected some of {list(BASELINES)}.")
        if self.step_budget not in STEP_BUDGETS:
            raise ValueError(f"step_budget must be one of {list(STEP_BUDGETS)}, got {self.step_budget!r}.")
        object.__setattr__(self, "fractions", tuple(sorted(set(float(f) for f in self.fractions))))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @property
    def arms(self) -> tuple[str, ...]:
        return ("continual",) + tuple(k for k in BASELINES if k in self.baselines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fraction_name(fraction: float) -> str:
    """`frac0.25`, `frac1`: the folder of a fraction."""
    return f"frac{fraction:g}"


def run_experiment(pipeline: PipelineSpec | pathlib.Path | str, out: pathlib.Path | str, plan: ExperimentPlan, data_root: pathlib.Path | str | None = None,
                   verbose: int = 0, echo: Callable[[str], object] = print, isolate_cells: bool = True) -> dict[str, Any]:
    """Run every cell of `plan` not run yet, then aggregate and write the report.

    Args:
        pipeline: a `PipelineSpec` or pipeline YAML file.
        out: the experiment folder (created; an existing one is resumed).
        plan: an `ExperimentPlan`.
        data_root: for relative data paths of a pipeline file.
        verbose: Keras verbosity.
        echo: where progress lines go.
        isolate_cells: run each unfinished cell in its own child process (see the module
            docstring; the process's memory then stays flat over the grid). On a GPU, this
            process should not initialise TensorFlow's devices first (it would reserve the
            memory the cells need): the CLI hides the GPUs from itself; a script sets
            `TF_FORCE_GPU_ALLOW_GROWTH=true` or `tf.config.set_visible_devices([], "GPU")`.
            A script that calls this at top level needs an `if __name__ == "__main__":`
            guard (Python's `spawn` start method imports the main module in the child).

    Returns:
        The `experiment.json` dict: `unicon_tf.experiment.aggregate.aggregate`'s
        `scores`, `comparisons`, `transfer` and `data_efficiency`, plus the plan, the folds,
        the cells (arm, fold, seed, fraction, run folder, record) and `report` (report.md).

    Raises:
        ValueError: `out` holds an experiment with other folds (another cohort or plan);
        FolderInUseError: another process is running this experiment (`out`);
            PipelineError, DataError, StageError, TrainingError from the components (raised
            here as the cell's process raised them); StageError: a cell's process died
            (killed, out of memory), naming the cell.
    """
    with folder_lock(out, "experiment"):  # before the first write: ingesting the sources, the folds
        return Experiment(pipeline, out, plan, data_root=data_root, verbose=verbose)._run_cells(echo, isolate_cells)


class Experiment:
    """An experiment folder bound to a pipeline and a plan: its cohorts, folds and cells.

    Opening it ingests the pipeline's sources (once) and fixes the folds (`folds.json`),
    holding the folder's lock (`unicon_tf.files.folder_lock`), as `run` does.

    Args:
        pipeline: a `PipelineSpec` or pipeline YAML file.
        out: the experiment folder.
        plan: an `ExperimentPlan`.
        data_root: for relative data paths of a pipeline file.
        verbose: Keras verbosity.
    """

    def __init__(self, pipeline: PipelineSpec | pathlib.Path | str, out: pathlib.Path | str, plan: ExperimentPlan,
                 data_root: pathlib.Path | str | None = None, verbose: int = 0) -> None:
        self.pipeline = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline, data_root=data_root)
        self.out, self.plan, self.verbose = pathlib.Path(out).resolve(), plan, verbose
        with folder_lock(self.out, "experiment"):  # ingesting the sources, fixing the folds
            self.cohorts = _cohorts(self.pipeline, self.out, verbose)
            self.folds = _folds(self.out, plan, self.cohorts)

    def run(self, echo: Callable[[str], object] = print, isolate_cells: bool = True) -> dict[str, Any]:
        """Every cell (running those not finished), aggregated; see `run_experiment`."""
        with folder_lock(self.out, "experiment"):
            return self._run_cells(echo, isolate_cells)

    def _run_cells(self, echo, isolate_cells):
        from unicon_tf.experiment.aggregate import aggregate
        from unicon_tf.experiment.report import write_report

        plan, started, cells = self.plan, time.time(), []
        total = plan.folds * len(plan.seeds) * len(plan.fractions) * len(plan.arms)
        run_cell = self._run_cell_in_child if isolate_cells else self.run_cell
        for seed in plan.seeds:  # seed by seed: an unfinished experiment has whole seeds done
            for k in range(plan.folds):
                for fraction in plan.fractions:
                    for arm in plan.arms:
                        cells.append(run_cell(arm, k, seed, fraction))
                        echo(f"[{len(cells)}/{total}] fold {k} seed {seed} {fraction_name(fraction)} {arm}: "
                             + ", ".join(f"{h} {v:.3f}" for h, v in cells[-1]["final"].items() if v is not None)
                             + f" ({time.time() - started:.0f} s)")
        experiment = {"pipeline": self.pipeline.name, "pipeline_file": str(self.pipeline.path), "out": str(self.out),
                      "plan": plan.to_json(), "patients": len(self.folds["patients"]), "folds": self.folds["folds"],
                      **aggregate(cells, plan)}
        experiment["cells"] = [{k: c.get(k) for k in ("arm", "fold", "seed", "fraction", "run", "record", "data",
                                                      "final", "matrix", "tasks", "stages", "selection", "seconds")}
                               for c in cells]
        experiment["report"] = str(write_report(self.out, experiment, cells))
        write_json_atomic(self.out / "experiment.json", experiment)
        return experiment

    def cell_folder(self, fold: int, seed: int, fraction: float) -> pathlib.Path:
        """`cells/fold{k}/seed{s}/frac{f}`, suffixed `-steps` under `step_budget: steps` (f < 1):
        the two budgets never share a cell."""
        steps = "-steps" if fraction < 1 and self.plan.step_budget == "steps" else ""
        return self.out / "cells" / f"fold{fold}" / f"seed{seed}" / (fraction_name(fraction) + steps)

    def data(self, index: int, fold: int, seed: int, fraction: float) -> pathlib.Path:
        """The ingested folder stage `index` reads at a fold, seed and fraction (written on first use):
        the fold's splits, and for a later stage with fraction < 1 the train split cut down."""
        cohort = self.cohorts[index]
        present = {p.patient_id for p in cohort.patients}
        ids = {split: [p for p in members if p in present] for split, members in self.folds["folds"][fold].items()}
        folder = self.out / "data" / cohort.name / f"fold{fold}"
        if index == 0 or fraction >= 1:
            return write_split(cohort.folder, folder / "all", {s: v for s, v in ids.items() if v}, {"fold": fold})
        ids["train"] = training_subset(ids["train"], self.folds["patients"], fraction,
                                       seed=self.plan.fold_seed * 1_000_000 + 1000 * fold + seed)
        return write_split(cohort.folder, folder / f"seed{seed}-{fraction_name(fraction)}",
                           {s: v for s, v in ids.items() if v}, {"fold": fold, "seed": seed, "fraction": fraction})

    def cell_pipeline(self, fold: int, seed: int, fraction: float) -> PipelineSpec:
        """The pipeline of a fold, seed and fraction: each stage's data, every stage's seed, and
        under `step_budget: steps` a later stage's epoch counts divided by the fraction."""
        stages = [dataclasses.replace(with_overrides(spec, seed=seed, **self._epoch_counts(i, spec, fraction)),
                                      data=self.data(i, fold, seed, fraction), source=None)
                  for i, spec in enumerate(self.pipeline.stages)]
        return dataclasses.replace(self.pipeline, stages=stages, sources={})

    def _epoch_counts(self, index, spec, fraction):
        if index == 0 or fraction >= 1 or self.plan.step_budget == "epochs":
            return {}
        counts = {key: getattr(spec.training, key) for key in ("epochs", "patience", "min_epochs", "smoothing")}
        # rounded first: 21 / 0.7 is 30.000000000000004 in floating point, and 30 epochs are meant
        return {key: math.ceil(round(value / fraction, 9)) for key, value in counts.items() if value is not None}

    def foundation(self, fold: int, seed: int) -> pathlib.Path:
        """The run directory holding stage 0 of a fold and seed, trained and evaluated there once."""
        folder = self.out / "cells" / f"fold{fold}" / f"seed{seed}" / "foundation"
        first = self.cell_pipeline(fold, seed, 1.0)
        with _resuming():
            LocalRunner(first, folder, base=self.out / "saved_models", verbose=self.verbose).run(
                stages=[first.stages[0].name], evaluate=True, push=False, resume=True)
        return folder

    def _run_cell_in_child(self, arm: str, fold: int, seed: int, fraction: float) -> dict[str, Any]:
        """`run_cell` in a fresh child process (`unicon_tf.processes.run_in_child`); a finished
        cell is read here."""
        finished = self.finished_cell(arm, fold, seed, fraction)
        if finished is not None:
            return finished
        return run_in_child(_run_cell, self, arm, fold, seed, fraction,
                            what=f"Cell {arm} fold {fold} seed {seed} {fraction_name(fraction)} (a rerun resumes it)")

    def finished_cell(self, arm: str, fold: int, seed: int, fraction: float) -> dict[str, Any] | None:
        """The record of a finished cell (its `cell.json`), or None."""
        record_file = self.cell_folder(fold, seed, fraction) / arm / "cell.json"
        return json.loads(record_file.read_text()) if record_file.exists() else None

    def run_cell(self, arm: str, fold: int, seed: int, fraction: float) -> dict[str, Any]:
        """One cell's record: read back if the cell is finished, else run it (in this process)
        and write it."""
        finished = self.finished_cell(arm, fold, seed, fraction)
        if finished is not None:
            return finished
        started = time.time()
        pipeline = self.cell_pipeline(fold, seed, fraction)
        run_dir = self.cell_folder(fold, seed, fraction) / "continual"
        if not run_dir.exists():
            _copy_run(self.foundation(fold, seed), run_dir)
        with folder_lock(run_dir, "run"):  # training and evaluating (arms of one fraction share it)
            return self._run_arm(arm, fold, seed, fraction, pipeline, run_dir, started)

    def _run_arm(self, arm, fold, seed, fraction, pipeline, run_dir, started):
        record_file = self.cell_folder(fold, seed, fraction) / arm / "cell.json"
        if arm == "continual":
            with _resuming():
                LocalRunner(pipeline, run_dir, base=self.out / "saved_models", verbose=self.verbose).run(
                    evaluate=True, push=False, resume=True)
            result = evaluate_run(run_dir)
            predictions = {h: _per_patient(p["task"], p) for h, p in result.pop("predictions").items()}
            run = run_dir
        else:
            run = Run(run_dir).baseline_dir(arm)
            for checkpoint in run.rglob("checkpoint"):  # an interrupted baseline stage starts again
                shutil.rmtree(checkpoint)
            trained = train_baselines(pipeline, run_dir, kinds=[arm], verbose=self.verbose)
            result = evaluate_baselines(run_dir, trained)[arm]
            predictions = _baseline_predictions(pipeline, trained[arm], arm)
        final = {}
        for j, head in enumerate(result["tasks"]):
            column = [row[j] for row in result["matrix"] if j < len(row) and row[j] is not None]
            final[head] = column[-1] if column else None
        stages = range(len(pipeline.stages))
        record = {"arm": arm, "fold": fold, "seed": seed, "fraction": fraction, "run": str(run),
                  "record": str(record_file), "data": {s.name: str(s.data) for s in pipeline.stages},
                  "stages": result["stages"], "tasks": result["tasks"], "task_kinds": result["task_kinds"],
                  "main_metric": result["main_metric"],
                  "modalities": {pipeline.head_name(j): pipeline.head_modalities(j) for j in stages},
                  "matrix": result["matrix"], "final": final, "predictions": predictions,
                  "selection": result.get("selection"),
                  "seconds": round(time.time() - started, 1)}
        write_json_atomic(record_file, record)
        return record


def _run_cell(experiment: Experiment, arm: str, fold: int, seed: int, fraction: float) -> dict[str, Any]:
    """`experiment.run_cell(...)`, run in a cell's child process (a module-level function: the
    child imports this module and runs the class's own `run_cell`)."""
    return experiment.run_cell(arm, fold, seed, fraction)


@dataclasses.dataclass(frozen=True)
class Cohort:
    """An ingested folder some stage reads: a short name for its derived folders, and its patients."""

    name: str
    folder: pathlib.Path
    patients: tuple  # Patient, in record order


def _cohorts(pipeline, out, verbose):
    """`{stage index: Cohort}`; the pipeline's sources are ingested once, by ExampleGen."""
    folders = {}
    for index, spec in enumerate(pipeline.stages):
        if spec.source is None:
            folders[index] = (spec.data.name, pathlib.Path(spec.data).resolve())
            continue
        parameters = dict(pipeline.sources[spec.source])
        folder = out / "examples" / f"{spec.source}-{fingerprint('ExampleGen', parameters)[:12]}"
        if not (folder / "schema.json").exists():
            context = {"id": f"ExampleGen.{spec.source}", "output_dir": folder, "run_dir": out,
                       "pipeline": pipeline, "verbose": verbose}
            COMPONENTS["ExampleGen"].execute({}, parameters, context)
        folders[index] = (spec.source, folder)
    cohorts = {}
    for index, (name, folder) in folders.items():
        known = next((c for c in cohorts.values() if c.folder == folder), None)
        if known is None:
            taken = {c.name for c in cohorts.values()}
            known = Cohort(name if name not in taken else f"{name}-{index}", folder, tuple(read_patients(folder)))
        cohorts[index] = known
    return cohorts


def _folds(out, plan, cohorts):
    """`{"patients", "folds"}`, saved as folds.json; a resumed experiment must find the same."""
    patients = pool_patients({c.folder: c.patients for c in cohorts.values()}.values())
    folds = make_folds(patients, plan.folds, val_fraction=plan.val_fraction, fold_seed=plan.fold_seed)
    record = {"patients": [dataclasses.asdict(p) for p in patients], "folds": folds}
    path = out / "folds.json"
    if path.exists() and json.loads(path.read_text()) != record:
        raise ValueError(f"{path}: this folder holds an experiment with other folds (another cohort, "
                         "--folds, --val-fraction or fold seed): use another --out.")
    write_json_atomic(path, record)
    return {"patients": patients, "folds": folds}


def _copy_run(source, target):
    """Copy a run directory (its base weights files hard-linked, see `copy_run_file`). The copy's lineage keeps the executions, their paths moved to the
    copy (so they are cache hits there), but not the source's events: each component run is
    counted where it ran."""
    with atomic_folder(target) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True, copy_function=copy_run_file)
        lineage = staging / "lineage.json"
        if lineage.exists():
            record = _moved(json.loads(lineage.read_text()), str(source), str(target))
            write_json_atomic(lineage, {**record, "events": [], "copied_from": str(source)})


def _moved(value, old, new):
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    return value


def _baseline_predictions(pipeline, folders, kind):
    """Per-patient test predictions of every head of a baseline, from the model its final
    score is from (`folders`: the baseline's trained stage folders, as `train_baselines`
    gives them): each head as the baseline's own record names it (`stage.json`'s `heads`),
    on that head's data.

    Raises:
        StageError: the baseline's models lack a head of the pipeline (the message names
            the baseline, the head and the heads its models have).
    """
    final = folders if kind == "single_task" else folders[-1:]
    predictions = {}
    for folder in final:
        record = folder.record()
        model = load_model(folder.model)
        for entry in record["heads"][-1:] if kind == "single_task" else record["heads"]:
            predictions[entry["head"]] = _per_patient(entry["task"],
                                                      predict_head(model, entry["head"], entry["data"], "test"))
    missing = [pipeline.head_name(j) for j in range(len(pipeline.stages)) if pipeline.head_name(j) not in predictions]
    if missing:
        raise StageError(f"The {kind} baseline in {folders[-1].path.parent.parent} has no head {missing} "
                         f"(its models have {sorted(predictions)}): delete the baseline's folder and run again.")
    return predictions


def _per_patient(task, prediction):
    """What a patient-level bootstrap needs of a head's test predictions (JSON-able).

    The kind's per-patient scores (segmentation: `dice_per_patient`), else `target` and
    `output` per patient (classification, prognosis: the metric is recomputed on each resample).
    """
    metrics, kind = head_metrics(task, prediction), task_kind(task)
    record = {"task": task, "patient_ids": metrics["patient_ids"], "value": metrics[kind.main_metric]}
    if kind.per_patient is not None:
        record[kind.per_patient] = metrics[kind.per_patient]
    else:
        record["target"] = prediction["target"].tolist()
        record["output"] = prediction["output"].tolist()
    return record



@contextlib.contextmanager
def _resuming() -> Iterator[None]:
    """Silence `ResumeWithoutCheckpointWarning`: every cell runs with `resume=True` (so an
    interrupted one continues), and a fresh stage without a checkpoint is the rule there,
    not a mistyped run directory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResumeWithoutCheckpointWarning)
        yield
