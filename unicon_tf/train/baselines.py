"""Train the reference runs a continual run is judged against, each in `<run>/baselines/<kind>/`
(`unicon_tf.evaluate.baselines` scores them):

- `single_task`: the respective baselines of UNICON: for each stage, a model trained from
  scratch on that stage's data alone (same head, modalities, batch, learning rate, at
  most the stage's epochs), keeping its best epoch on validation;
- `naive`: the same pipeline with every later stage fine-tuned without protection (the
  forgetting baseline), its later stages keeping their best epoch on validation;
- `joint`: one multi-task model with every head, trained on all stages' data at once
  (each step takes one batch of every stage's data, for as many steps as the longest
  continual stage took; the upper reference).

Every arm follows the stage's own selection rule (`select`, `monitor`, `patience`,
`min_epochs`, `smoothing`; by default the best validation epoch, see
`unicon_tf.train.selection`), so a continual stage and its baselines are compared like for
like. The naive run's stage 0 is the continual stage 0 itself (same spec, same seed,
trained from scratch: the same start, so forgetting is compared fairly) and is reused when
trained; so is the single-task model of stage 0 when it holds what the baseline would
keep (it reads the same modality). `joint` trains for a fixed number of epochs (no
selection: its record says `select: last`).
"""

import dataclasses
import datetime
import pathlib
import shutil
import time
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import tensorflow as tf

from unicon_tf._quiet import progress_verbosity
from unicon_tf.data import read_schema
from unicon_tf.files import folder_lock
from unicon_tf.model import expand, foundation, model_parts
from unicon_tf.model.storage import save_model
from unicon_tf.run import BASELINES, Run, StageFolder
from unicon_tf.tasks import task_kind
from unicon_tf.train.continual import OptimizerBuiltFirst
from unicon_tf.train.optimizers import FusedAdamW
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline, with_overrides
from unicon_tf.train.selection import Selection, describe_rule
from unicon_tf.train.stage import stage_data, train_stage
from unicon_tf.train.strategies import set_trainable
from unicon_tf.version import __version__


def train_baselines(pipeline: PipelineSpec | pathlib.Path | str, run_dir: pathlib.Path | str, kinds: Iterable[str] = BASELINES,
                    data_root: pathlib.Path | str | None = None, verbose: int = 0) -> dict[str, list[StageFolder]]:
    """Train the baselines of `pipeline` under `<run_dir>/baselines/` (what is trained stays).

    Args:
        pipeline: a `PipelineSpec` or pipeline file.
        run_dir: the continual run's directory.
        kinds: which of `single_task`, `naive`, `joint`.
        data_root: for relative data paths of a pipeline file.
        verbose: Keras verbosity.

    Returns:
        `{kind: [StageFolder, ...]}`: the trained stage folders (single-task: one per stage;
        naive: the run's stages; joint: one folder holding the multi-task model).

    Raises:
        ValueError: an unknown kind.
        FolderInUseError: another process is running in `run_dir`.
        StageError, TrainingError, DataError: as `train_stage`.
    """
    if not isinstance(pipeline, PipelineSpec):
        pipeline = load_pipeline(pipeline, data_root=data_root)
    unknown = set(kinds) - set(BASELINES)
    if unknown:
        raise ValueError(f"Unknown baseline(s) {sorted(unknown)}: expected {list(BASELINES)}.")
    trainers = {"single_task": _single_task, "naive": _naive, "joint": _joint}
    with folder_lock(run_dir, "run"):
        run = Run.create(run_dir, pipeline.name, pipeline.path)
        run.save()  # a fresh run directory: the baselines' evaluation opens it by its run.json
        return {kind: trainers[kind](pipeline, run, verbose) for kind in kinds}


def _single_task(pipeline, run, verbose):
    return [train_single_task(pipeline, run.path, spec.name, verbose) for spec in pipeline.stages]


def train_single_task(pipeline: PipelineSpec, run_dir: pathlib.Path | str, stage: str, verbose: int = 0) -> StageFolder:
    """Train (if not yet trained) the single-task baseline of one stage: its head alone,
    from scratch, on the stage's data, under the stage's selection rule.

    Args:
        pipeline: a `PipelineSpec` (its stages' `data` ingested folders).
        run_dir: the continual run's directory; the model goes to
            `<run_dir>/baselines/single_task/<stage>/stages/00-<stage>/`.
        stage: the stage's name.
        verbose: Keras verbosity.

    Returns:
        The baseline's `StageFolder`.

    Raises:
        PipelineError: no such stage; StageError, TrainingError, DataError: as `train_stage`.

    Example:
    >>> folder = train_single_task(spec, "runs/chest_ct", "segmentation")  # doctest: +SKIP
    """
    run = Run.create(run_dir, pipeline.name, pipeline.path)
    i, spec = pipeline.stage(stage)
    modalities = pipeline.head_modalities(i)
    alone = dataclasses.replace(spec, modality=None, modalities=tuple(modalities), head=pipeline.head_name(i),
                                adapters=None, path_options={})
    single = dataclasses.replace(pipeline, name=f"{pipeline.name}-{spec.name}-alone", stages=[alone])
    target = Run.create(run.single_task_dir(spec.name), single.name, single.path)
    if i > 0 or modalities != [pipeline.modality] or not _reuse_first_stage(run, pipeline, target, alone):
        _train_missing(single, target, verbose)
    return target.stage(0, spec.name)


def _naive(pipeline, run, verbose):
    stages = [pipeline.stages[0]] + [with_overrides(s, strategy="naive") for s in pipeline.stages[1:]]
    naive = dataclasses.replace(pipeline, stages=stages)
    target = Run.create(run.baseline_dir("naive"), naive.name, naive.path)
    _reuse_first_stage(run, pipeline, target)
    _train_missing(naive, target, verbose)
    return Run(target.path).trained_stages()  # run.json as training left it (`target` read it before)


def _selected_as(spec, record, splits):
    """Whether the trained stage of `record` (stage.json) holds the weights that training
    `spec` would keep: replaying `spec`'s selection over the recorded validation history
    (same definition and seed, so the same epochs) gives the same epochs run and epoch kept."""
    hp, history = spec.training, record["history"]
    selection = Selection.for_training(record["head"], record["task"], hp, splits)
    if record["spec"]["training"]["epochs"] != hp.epochs:
        return False
    epochs_run = 0
    for epoch, logs in enumerate(history, start=1):
        if selection.stop():
            break
        if selection.needs_validation:
            if selection.key not in logs:
                return False
            selection.update(epoch, logs)
        epochs_run = epoch
    recorded = record.get("selection") or {"epochs_run": len(history), "epoch": len(history)}
    return (epochs_run, selection.kept_epoch(epochs_run)) == (recorded["epochs_run"], recorded["epoch"])


def _reuse_first_stage(run, pipeline, target, spec=None):
    """Copy the continual run's trained stage 0 into the baseline run `target`; True if it is there.

    `spec`: the baseline's stage 0 (default the pipeline's); the continual stage is reused
    only when it holds what `spec` would keep (`_selected_as`).
    """
    spec = spec or pipeline.stages[0]
    if target.status(spec.name).get("status") == "trained":
        return True
    if run.status(spec.name).get("status") != "trained":
        return False
    if not _selected_as(spec, run.stage(0, spec.name).record(), read_schema(spec.data)["splits"]):
        return False
    spec = pipeline.stages[0]
    source, copy = run.stage(0, spec.name), target.stage(0, spec.name)
    shutil.copytree(source.path, copy.path, dirs_exist_ok=True)
    target.mark(0, spec.name, spec.fingerprint(), status="trained", model=str(copy.model.relative_to(target.path)))
    return True


def _train_missing(pipeline, run, verbose):
    """Train, in order, the stages of `pipeline` not yet trained in `run`."""
    for spec in pipeline.stages:
        if run.status(spec.name).get("status") != "trained":
            train_stage(pipeline, spec.name, run.path, verbose=verbose)


class JointModel(OptimizerBuiltFirst, keras.Model):
    """Trains every head at once; a step takes one `(inputs, target)` batch per head.

    Args:
        network: the unicon model with every head.
        heads: the head names, in the order of the batches of a step.
    """

    def __init__(self, network: keras.Model, heads: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network
        parts = model_parts(network)["heads"]
        self.heads = list(heads)
        self.tasks = [parts[h].task for h in self.heads]
        self.paths = [keras.Model({m: network.input[m] for m in parts[h].modalities}, network.output[h])
                      for h in self.heads]
        self.trackers = [keras.metrics.Mean(name="loss")] + [keras.metrics.Mean(name=f"{h}_loss") for h in self.heads]

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return self.trackers

    def train_step(self, data: Sequence[tuple[Any, tf.Tensor]]) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            losses = [task_kind(task).loss()(y, path(x, training=True))
                      for (x, y), path, task in zip(data, self.paths, self.tasks)]
            loss = tf.add_n(losses)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        for tracker, value in zip(self.trackers, [loss] + losses):
            tracker.update_state(value)
        return {t.name: t.result() for t in self.trackers}


def _joint(pipeline, run, verbose):
    specs = pipeline.stages
    heads = [pipeline.head_name(i) for i in range(len(specs))]
    out = StageFolder(run.baseline_dir("joint"))
    if out.is_trained():
        return [out]
    started = time.time()
    keras.utils.set_random_seed(specs[0].training.seed)
    network = foundation(pipeline.input_shape, modality=pipeline.head_modalities(0), task=specs[0].task,
                         name=pipeline.name, head_name=heads[0], **pipeline.encoder, **specs[0].head_options)
    for i, spec in enumerate(specs[1:], start=1):
        modalities = pipeline.head_modalities(i)
        new = [m for m in modalities if m not in network.input]
        network = expand(network, task=spec.task, modality=new[0] if new else None, name=heads[i],
                         modalities=modalities, **spec.head_options)
    set_trainable(network, True)
    makers = [stage_data(s, pipeline.head_modalities(i), heads[i]) for i, s in enumerate(specs)]
    # Every stage's data gets at least the optimizer steps it had in its continual stage.
    stage_steps = [int(m(0).cardinality()) for m in makers]
    steps = max(stage_steps)
    epochs = max(-(-s.training.epochs * n // steps) for s, n in zip(specs, stage_steps))

    def stage_batches(epoch):
        per_stage = [m(epoch).map(lambda x, y, h=h: (x, y[h])).repeat() for m, h in zip(makers, heads)]
        return tf.data.Dataset.zip(tuple(per_stage)).take(steps)

    joint = JointModel(network, heads)
    joint.compile(optimizer=FusedAdamW(specs[0].training.learning_rate, weight_decay=specs[0].training.weight_decay))
    history = []
    for epoch in range(epochs):
        joint.fit(stage_batches(epoch), epochs=1, verbose=progress_verbosity(verbose), shuffle=False)
        history.append({k: float(v[-1]) for k, v in joint.history.history.items()})
    out.path.mkdir(parents=True, exist_ok=True)
    save_model(network, out.model)
    out.write_record({
        "stage": "joint", "pipeline": pipeline.name, "strategy": "joint", "epochs": epochs, "steps_per_epoch": steps,
        "selection": {"select": "last", "monitor": None, "epoch": epochs, "epochs_run": epochs, "max_epochs": epochs,
                      "rule": describe_rule({"select": "last", "epoch": epochs, "max_epochs": epochs}),
                      "reason": f"fixed {epochs} epochs (no validation selection); kept the last epoch"},
        "heads": [{"head": h, "task": s.task, "data": str(s.data)} for h, s in zip(heads, specs)],
        "history": history, "train_seconds": round(time.time() - started, 2),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "unicon_tf": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
    })
    return [out]
