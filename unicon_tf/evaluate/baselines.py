"""The reference runs a continual run is judged against, each in `<run>/baselines/<kind>/`:

- `single_task`: the respective baselines of UNICON: for each stage, a model trained from
  scratch on that stage's data alone (same head, modalities, epochs, batch, learning rate);
- `naive`: the same pipeline with every later stage fine-tuned without protection (the
  forgetting baseline);
- `joint`: one multi-task model with every head, trained on all stages' data at once
  (each step takes one batch of every stage's data, for as many steps as the longest
  continual stage took; the upper reference).

Stage 0 of the continual run already *is* the first single-task model and the first naive
stage (same spec, same seed, trained from scratch), so both reuse it when it is trained.

Each writes `evaluation/matrix.json` in the continual run's format (single-task: only the
diagonal; joint: one row, after all stages).
"""

import dataclasses
import json
import shutil

import keras
import tensorflow as tf

from unicon_tf.evaluate.evaluator import evaluate_run
from unicon_tf.evaluate.scores import MAIN_METRIC, head_metrics, predict_head
from unicon_tf.files import save_model_atomic, write_json_atomic
from unicon_tf.model import expand, foundation, model_parts
from unicon_tf.train.losses import TASK_LOSSES
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline, with_overrides
from unicon_tf.train.stage import RunDirectory, stage_data, train_stage
from unicon_tf.train.strategies import set_trainable

KINDS = ("single_task", "naive", "joint")


def head_name(pipeline, index):
    """The output name a stage's head gets (as `expand` or `foundation` names it)."""
    spec = pipeline.stages[index]
    modalities = head_modalities(pipeline, index)
    if spec.head:
        return spec.head
    return spec.task if len(modalities) == 1 else f"{spec.task}_{''.join(modalities)}"


def head_modalities(pipeline, index):
    spec = pipeline.stages[index]
    if spec.modalities:
        return list(spec.modalities)
    return [pipeline.modality] + ([spec.modality] if spec.modality else [])


def run_baselines(pipeline, run_dir, kinds=KINDS, data_root=None, verbose=0):
    """Train and evaluate the baselines of `pipeline` under `<run_dir>/baselines/`.

    Args:
        pipeline: a `PipelineSpec` or pipeline file.
        run_dir: the continual run's directory.
        kinds: which of `single_task`, `naive`, `joint`.
        data_root: for relative data paths of a pipeline file.
        verbose: Keras verbosity.

    Returns:
        `{kind: matrix dict}`.
    """
    if not isinstance(pipeline, PipelineSpec):
        pipeline = load_pipeline(pipeline, data_root=data_root)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"Unknown baseline(s) {sorted(unknown)}: expected {list(KINDS)}.")
    base = run_dir / "baselines"
    runners = {"single_task": _single_task, "naive": _naive, "joint": _joint}
    return {kind: runners[kind](pipeline, run_dir, base / kind, verbose) for kind in kinds}


def _single_task(pipeline, run_dir, out, verbose):
    heads = [head_name(pipeline, i) for i in range(len(pipeline.stages))]
    tasks = [s.task for s in pipeline.stages]
    n = len(heads)
    matrix = [[None] * n for _ in range(n)]
    metrics = [[None] * n for _ in range(n)]
    for i, spec in enumerate(pipeline.stages):
        alone = dataclasses.replace(spec, modality=None, modalities=tuple(head_modalities(pipeline, i)),
                                    head=heads[i], adapters=None)
        single = dataclasses.replace(pipeline, name=f"{pipeline.name}-{spec.name}-alone", stages=[alone])
        target = RunDirectory(out / spec.name, single)
        if i > 0 or alone.modalities != (pipeline.modality,) or not _reuse_first_stage(run_dir, pipeline, target):
            _train_missing(single, target, verbose)
        model = keras.models.load_model(target.model_path(0))
        result = predict_head(model, heads[i], spec.data, "test")
        metrics[i][i] = head_metrics(tasks[i], result)
        matrix[i][i] = metrics[i][i][MAIN_METRIC[tasks[i]]]
    return _save(out, "single_task", pipeline, heads, tasks, matrix, metrics, [s.name for s in pipeline.stages])


def _naive(pipeline, run_dir, out, verbose):
    stages = [pipeline.stages[0]] + [with_overrides(s, strategy="naive") for s in pipeline.stages[1:]]
    naive = dataclasses.replace(pipeline, stages=stages)
    target = RunDirectory(out, naive)
    _reuse_first_stage(run_dir, pipeline, target)
    _train_missing(naive, target, verbose)
    result = evaluate_run(out, write_predictions=False, kind="naive")
    result.pop("predictions")
    return result


def _reuse_first_stage(run_dir, pipeline, target):
    """Copy the continual run's trained stage 0 into the baseline run `target`; True if it is there."""
    if _is_trained(target, 0):
        return True
    continual = RunDirectory(run_dir, pipeline)
    if not _is_trained(continual, 0):
        return False
    shutil.copytree(continual.stage_dir(0), target.stage_dir(0), dirs_exist_ok=True)
    target.mark(0, status="trained", model=str(target.model_path(0).relative_to(target.path)))
    return True


def _train_missing(pipeline, run, verbose):
    """Train, in order, the stages of `pipeline` not yet trained in `run` (a `RunDirectory`)."""
    for index, spec in enumerate(pipeline.stages):
        if not _is_trained(run, index):
            train_stage(pipeline, spec.name, run.path, verbose=verbose)


def _is_trained(run, index):
    return run.record["stages"].get(run.pipeline.stages[index].name, {}).get("status") == "trained"


class JointModel(keras.Model):
    """Trains every head at once; a step takes one `(inputs, target)` batch per head."""

    def __init__(self, network, heads, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        parts = model_parts(network)["heads"]
        self.heads = list(heads)
        self.tasks = [parts[h].task for h in self.heads]
        self.paths = [keras.Model({m: network.input[m] for m in parts[h].modalities}, network.output[h])
                      for h in self.heads]
        self.trackers = [keras.metrics.Mean(name="loss")] + [keras.metrics.Mean(name=f"{h}_loss") for h in self.heads]

    @property
    def metrics(self):
        return self.trackers

    def train_step(self, data):
        with tf.GradientTape() as tape:
            losses = [TASK_LOSSES[task](y, path(x, training=True))
                      for (x, y), path, task in zip(data, self.paths, self.tasks)]
            loss = tf.add_n(losses)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        for tracker, value in zip(self.trackers, [loss] + losses):
            tracker.update_state(value)
        return {t.name: t.result() for t in self.trackers}


def _joint(pipeline, run_dir, out, verbose):
    specs = pipeline.stages
    heads = [head_name(pipeline, i) for i in range(len(specs))]
    keras.utils.set_random_seed(specs[0].training["seed"])
    network = foundation(pipeline.input_shape, modality=head_modalities(pipeline, 0), task=specs[0].task,
                         name=pipeline.name, head_name=heads[0], **pipeline.encoder, **specs[0].head_options)
    for i, spec in enumerate(specs[1:], start=1):
        new = [m for m in head_modalities(pipeline, i) if m not in network.input]
        network = expand(network, task=spec.task, modality=new[0] if new else None, name=heads[i],
                         modalities=head_modalities(pipeline, i), **spec.head_options)
    set_trainable(network, True)
    makers = [stage_data(s, head_modalities(pipeline, i), heads[i]) for i, s in enumerate(specs)]
    # Every stage's data gets at least the optimizer steps it had in its continual stage.
    stage_steps = [int(m(0).cardinality()) for m in makers]
    steps = max(stage_steps)
    epochs = max(-(-s.training["epochs"] * n // steps) for s, n in zip(specs, stage_steps))

    def stage_batches(epoch):
        per_stage = [m(epoch).map(lambda x, y, h=h: (x, y[h])).repeat() for m, h in zip(makers, heads)]
        return tf.data.Dataset.zip(tuple(per_stage)).take(steps)

    joint = JointModel(network, heads)
    joint.compile(optimizer=keras.optimizers.AdamW(specs[0].training["learning_rate"],
                                                   weight_decay=specs[0].training["weight_decay"]))
    history = []
    for epoch in range(epochs):
        joint.fit(stage_batches(epoch), epochs=1, verbose=verbose, shuffle=False)
        history.append({k: float(v[-1]) for k, v in joint.history.history.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_model_atomic(network, out / "model.keras")
    write_json_atomic(out / "history.json", history)
    tasks = [s.task for s in specs]
    metrics = [None] * len(specs)
    for i, spec in enumerate(specs):
        result = predict_head(network, heads[i], spec.data, "test")
        metrics[i] = head_metrics(tasks[i], result)
    matrix = [[m[MAIN_METRIC[t]] for m, t in zip(metrics, tasks)]]
    return _save(out, "joint", pipeline, heads, tasks, matrix, [metrics], ["all stages"])


def _save(out, kind, pipeline, heads, tasks, matrix, metrics, rows):
    result = {"run": str(out), "kind": kind, "pipeline": pipeline.name, "split": "test", "stages": rows,
              "tasks": heads, "task_kinds": tasks, "main_metric": [MAIN_METRIC[t] for t in tasks],
              "matrix": matrix, "metrics": metrics}
    write_json_atomic(out / "evaluation" / "matrix.json", result)
    return result


def load_baselines(run_dir):
    """`{kind: matrix dict}` of the baselines already evaluated under `<run_dir>/baselines/`."""
    found = {}
    for kind in KINDS:
        path = run_dir / "baselines" / kind / "evaluation" / "matrix.json"
        if path.exists():
            found[kind] = json.loads(path.read_text())
    return found
