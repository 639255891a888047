"""A local runner: walks a pipeline's graph of component runs, with lineage and cache.

The graph (`unicon_tf.components.graph`) says, per stage, which runs there are and what
feeds each: ExampleGen (once per data source) -> Trainer -> Evaluator -> Pusher (and, for
a stage whose blessing is `bless: {min_vs_baseline: delta}`, its single-task baseline,
trained here into `<run>/baselines/single_task/<stage>/` and given to the Evaluator). The
runner resolves each run's inputs to artifacts and gives each its output folder
in the run directory (`unicon_tf.run`): ExampleGen `examples/<source>-<key>/`, Trainer
`stages/NN-<stage>/`, Evaluator `stages/NN-<stage>/evaluation/`; the Pusher writes a
version under the serving base. Each run is recorded in `<run>/lineage.json` with its
parameters, output folder, the artifacts that went in and came out, and a fingerprint
of all of them; a component whose fingerprint is unchanged and whose outputs exist is
not run again (a cache hit, also recorded). A recorded run can be executed again on its
own (`execute_recorded`): executors read nothing but their inputs and parameters.

Example:
>>> runner = LocalRunner("pipelines/chest_ct.yaml", "runs/chest_ct")  # doctest: +SKIP
>>> runner.run()  # doctest: +SKIP
"""

import dataclasses
import datetime
import json
import pathlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from unicon_tf.components import evaluator, example_gen, pusher, trainer
from unicon_tf.components.base import Artifact, fingerprint
from unicon_tf.components.graph import External, SingleTaskBaseline, pipeline_graph
from unicon_tf.data import data_fingerprint
from unicon_tf.files import folder_lock, sha256, write_json_atomic
from unicon_tf.run import Run, StageError
from unicon_tf.train.baselines import train_single_task
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline

COMPONENTS = {"ExampleGen": example_gen, "Trainer": trainer, "Evaluator": evaluator, "Pusher": pusher}
# parameters that change no result of their own (the stage's definition inside `pipeline` is
# compared by `changed_stage_definition`)
UNDEFINING = ("resume", "accept_changes", "pipeline", "profile_batch")


def changed_stage_definition(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields of a stage's definition that differ between a recorded component run's
    parameters and the current ones (both with `pipeline`, a `PipelineSpec.to_json`, and
    `stage`); `[]` when neither names a stage or nothing differs.

    The definition is what makes the stage's model: the pipeline's input shape, modality and
    encoder (a weights file by its path: another file is a change, a file overwritten in
    place is not seen) and the stage's own
    keys and training options (its data is compared by content, as the Examples artifact's
    fingerprint; `resources` and `training.profile_batch` change no result). Fields are
    named as in the pipeline file (`encoder`, `adapters`, `training.epochs`, ...). Records
    written before a field existed compare as its default.

    Example:
    >>> from unicon_tf.train.pipeline import StageSpec
    >>> spec = PipelineSpec("p", pathlib.Path("p.yaml"), (16, 16, 16), "ct", {}, [
    ...     StageSpec("a", "classification", pathlib.Path("data"))])
    >>> longer = dataclasses.replace(spec, stages=[dataclasses.replace(
    ...     spec.stages[0], training=spec.stages[0].training.replace(epochs=9))])
    >>> changed_stage_definition({"pipeline": spec.to_json(), "stage": "a"},
    ...                          {"pipeline": longer.to_json(), "stage": "a"})
    ['training.epochs']
    """
    if "pipeline" not in current or "stage" not in current or "pipeline" not in recorded:
        return []
    before, now = (_stage_definition(p["pipeline"], current["stage"]) for p in (recorded, current))
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def _stage_definition(config, stage):
    """`{field: value}` of what defines `stage`'s model in a pipeline's JSON (see `changed_stage_definition`)."""
    pipeline = PipelineSpec.from_json(config)
    _, spec = pipeline.stage(stage)
    fields = {"input_shape": list(pipeline.input_shape), "modality": pipeline.modality, "encoder": pipeline.encoder}
    fields.update({k: v for k, v in spec.to_json().items() if k not in ("data", "resources", "training")})
    fields.update({f"training.{k}": v for k, v in spec.training.to_json().items() if k != "profile_batch"})
    return fields


class LocalRunner:
    """Runs a pipeline's components in order in one process.

    Args:
        pipeline: a `PipelineSpec` or pipeline YAML path.
        run_dir: the run directory (stages, lineage, ingested examples).
        base: TF Serving base folder for the Pusher.
        model_name: served model name (default: the pipeline's name).
        data_root: for relative paths of a pipeline file.
        verbose: Keras verbosity.

    Raises:
        PipelineError: the pipeline file is invalid.
        StageError: `run_dir` holds a run of another pipeline.
    """

    def __init__(self, pipeline: PipelineSpec | pathlib.Path | str, run_dir: pathlib.Path | str,
                 base: pathlib.Path | str = "saved_models", model_name: str | None = None,
                 data_root: pathlib.Path | str | None = None, verbose: int = 1) -> None:
        self.pipeline = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline, data_root)
        self.run_dir = pathlib.Path(run_dir)
        self._open_run()
        self.base, self.model_name, self.verbose = pathlib.Path(base), model_name, verbose
        self.graph = pipeline_graph(self.pipeline)
        self.serving = {"base": str(self.base), "model_name": self.model_name}  # the Pusher's run-time parameters

    def _open_run(self):
        """Read the run directory's record and lineage (again: another process may have run there since)."""
        self.directory = Run.create(self.run_dir, self.pipeline.name, self.pipeline.path)
        self.lineage_file = self.directory.lineage_file
        self.lineage = (json.loads(self.lineage_file.read_text()) if self.lineage_file.exists()
                        else {"pipeline": self.pipeline.name, "executions": {}, "events": []})

    def run(self, stages: Iterable[str] | None = None, from_stage: str | None = None, evaluate: bool = True,
            push: bool = True, **overrides: Any) -> dict[str, dict[str, Artifact]]:
        """Run the given stages (default: all, or all from `from_stage`) through the graph.

        Args:
            stages: stage names to run (each needs its previous stage trained).
            from_stage: run this stage and every later one.
            evaluate: run the Evaluator after each Trainer.
            push: run the Pusher after each Evaluator (needs `evaluate`).
            **overrides: Trainer parameters (strategy, epochs, learning_rate, init, resume,
                accept_changes, distribute, precision, profile_batch).

        Returns:
            `{stage: {output name: Artifact}}` of the stages run: `model`, and with
            `evaluate` also `evaluation` and `blessing`, with `push` also `pushed_model`.

        Raises:
            PipelineError: an unknown stage or override.
            FolderInUseError: another process is running in this run directory.
            StageError, TrainingError, DataError, ExportError: from the components.
        """
        with folder_lock(self.run_dir, "run"):
            self._open_run()
            return self._run_stages(stages, from_stage, evaluate, push, overrides)

    def _run_stages(self, stages, from_stage, evaluate, push, overrides):
        names = [s.name for s in self.pipeline.stages]
        if from_stage is not None:
            self.pipeline.stage(from_stage)
            stages = names[names.index(from_stage):]
        stages = list(stages or names)
        for name in stages:
            self.pipeline.stage(name)
        results = {}
        for name in stages:
            trainer, evaluator, pusher = self.graph.stage_nodes(name)
            produced = {trainer.run_id: {"model": self._train(trainer, overrides)}}
            if evaluate:
                produced[evaluator.run_id] = self._execute(evaluator, produced)
            if evaluate and push:  # the Pusher's executor checks the blessing (its `condition`) itself
                produced[pusher.run_id] = self._execute(pusher, produced)
            results[name] = {k: a for outputs in produced.values() for k, a in outputs.items()}
        return results

    def _execute(self, node, produced, extra=None):
        """Run `node` on its inputs: outputs of this stage's runs so far (`produced`, by run
        id), earlier runs' outputs (`_upstream`), external data, the single-task baseline."""
        inputs = {name: self._artifact(source, produced) for name, source in node.inputs.items()}
        parameters = {**node.parameters, **{k: self.serving[k] for k in node.runtime}, **(extra or {})}
        return self._run(node.component, node.run_id, inputs, parameters, self._output_dir(node, parameters))

    def _output_dir(self, node, parameters):
        """Where a run writes in the run directory (`unicon_tf.run`); the Pusher writes under
        the serving base instead."""
        if node.component == "ExampleGen":
            return self.directory.examples_dir(node.stage, fingerprint("ExampleGen", parameters))
        if node.component == "Pusher":
            return None
        folder = self.directory.stage(self.pipeline.stage(node.stage)[0], node.stage)
        return folder.path if node.component == "Trainer" else folder.evaluation

    def _artifact(self, source, produced):
        """The artifact an input `source` of the graph stands for."""
        if isinstance(source, External):
            return Artifact("Examples", source.uri, "external", data_fingerprint(source.uri))
        if isinstance(source, SingleTaskBaseline):
            return self._single_task(source.stage)
        if source.run_id in produced:
            return produced[source.run_id][source.name]
        return self._upstream(source)

    def _upstream(self, source):
        """An output of a run not made in this stage: ExampleGen's (run now, or a cache hit),
        an earlier stage's Model or Evaluation (from the lineage or the run directory)."""
        node = self.graph.nodes[source.run_id]
        if node.component == "ExampleGen":
            return self._execute(node, {})[source.name]
        index, _ = self.pipeline.stage(node.stage)
        return self._model(index) if node.component == "Trainer" else self._evaluation(index)

    def _train(self, node, overrides):
        model = self._execute(node, {}, {k: v for k, v in overrides.items() if v is not None})["model"]
        if model.properties.get("worker"):
            return model
        index, spec = self.pipeline.stage(node.stage)
        folder = self.directory.stage(index, spec.name)
        self.directory.mark(index, spec.name, spec.fingerprint(), status="trained",
                            model=str(folder.model.relative_to(self.directory.path)))
        return model

    def _single_task(self, stage):
        """The Model artifact of `stage`'s single-task baseline (`bless: {min_vs_baseline}`),
        trained now if needed, on the same examples as the pipeline's stages."""
        examples = {s.name: self._artifact(self.graph.nodes[f"Trainer.{s.name}"].inputs["examples"], {})
                    for s in self.pipeline.stages}
        stages = [dataclasses.replace(s, data=pathlib.Path(examples[s.name].uri), source=None)
                  for s in self.pipeline.stages]
        pipeline = dataclasses.replace(self.pipeline, stages=stages, sources={})
        folder = train_single_task(pipeline, self.run_dir, stage, verbose=self.verbose)
        return Artifact("Model", str(folder.path), f"single_task.{stage}", sha256(folder.model), {"stage": stage})

    def _model(self, index):
        """The Model artifact of stage `index`: from the lineage, or from the run directory."""
        spec = self.pipeline.stages[index]
        record = self.lineage["executions"].get(f"Trainer.{spec.name}")
        if record:
            return Artifact(**record["outputs"]["model"])
        folder = self.directory.stage(index, spec.name)
        if self.directory.status(spec.name).get("status") != "trained" or not folder.is_trained():
            return None  # the Trainer (fit_stage) refuses with the reason
        return Artifact("Model", str(folder.path), "external", sha256(folder.model), {"stage": spec.name})

    def _evaluation(self, index):
        """The Evaluation artifact of stage `index`: from the lineage, or by evaluating it now."""
        name = self.pipeline.stages[index].name
        record = self.lineage["executions"].get(f"Evaluator.{name}")
        if record:
            return Artifact(**record["outputs"]["evaluation"])
        model = self._model(index)
        return None if model is None else self._execute(self.graph.nodes[f"Evaluator.{name}"],
                                                        {f"Trainer.{name}": {"model": model}})["evaluation"]

    def _run(self, component, run_id, inputs, parameters, output_dir):
        module = COMPONENTS[component]
        module.SPEC.check(inputs, parameters)
        defining = {k: v for k, v in parameters.items() if k not in UNDEFINING}
        key = fingerprint(component, defining, {k: a.fingerprint for k, a in inputs.items() if a is not None})
        record = self.lineage["executions"].get(run_id)
        if record and record["fingerprint"] == key and all(
                not o["uri"] or pathlib.Path(o["uri"]).exists() for o in record["outputs"].values()):
            changed = changed_stage_definition(record["parameters"], parameters)  # a Trainer's only
            if changed:
                raise StageError(
                    f"Stage '{parameters['stage']}' in {self.directory.path} was trained with other "
                    f"{', '.join(changed)} than {self.pipeline.path} now gives; a trained stage is never "
                    "overwritten: put the old values back, or run the changed pipeline in another --run-dir.")
            self._event(run_id, cached=True)
            return {k: Artifact(**v) for k, v in record["outputs"].items()}
        record = {"component": component, "fingerprint": key, "parameters": parameters,
                  "output_dir": None if output_dir is None else str(output_dir),
                  "inputs": {k: a.to_json() for k, a in inputs.items() if a is not None}}
        started = time.time()
        outputs = execute_recorded(run_id, record, verbose=self.verbose)
        if any(a.properties.get("worker") for a in outputs.values()):
            return outputs  # not the chief of a multi-worker strategy: it records nothing
        record.update(outputs={k: a.to_json() for k, a in outputs.items()}, seconds=round(time.time() - started, 2))
        self.lineage["executions"][run_id] = record
        self._event(run_id, cached=False)
        return outputs

    def _event(self, run_id, cached):
        self.lineage["events"].append({"run": run_id, "cached": cached,
                                       "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        write_json_atomic(self.lineage_file, self.lineage)


def execute_recorded(run_id: str, record: Mapping[str, Any], output_dir: pathlib.Path | str | None = None,
                     verbose: int = 0) -> dict[str, Artifact]:
    """Execute one component run from its lineage record alone: its component, parameters
    and input artifacts (what a container orchestrator hands a component).

    Args:
        run_id: the run's id (e.g. `Trainer.prognosis`), the outputs' producer.
        record: the run's entry of `lineage.json` (`component`, `parameters`, `inputs`,
            `output_dir`).
        output_dir: write the outputs here instead of the recorded folder.
        verbose: Keras verbosity.

    Returns:
        `{output name: Artifact}`.
    """
    module = COMPONENTS[record["component"]]
    inputs = {k: Artifact(**v) for k, v in record["inputs"].items()}
    context = {"id": run_id, "output_dir": output_dir or record["output_dir"], "verbose": verbose}
    return module.execute(inputs, record["parameters"], context)


def format_lineage(lineage: Mapping[str, Any]) -> str:
    """The lineage graph as text: each run, what went in and what came out."""
    lines = [f"pipeline {lineage['pipeline']}"]
    for run_id, record in lineage["executions"].items():
        lines.append(f"{run_id} ({record['seconds']} s)")
        for name, artifact in record["inputs"].items():
            lines.append(f"  <- {name}: {artifact['type']} {artifact['uri']} [{artifact['fingerprint'][:12]}]"
                         f" from {artifact['producer']}")
        for name, artifact in record["outputs"].items():
            detail = "" if artifact["uri"] else f" (not pushed: {artifact['properties'].get('reason', '')})"
            lines.append(f"  -> {name}: {artifact['type']} {artifact['uri'] or '-'} [{artifact['fingerprint'][:12]}]"
                         + detail)
    hits = sum(e["cached"] for e in lineage["events"])
    lines.append(f"{len(lineage['events'])} component runs, {hits} cache hits")
    return "\n".join(lines)
