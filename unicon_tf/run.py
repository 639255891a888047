"""The run directory: the only module that knows its layout or reads its records.

    <run>/run.json                                  pipeline name and file, each stage's status
    <run>/lineage.json                              component runs, their artifacts (local runner)
    <run>/examples/<source>-<key>/                  ExampleGen's output (ingested TFRecords)
    <run>/stages/NN-<stage>/                        one stage: the Trainer's output, a Model artifact
    <run>/stages/NN-<stage>/model.keras             the network after the stage
    <run>/stages/NN-<stage>/stage.json              its record: strategy, hyper-parameters, plugins,
                                                    history, teacher, data, the heads so far
    <run>/stages/NN-<stage>/fisher.npz              EWC's accumulated Fisher diagonal
    <run>/stages/NN-<stage>/checkpoint/             while the stage trains (removed at the end)
    <run>/stages/NN-<stage>/tensorboard/            TensorBoard event files: train/, validation/
    <run>/stages/NN-<stage>/evaluation/             the Evaluator's output: metrics.json,
                                                    blessing.json, predictions/<head>/*.nii.gz
    <run>/weights/<sha256>.weights.h5               weights shared by reference by large models' stage
                                                    files (a pretrained preset; unicon_tf.model.storage)
    <run>/evaluation/matrix.json                    the stage x task matrix of the run
    <run>/baselines/<kind>/                         reference runs (single-task, naive, joint)
    <run>/report/                                   report.md and its figures

A stage folder stands on its own (`StageFolder`): a component given its path (an
artifact's URI) finds the model, the record and the blessing there without the run
around it (a large model's stage file takes its unchanged weights from the run's `weights/`). `Run` opens a run directory with or without its pipeline.

Example:
>>> import tempfile
>>> run = Run.create(tempfile.mkdtemp(), "chest_ct", "pipelines/chest_ct.yaml")
>>> run.stage(1, "prognosis").model.relative_to(run.path).as_posix()
'stages/01-prognosis/model.keras'
>>> run.mark(1, "prognosis", fingerprint="f" * 64, status="trained")
>>> Run(run.path).trained_stages()  # stage 0 is missing: nothing usable yet
[]
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from unicon_tf.files import write_json_atomic

BASELINES = ("single_task", "naive", "joint")
"""The reference runs kept under `<run>/baselines/<kind>/`."""


def matrix_file(folder: pathlib.Path | str) -> pathlib.Path:
    """Where the stage x task matrix of a run (or a baseline) in `folder` is saved."""
    return pathlib.Path(folder) / "evaluation" / "matrix.json"


class StageError(RuntimeError):
    """A stage that cannot start or be used: missing or mismatched previous stage, a finished
    stage, a run directory of another pipeline."""


class ResumeWithoutCheckpointWarning(UserWarning):
    """A resume was asked for a stage that holds no checkpoint (a mistyped `--run-dir`, say):
    the stage trains from epoch 1. The experiment runner resumes every cell, fresh or
    interrupted, so it silences this warning."""


class StageFolder:
    """One stage's folder: the Trainer writes it, the Evaluator and Pusher read it.

    Args:
        path: the folder (`<run>/stages/NN-<stage>`, or any folder a Trainer wrote).
    """

    def __init__(self, path: pathlib.Path | str) -> None:
        self.path = pathlib.Path(path)
        self.model = self.path / "model.keras"
        self.record_file = self.path / "stage.json"
        self.checkpoint = self.path / "checkpoint"
        self.tensorboard = self.path / "tensorboard"
        self.fisher = self.path / "fisher.npz"
        self.evaluation = self.path / "evaluation"

    def __repr__(self):
        return f"StageFolder({str(self.path)!r})"

    def is_trained(self) -> bool:
        """Whether the stage finished: its model and record are both there."""
        return self.model.is_file() and self.record_file.is_file()

    def record(self) -> dict[str, Any]:
        """The stage's record (stage.json) with `folder` (this folder) added.

        Raises:
            StageError: the stage has not finished training here.
        """
        if not self.is_trained():
            raise StageError(f"{self.path} holds no trained stage ({self.model.name} or {self.record_file.name} "
                             "is missing).")
        return {**json.loads(self.record_file.read_text()), "folder": self.path}

    def write_record(self, record: Mapping[str, Any]) -> None:
        write_json_atomic(self.record_file, record)


class Evaluation:
    """The Evaluator's output folder: a stage's metrics, blessing and label maps.

    Args:
        path: the folder (by default `<stage folder>/evaluation`).
    """

    def __init__(self, path: pathlib.Path | str) -> None:
        self.path = pathlib.Path(path)
        self.metrics_file = self.path / "metrics.json"
        self.blessing_file = self.path / "blessing.json"

    def predictions(self, head: str) -> pathlib.Path:
        """Where a head's NIfTI label maps go."""
        return self.path / "predictions" / head

    def metrics(self) -> dict[str, Any] | None:
        """The saved metrics record, or None."""
        return json.loads(self.metrics_file.read_text()) if self.metrics_file.exists() else None

    def blessing(self) -> dict[str, Any] | None:
        """`{"stage", "blessed", "reasons"}`, or None when the stage was not evaluated."""
        return json.loads(self.blessing_file.read_text()) if self.blessing_file.exists() else None

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        write_json_atomic(self.metrics_file, metrics)

    def write_blessing(self, blessing: Mapping[str, Any]) -> None:
        write_json_atomic(self.blessing_file, blessing)


class Run:
    """A run directory: its stages in order and their status (`run.json`).

    `Run(path)` opens an existing run without its pipeline; `Run.create(path, pipeline
    name, pipeline file)` opens or starts one for a pipeline, refusing a run of another.

    Args:
        path: the run directory.

    Raises:
        FileNotFoundError: `path` holds no run.json.
    """

    def __init__(self, path: pathlib.Path | str, _record: dict[str, Any] | None = None) -> None:
        self.path = pathlib.Path(path)
        self.record_file = self.path / "run.json"
        if _record is None:
            if not self.record_file.exists():
                raise FileNotFoundError(f"{self.path}: not a run directory (run.json is missing).")
            _record = json.loads(self.record_file.read_text())
        self.record = _record
        self.lineage_file = self.path / "lineage.json"
        self.matrix_file = matrix_file(self.path)
        self.report_dir = self.path / "report"

    @classmethod
    def create(cls, path: pathlib.Path | str, pipeline: str, pipeline_file: pathlib.Path | str | None = None) -> "Run":
        """The run of pipeline `pipeline` (its name) at `path`, new or existing.

        Raises:
            StageError: `path` holds a run of another pipeline.
        """
        record_file = pathlib.Path(path) / "run.json"
        if record_file.exists():
            run = cls(path)
            if run.pipeline != pipeline:
                raise StageError(f"{run.path} holds a run of pipeline '{run.pipeline}', not '{pipeline}': "
                                 "use another --run-dir.")
            return run
        return cls(path, {"pipeline": pipeline, "pipeline_file": str(pipeline_file), "stages": {}})

    @property
    def pipeline(self) -> str:
        """The name of the pipeline the run belongs to."""
        return self.record["pipeline"]

    def stage(self, index: int, name: str) -> StageFolder:
        """The folder of stage `index` called `name`."""
        return StageFolder(self.path / "stages" / f"{index:02d}-{name}")

    def status(self, name: str) -> dict[str, Any]:
        """The stage's entry in run.json (`index`, `fingerprint`, `status`, ...), or {}."""
        return self.record["stages"].get(name, {})

    def mark(self, index: int, name: str, fingerprint: str, **fields: Any) -> None:
        """Record stage `index` (`name`, its spec's fingerprint) and `fields` in run.json."""
        entry = self.record["stages"].setdefault(name, {})
        entry.update(index=index, fingerprint=fingerprint, **fields)
        self.save()

    def save(self) -> None:
        """Write run.json (the pipeline's name and file, the stages' entries)."""
        write_json_atomic(self.record_file, self.record)

    def trained_stage(self, index: int, name: str, fingerprint: str) -> StageFolder:
        """The folder of a finished stage, checked against the spec that should have made it.

        Raises:
            StageError: the stage is not trained here, or was trained from another spec.
        """
        folder, entry = self.stage(index, name), self.status(name)
        if entry.get("status") != "trained" or not folder.is_trained():
            raise StageError(f"Stage '{name}' must be trained first: {folder.model} is missing "
                             f"(unicon-tf train --stage {name}).")
        if entry["fingerprint"] != fingerprint:
            raise StageError(f"{folder.model} was trained from a different definition of stage '{name}' "
                             "(another pipeline or an edited one): use another --run-dir.")
        return folder

    def trained_stages(self, upto: str | None = None) -> list[StageFolder]:
        """The folders of the trained stages in order, from stage 0 without a gap (up to
        the stage called `upto`).

        Raises:
            ValueError: `upto` is not among them.
        """
        trained = sorted((e["index"], name) for name, e in self.record["stages"].items()
                         if e.get("status") == "trained")
        folders = []
        for index, name in trained:
            if index != len(folders):
                break  # a gap: later stages did not start from this run's earlier ones
            folders.append(self.stage(index, name))
            if name == upto:
                break
        if upto is not None and (not folders or folders[-1].record()["stage"] != upto):
            names = [f.record()["stage"] for f in folders]
            raise ValueError(f"{self.path}: stage '{upto}' is not trained (trained: {names}).")
        return folders

    def stage_records(self, upto: str | None = None) -> list[dict[str, Any]]:
        """The records (stage.json, with `folder`) of `trained_stages(upto)`.

        Raises:
            ValueError: no stage is trained, or `upto` is not.
        """
        records = [folder.record() for folder in self.trained_stages(upto)]
        if not records:
            raise ValueError(f"{self.path}: no trained stage to evaluate.")
        return records

    def examples_dir(self, source: str, key: str) -> pathlib.Path:
        """Where ExampleGen ingests source `source` for the run whose fingerprint is `key`."""
        return self.path / "examples" / f"{source}-{key[:12]}"

    def baseline_dir(self, kind: str) -> pathlib.Path:
        """The folder of a baseline kind (one of `BASELINES`)."""
        return self.path / "baselines" / kind

    def single_task_dir(self, stage: str) -> pathlib.Path:
        """The run directory of the single-task baseline of stage `stage`."""
        return self.baseline_dir("single_task") / stage
