"""Experiments: folds, fractions, resuming, aggregation and the report (issue 16)."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from unicon_tf.experiment import (ExperimentPlan, Patient, aggregate, make_folds, read_patients, run_experiment,
                                  training_subset)
from unicon_tf.experiment import runner as experiment_runner

from conftest import write_pipeline


def cohort(n=60, seed=0):
    """Patients with an unbalanced label (1 in 3) and an event rate that depends on it."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(int)
    events = (rng.uniform(size=n) < np.where(labels == 1, 0.8, 0.3)).astype(int)
    return [Patient(f"p{i:03d}", label=int(l), event=int(e)) for i, (l, e) in enumerate(zip(labels, events))]


def test_folds_are_stratified_patient_disjoint_and_reproducible():
    patients = cohort()
    plan = make_folds(patients, folds=3, val_fraction=0.25, fold_seed=7)
    ids = {p.patient_id for p in patients}
    tests = [set(f["test"]) for f in plan]
    assert set().union(*tests) == ids and sum(len(t) for t in tests) == len(ids)  # a partition
    strata = {p.patient_id: p.stratum for p in patients}
    for fold in plan:
        train, val, test = (set(fold[s]) for s in ("train", "val", "test"))
        assert not (train & val or train & test or val & test) and train | val | test == ids
        assert len(val) == pytest.approx(0.25 * (len(ids) - len(test)), abs=2)
        for stratum in set(strata.values()):  # each stratum spread evenly over the test folds
            total = sum(s == stratum for s in strata.values())
            assert abs(sum(strata[p] == stratum for p in test) - total / 3) <= 1
    assert make_folds(list(reversed(patients)), folds=3, val_fraction=0.25, fold_seed=7) == plan
    assert make_folds(patients, folds=3, val_fraction=0.25, fold_seed=8) != plan
    with pytest.raises(ValueError, match="folds"):
        make_folds(patients[:2], folds=3)


def test_training_fractions_are_stratified_and_nested():
    patients = cohort(80)
    train = [p.patient_id for p in patients[:64]]
    labels = {p.patient_id: p.label for p in patients}
    subsets = [set(training_subset(train, patients, f, seed=3)) for f in (0.25, 0.5, 1.0)]
    assert [len(s) for s in subsets] == [16, 32, 64]
    assert subsets[0] < subsets[1] < subsets[2] == set(train)
    positives = sum(labels[p] for p in train) / len(train)
    assert sum(labels[p] for p in subsets[0]) / 16 == pytest.approx(positives, abs=1 / 16 + 1e-9)
    assert set(training_subset(train, patients, 0.25, seed=4)) != subsets[0]


def known_cells():
    """Cells with known final scores: 3 folds x 2 seeds x fractions (0.5, 1) x (continual, single_task).

    Task `segmentation` (Dice) with per-patient Dice such that continual is higher by
    exactly 0.1 on every patient; task `classification` the same model in every arm.
    """
    cells = []
    continual = {0.5: [0.70, 0.72, 0.75, 0.77, 0.66, 0.68], 1.0: [0.80, 0.82, 0.85, 0.87, 0.76, 0.78]}
    single = {0.5: [0.60, 0.62, 0.65, 0.67, 0.56, 0.58], 1.0: [0.70, 0.72, 0.75, 0.77, 0.66, 0.68]}
    for fraction in (0.5, 1.0):
        for r, (k, s) in enumerate((k, s) for k in range(3) for s in (0, 1)):
            patients = [f"f{k}p{i}" for i in range(4)]
            for arm, values in (("continual", continual), ("single_task", single)):
                value = values[fraction][r]
                dice = [value - 0.05, value + 0.05, value - 0.02, value + 0.02]
                seg = {"task": "segmentation", "patient_ids": patients, "value": value, "dice_per_patient": dice}
                cls = {"task": "classification", "patient_ids": patients, "value": 0.75,
                       "target": [0, 1, 0, 1], "output": [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.6]]}
                matrix = [[0.75, None], [0.75 - 0.01 * k, value]] if arm == "continual" else [[0.75, None], [None, value]]
                cells.append({"arm": arm, "fold": k, "seed": s, "fraction": fraction, "run": f"{arm}-{k}-{s}",
                              "tasks": ["classification", "segmentation"],
                              "task_kinds": ["classification", "segmentation"], "main_metric": ["auc", "dice"],
                              "modalities": {"classification": ["ct"], "segmentation": ["ct"]},
                              "matrix": matrix, "final": {"classification": 0.75, "segmentation": value},
                              "predictions": {"classification": cls, "segmentation": seg}})
    return cells


def test_aggregation_matches_a_hand_computation():
    plan = ExperimentPlan(folds=3, seeds=(0, 1), fractions=(0.5, 1.0), baselines=("single_task",))
    result = aggregate(known_cells(), plan, resamples=200)
    score = next(s for s in result["scores"] if (s["fraction"], s["arm"], s["task"]) == (1.0, "continual",
                                                                                         "segmentation"))
    values = [0.80, 0.82, 0.85, 0.87, 0.76, 0.78]
    mean = sum(values) / 6  # 0.81333
    sd = (sum((v - mean) ** 2 for v in values) / 5) ** 0.5  # 0.04274
    half = 2.570582 * sd / 6 ** 0.5  # t(0.975, 5 df)
    assert (score["n"], score["mean"], score["sd"]) == (6, pytest.approx(mean), pytest.approx(sd))
    assert score["ci"] == pytest.approx([mean - half, mean + half], abs=1e-6)
    assert [v["run"] for v in score["values"]][:2] == ["continual-0-0", "continual-0-1"]

    comparison = next(c for c in result["comparisons"] if c["fraction"] == 1.0 and c["b"]["arm"] == "single_task"
                      and c["a"]["task"] == "segmentation")
    assert comparison["fold_pairs"] == 3 and comparison["difference"]["mean"] == pytest.approx(0.1)
    assert comparison["difference"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert comparison["t_p"] is None  # no spread: undefined, not a fake p
    assert comparison["wilcoxon_p"] == pytest.approx(0.25)  # exact: 3 positive differences, 2 / 2^3
    assert comparison["bootstrap"] == {"ci": pytest.approx([0.1, 0.1]), "pairs": 24, "patients": 12}

    # A spread difference: fold means 0.10, 0.05, 0.15 (by hand: t = 0.1 / (0.05 / sqrt 3)).
    cells = known_cells()
    for cell in cells:
        if cell["arm"] == "single_task" and cell["fraction"] == 1.0:
            cell["final"]["segmentation"] += {0: 0.0, 1: 0.05, 2: -0.05}[cell["fold"]]
    comparison = next(c for c in aggregate(cells, plan, resamples=200)["comparisons"]
                      if c["fraction"] == 1.0 and c["a"]["task"] == "segmentation")
    t = 0.1 / (0.05 / 3 ** 0.5)
    assert comparison["t_p"] == pytest.approx(2 * stats.t.sf(t, 2))
    assert comparison["wilcoxon_p"] == pytest.approx(0.25)  # exact: 3 positive differences, 2 / 2^3
    assert comparison["difference"]["ci"] == pytest.approx([0.1 - 4.302653 * 0.05 / 3 ** 0.5,
                                                            0.1 + 4.302653 * 0.05 / 3 ** 0.5], abs=1e-6)

    forgetting = next(t for t in result["transfer"] if (t["fraction"], t["arm"]) == (1.0, "continual"))
    assert forgetting["forgetting"]["mean"] == pytest.approx(0.01)  # folds 0, 1, 2 drop 0, 0.01, 0.02
    assert forgetting["backward_transfer"]["mean"] == pytest.approx(-0.01)

    (efficiency,) = result["data_efficiency"]
    assert efficiency["reference"]["mean"] == pytest.approx(np.mean([0.70, 0.72, 0.75, 0.77, 0.66, 0.68]))
    assert efficiency["reached_at"]["fraction"] == 0.5  # continual at 0.5 equals single-task at 1.0
    assert efficiency["reached_at"]["replicates"] == 6


def test_resampled_auc_and_c_index_equal_the_evaluators_scores_on_the_resampled_patients():
    from unicon_tf.evaluate import score
    from unicon_tf.experiment.aggregate import resampled_metric

    rng = np.random.default_rng(1)
    n = 15
    classification = {"task": "classification", "target": rng.integers(0, 2, n).tolist(),
                      "output": rng.normal(size=(n, 2)).round(1).tolist()}  # rounded: ties
    survival = np.stack([rng.integers(1, 6, n).astype(float), rng.integers(0, 2, n)], axis=1)
    prognosis = {"task": "prognosis", "target": survival.tolist(), "output": rng.normal(size=(n, 1)).round(1).tolist()}
    rows = rng.integers(0, n, size=(20, n))
    for prediction, metric in ((classification, "auc"), (prognosis, "c_index")):
        expected = [score(prediction["task"], np.asarray(prediction["target"])[r],
                          np.asarray(prediction["output"])[r])[metric] for r in rows]
        np.testing.assert_allclose(resampled_metric(prediction, rows), expected, rtol=1e-9)


TWO_STAGES = [{"name": "classification", "task": "classification", "num_classes": 2},
              {"name": "prognosis", "task": "prognosis", "strategy": "frozen"}]
PLAN = ExperimentPlan(folds=2, seeds=(0,), fractions=(1.0,), baselines=("single_task",))


def executions(out):
    """`{component run id: times executed (not a cache hit)}` over every lineage.json of an experiment."""
    counts = {}
    for lineage in (out / "cells").rglob("lineage.json"):
        for event in json.loads(lineage.read_text())["events"]:
            if not event["cached"]:
                counts[event["run"]] = counts.get(event["run"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def interrupted_experiment(phantom_records, tmp_path_factory):
    """A 2-fold experiment (continual + single-task) interrupted after its first cell, then rerun."""
    folder = tmp_path_factory.mktemp("experiment")
    pipeline = write_pipeline(folder, phantom_records, stages=TWO_STAGES, epochs=1, depth=2)  # levels do not matter here
    out = folder / "out"
    run_cell = experiment_runner.Experiment.run_cell
    calls = []

    def interrupted(self, *args):
        if calls:
            raise KeyboardInterrupt("interrupted after the first cell")
        calls.append(args)
        return run_cell(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_runner.Experiment, "run_cell", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(pipeline, out, PLAN, isolate_cells=False)
    first = out / "cells" / "fold0" / "seed0" / "frac1" / "continual" / "cell.json"
    before = {"executions": executions(out), "first": first.read_text(), "first_mtime": first.stat().st_mtime_ns}
    result = run_experiment(pipeline, out, PLAN, isolate_cells=False)  # the CLI test runs a cell in a child
    return {"pipeline": pipeline, "out": out, "result": result, "before": before, "first": first}


@pytest.mark.e2e
@pytest.mark.slow
def test_an_interrupted_experiment_resumes_without_redoing_finished_cells(interrupted_experiment):
    out, before = interrupted_experiment["out"], interrupted_experiment["before"]
    assert before["executions"] == {"Trainer.classification": 1, "Evaluator.classification": 1,
                                    "Trainer.prognosis": 1, "Evaluator.prognosis": 1}
    # Stage 0 trained once per fold (each continual run's copy is a cache hit), each later stage once.
    assert executions(out) == {"Trainer.classification": 2, "Evaluator.classification": 2,
                               "Trainer.prognosis": 2, "Evaluator.prognosis": 2}
    first = interrupted_experiment["first"]
    assert first.stat().st_mtime_ns == before["first_mtime"] and first.read_text() == before["first"]
    # The single-task baseline reused the foundation: only its later stage was trained.
    trained = sorted(p.parent.name for p in (out / "cells").rglob("baselines/single_task/*/stages/*/stage.json"))
    assert trained == ["00-classification", "00-classification", "00-prognosis", "00-prognosis"]
    cells = interrupted_experiment["result"]["cells"]
    assert len(cells) == 4 and all(json.loads((out / c["record"]).read_text())["run"] == c["run"] for c in cells)


@pytest.mark.e2e
@pytest.mark.slow
def test_folds_are_the_same_for_every_arm_and_disjoint(interrupted_experiment):
    out = interrupted_experiment["out"]
    tested = {}
    for cell in (out / "cells").rglob("cell.json"):
        record = json.loads(cell.read_text())
        for head, prediction in record["predictions"].items():
            tested.setdefault((record["fold"], head), set()).add(tuple(sorted(prediction["patient_ids"])))
    assert all(len(ids) == 1 for ids in tested.values())  # continual and single-task: the same test patients
    folds = json.loads((out / "folds.json").read_text())["folds"]
    for k in (0, 1):
        assert tested[k, "prognosis"] == {tuple(folds[k]["test"])}
    assert not set(folds[0]["test"]) & set(folds[1]["test"])


@pytest.mark.e2e
@pytest.mark.slow
def test_fractions_cut_only_the_later_stages_training_split(interrupted_experiment):
    plan = ExperimentPlan(folds=2, seeds=(0,), fractions=(0.5, 1.0), baselines=("single_task",))
    experiment = experiment_runner.Experiment(interrupted_experiment["pipeline"], interrupted_experiment["out"], plan)
    full, half = experiment.cell_pipeline(1, 0, 1.0), experiment.cell_pipeline(1, 0, 0.5)
    assert half.stages[0].data == full.stages[0].data  # the foundation's data never changes

    def ids(folder, split):
        return {p.patient_id for p in read_patients(folder, [split])}

    later_full, later_half = full.stages[1].data, half.stages[1].data
    assert later_half != later_full
    for split in ("val", "test"):
        assert ids(later_half, split) == ids(later_full, split)
    train = ids(later_full, "train")
    assert ids(later_half, "train") < train and len(ids(later_half, "train")) == round(len(train) / 2)
    schema = json.loads((later_half / "schema.json").read_text())
    assert schema["derived_from"]["fraction"] == 0.5 and schema["splits"]["train"]["count"] == round(len(train) / 2)


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_experiment_runs_a_cell_in_its_own_process_reports_and_refuses_other_folds(interrupted_experiment):
    from unicon_tf.cli import main

    out = interrupted_experiment["out"]
    args = ["experiment", str(interrupted_experiment["pipeline"]), "--seeds", "1", "--fractions", "1.0",
            "--baselines", "single_task", "--out", str(out)]
    before = executions(out)
    unfinished = out / "cells" / "fold1" / "seed0" / "frac1" / "single_task" / "cell.json"
    kept = json.loads(unfinished.read_text())
    unfinished.unlink()

    def in_this_process(self, *cell):
        raise AssertionError(f"cell {cell} ran in the CLI's own process")

    with pytest.MonkeyPatch.context() as patch:  # the child imports the module afresh: its own run_cell
        patch.setattr(experiment_runner.Experiment, "run_cell", in_this_process)
        result = CliRunner().invoke(main, args + ["--folds", "2"])
    assert result.exit_code == 0, result.output
    redone = json.loads(unfinished.read_text())
    assert (redone["run"], redone["tasks"], redone["predictions"].keys()) == (
        kept["run"], kept["tasks"], kept["predictions"].keys())
    assert executions(out) == before  # the baseline's stages were finished: evaluated again, not trained
    assert "report:" in result.output
    experiment = json.loads((out / "experiment.json").read_text())
    assert {c["arm"] for c in experiment["cells"]} == {"continual", "single_task"}
    report = (out / "report" / "report.md").read_text()
    for png in ("curves_prognosis.png", "matrix_fold0.png", "matrix_fold1.png"):
        assert f"]({png})" in report
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = CliRunner().invoke(main, args + ["--folds", "3"])
    assert refused.exit_code == 1 and "folds.json" in refused.output and "Traceback" not in refused.output


class _KilledCell(experiment_runner.Experiment):
    """An experiment whose cells' processes die at once, as the kernel's out-of-memory killer ends them."""

    def run_cell(self, arm, fold, seed, fraction):
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_cell_whose_process_dies_is_a_stage_error_naming_the_cell(interrupted_experiment):
    from unicon_tf.run import StageError

    plan = dataclasses.replace(PLAN, fractions=(0.5,))
    experiment = experiment_runner.Experiment(interrupted_experiment["pipeline"], interrupted_experiment["out"], plan)
    experiment.__class__ = _KilledCell
    with pytest.raises(StageError, match=r"Cell continual fold 0 seed 0 frac0.5 \(a rerun resumes it\): its process "
                                         r"was killed by SIGKILL \(out of memory\?\)"):
        experiment.run()
    assert not (experiment.cell_folder(0, 0, 0.5) / "continual" / "cell.json").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_steps_budget_scales_the_later_stages_epoch_counts(interrupted_experiment):
    plan = ExperimentPlan(folds=2, seeds=(0,), fractions=(0.3, 0.7, 1.0), baselines=("single_task",),
                          step_budget="steps")
    pipeline = interrupted_experiment["pipeline"]
    experiment = experiment_runner.Experiment(pipeline, interrupted_experiment["out"], plan)
    full, part = experiment.cell_pipeline(1, 0, 1.0), experiment.cell_pipeline(1, 0, 0.3)
    assert part.stages[0].training == full.stages[0].training  # the foundation trains once, on every patient
    assert (full.stages[1].training.epochs, full.stages[1].training.min_epochs) == (1, 1)
    assert part.stages[1].training == full.stages[1].training.replace(epochs=4, min_epochs=4, smoothing=4)
    later = experiment.pipeline.stages[1]
    experiment.pipeline = dataclasses.replace(experiment.pipeline, stages=[
        experiment.pipeline.stages[0], dataclasses.replace(later, training=later.training.replace(
            epochs=21, patience=7, smoothing=2))])
    counts = experiment.cell_pipeline(1, 0, 0.7).stages[1].training  # 21 / 0.7 = 30.000000000000004 in floats
    assert (counts.epochs, counts.patience, counts.min_epochs, counts.smoothing) == (30, 10, 2, 3)
    assert experiment.cell_folder(1, 0, 0.3).name == "frac0.3-steps" and experiment.cell_folder(1, 0, 1.0).name == "frac1"
    with pytest.raises(ValueError, match="step_budget"):
        ExperimentPlan(step_budget="minutes")
