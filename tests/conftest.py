"""Shared fixtures and helpers: small volumes (16^3) and small encoders keep the suite fast on CPU."""

import csv
import fcntl
import json
import os
import shutil
import traceback

import nibabel as nib
import numpy as np
import pytest

import unicon_tf
from unicon_tf import data

import keras  # noqa: E402  (after unicon_tf, which imports it quietly)

SHAPE = (16, 16, 16)


@pytest.fixture
def volumes():
    """A fixed batch of two CT and two PET volumes, (2, 16, 16, 16, 1) float32 each."""
    rng = np.random.default_rng(0)
    return {m: rng.normal(size=(2,) + SHAPE + (1,)).astype("float32") for m in ("ct", "pet")}


@pytest.fixture
def small_foundation():
    """A stage-0 CT classification model with a 3-level, width-8 encoder."""
    return unicon_tf.foundation(SHAPE, modality="ct", task="classification", num_classes=2, width=8, depth=3)


def run(model, volumes):
    """Outputs of `model` on the modalities it takes, as NumPy arrays."""
    outputs = model({m: volumes[m] for m in model.input}, training=False)
    return {name: np.asarray(value) for name, value in outputs.items()}


# The modules that take longest (with their session fixtures), slowest first, as measured with
# `--durations` on 2 cores (2026-12-07). pytest.ini hands modules to pytest-xdist's workers in
# collection order (`--no-loadscope-reorder`): these go first, so that no long module starts
# last while the other worker idles (it cost 85 s of 610). The rest follow in their own order.
SLOWEST_MODULES = ["test_serving", "test_faults", "test_continual", "test_distribute", "test_kubeflow",
                   "test_isolation", "test_i3resnet", "test_evaluate", "test_experiment", "test_vit",
                   "test_selection_rules", "test_selection", "test_cli", "test_regression", "test_components"]


def pytest_collection_modifyitems(config, items):
    """Put the modules of `SLOWEST_MODULES` first, in its order (a stable sort: each module's
    tests keep theirs)."""
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def built_once(tmp_path_factory, name, build, copy=True):
    """The folder `build(folder)` writes, built once per test session even under
    pytest-xdist: the first worker to ask builds it in the session's shared temporary folder
    while the others wait on a lock (the pattern of pytest-xdist's docs). With `copy`, each
    caller gets a copy of its own (a test that writes into it, e.g. an evaluation, changes
    only its worker's copy); without, the shared folder itself (for data only read).

    Returns:
        The folder's path.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent / "built_once"
    shared.mkdir(exist_ok=True)
    folder, done, failed = shared / name, shared / f"{name}.done", shared / f"{name}.failed"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():  # one worker's failure is reported by the others without building again
            raise RuntimeError(f"building the session fixture '{name}' failed in another worker:\n"
                               + failed.read_text())
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died while building
            folder.mkdir()
            try:
                build(folder)
            except Exception:
                failed.write_text(traceback.format_exc())
                raise
            done.touch()
    if not copy:
        return folder
    mine = tmp_path_factory.mktemp(name)
    shutil.copytree(folder, mine, dirs_exist_ok=True)
    return mine


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory):
    """A 12-patient phantom cohort on disk (CT 32^3 at 6 mm, PET 16^3 at 12 mm), its
    manifest's path; its test split (3 patients) holds both classes. Built once per session."""
    from unicon_tf.data import phantom

    def build(folder):
        phantom.write_cohort(folder, n=12, shape=(32, 32, 32), seed=3, spacing=6.0)

    return built_once(tmp_path_factory, "phantom", build, copy=False) / "manifest.csv"


@pytest.fixture(scope="session")
def phantom_records(phantom_cohort, tmp_path_factory):
    """The phantom cohort ingested at 16^3, 12 mm, cropped around the mask (built once)."""
    from unicon_tf import data

    def build(folder):
        prep = data.Preprocessing(shape=(16, 16, 16), spacing=(12.0, 12.0, 12.0), center="mask")
        data.ingest(phantom_cohort, folder / "ct16", prep, workers=2, verbose=False)

    return built_once(tmp_path_factory, "records", build, copy=False) / "ct16"


UNICON_ORDER = [
    {"name": "classification", "task": "classification", "num_classes": 2},
    {"name": "prognosis", "task": "prognosis", "adapters": 2, "strategy": "adapters"},
    {"name": "segmentation", "task": "segmentation", "adapters": 2, "strategy": "adapters"},
    {"name": "pet", "task": "segmentation", "modality": "pet", "head": "segmentation_ctpet", "strategy": "frozen"},
]


def write_pipeline(folder, records, stages=UNICON_ORDER, name="tiny", input_shape=(16, 16, 16), depth=3,
                   **defaults):
    """A small pipeline (16^3, width 8) over the phantom records; returns its path."""
    import yaml

    spec = {
        "name": name, "input_shape": list(input_shape), "modality": "ct", "encoder": {"width": 8, "depth": depth},
        "defaults": {"epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "seed": 1, **defaults},
        "stages": [{"data": str(records), **stage} for stage in stages],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Interrupt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of epoch `at_epoch` (0-based): a stage dies there."""

    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt


def write_runner_pipeline(folder, manifest):
    """A two-stage pipeline with its own ExampleGen source (the phantom manifest at 16^3): the
    classification stage is blessed; the prognosis stage has an unreachable threshold, so the
    Evaluator does not bless it and the Pusher skips it."""
    import yaml

    spec = {
        "name": "tiny", "input_shape": [16, 16, 16], "encoder": {"width": 8, "depth": 3},
        "sources": {"lesion16": {"manifest": str(manifest), "shape": [16, 16, 16], "spacing": [12, 12, 12],
                                 "center": "mask"}},
        "defaults": {"epochs": 1, "batch_size": 2, "seed": 1},
        "stages": [
            {"name": "classification", "task": "classification", "data": "lesion16"},
            {"name": "prognosis", "task": "prognosis", "data": "lesion16", "threshold": 2.0},
        ],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def runner_run(phantom_cohort, tmp_path_factory):
    """`write_runner_pipeline` run once by `LocalRunner`: `(pipeline, run dir, serving base,
    {stage: output artifacts})`. Its users only read it, or re-run it (cache hits only)."""
    from unicon_tf.components import LocalRunner

    folder = tmp_path_factory.mktemp("runner")
    pipeline = write_runner_pipeline(folder, phantom_cohort)
    run, base = folder / "run", folder / "saved_models"
    return pipeline, run, base, LocalRunner(pipeline, run, base=base, verbose=0).run()


@pytest.fixture(scope="session")
def trained_run(phantom_records, tmp_path_factory):
    """All four UNICON stages of the tiny pipeline, trained once for the session (each
    worker gets a copy): `(pipeline, run dir, [what train_stage returned])`. Absolute paths
    written inside the run (run.json's pipeline file, a teacher's model) name the shared
    original, which only the builder wrote."""
    from unicon_tf import train

    def build(folder):
        pipeline = write_pipeline(folder, phantom_records)
        records = [train.train_stage(pipeline, stage["name"], folder / "run", verbose=0) for stage in UNICON_ORDER]
        # what train_stage returned, for the workers that did not train (JSON: lists for tuples)
        (folder / "records.json").write_text(json.dumps(records, default=list))

    folder = built_once(tmp_path_factory, "trained_run", build)
    return folder / "tiny.yaml", folder / "run", json.loads((folder / "records.json").read_text())


@pytest.fixture(scope="session")
def stage0_run(phantom_records, tmp_path_factory):
    """A run directory with only the classification stage trained, once for the session
    (copied by each variant). Its pipeline declares a later EWC stage, so stage 0 also saves
    its Fisher diagonal."""
    from unicon_tf import train

    def build(folder):
        later = {"name": "prognosis", "task": "prognosis", "strategy": "finetune", "penalty": "ewc", "beta": 1.0}
        pipeline = write_pipeline(folder, phantom_records, stages=[UNICON_ORDER[0], later], name="variants")
        train.train_stage(pipeline, "classification", folder / "run", verbose=0)

    return built_once(tmp_path_factory, "stage0", build) / "run"


def second_stage(stage0_run, records, folder, **stage):
    """Train a prognosis stage with `stage` settings on a copy of `stage0_run` in `folder/run`;
    return its record."""
    import shutil

    from unicon_tf import train

    shutil.copytree(stage0_run, folder / "run")
    stages = [UNICON_ORDER[0], {"name": "prognosis", "task": "prognosis", "epochs": 3, "learning_rate": 3e-3, **stage}]
    pipeline = write_pipeline(folder, records, stages=stages, name="variants")
    return train.train_stage(pipeline, "prognosis", folder / "run", verbose=0)


RAS_2MM = np.diag([2.0, 2.0, 2.0, 1.0])


def write_nifti(path, array, affine=RAS_2MM):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path.name


def write_manifest(folder, rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def patient_row(folder, pid, split="train", ct=None, pet=None, mask=None, **targets):
    """Write one patient's CT (and PET, mask) 8^3 at 2 mm RAS; return its manifest row."""
    rng = np.random.default_rng(abs(hash(pid)) % 2**32)
    ct = rng.uniform(-1000, 1000, (8, 8, 8)).astype(np.float32) if ct is None else ct
    row = {"patient_id": pid, "split": split, "ct": write_nifti(folder / f"{pid}_ct.nii.gz", ct)}
    if pet is not None:
        row["pet"] = write_nifti(folder / f"{pid}_pet.nii.gz", pet)
    if mask is not None:
        row["mask"] = write_nifti(folder / f"{pid}_mask.nii.gz", mask.astype(np.uint8))
    row.update({k: v for k, v in targets.items()})
    return row


PREP_8 = data.Preprocessing(shape=(8, 8, 8), spacing=(2.0, 2.0, 2.0))
