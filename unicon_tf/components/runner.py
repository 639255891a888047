"""A local runner: a pipeline's stages as a graph of component runs, with lineage and cache.

For every stage: ExampleGen (once per data source) -> Trainer -> Evaluator -> Pusher (and,
for a stage whose blessing is `bless: {min_vs_baseline: delta}`, its single-task baseline,
trained into `<run>/baselines/single_task/<stage>/` and given to the Evaluator). The
runner wires the components through their artifacts and gives each its output folder
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

from unicon_tf.components import evaluator, example_gen, pusher, trainer
from unicon_tf.components.base import Artifact, fingerprint
from unicon_tf.data import data_fingerprint
from unicon_tf.files import sha256, write_json_atomic
from unicon_tf.run import Run
from unicon_tf.train.baselines import train_single_task
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline

COMPONENTS = {"ExampleGen": example_gen, "Trainer": trainer, "Evaluator": evaluator, "Pusher": pusher}
UNDEFINING = ("resume", "accept_changes", "pipeline", "profile_batch")  # parameters that change no result of their own (the stage's are separate)


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

    def __init__(self, pipeline, run_dir, base="saved_models", model_name=None, data_root=None, verbose=1):
        self.pipeline = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline, data_root)
        self.directory = Run.create(run_dir, self.pipeline.name, self.pipeline.path)
        self.base, self.model_name, self.verbose = pathlib.Path(base), model_name, verbose
        self.run_dir, self.lineage_file = self.directory.path, self.directory.lineage_file
        self.lineage = (json.loads(self.lineage_file.read_text()) if self.lineage_file.exists()
                        else {"pipeline": self.pipeline.name, "executions": {}, "events": []})

    def run(self, stages=None, from_stage=None, evaluate=True, push=True, **overrides):
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
            StageError, TrainingError, DataError, ExportError: from the components.
        """
        names = [s.name for s in self.pipeline.stages]
        if from_stage is not None:
            self.pipeline.stage(from_stage)
            stages = names[names.index(from_stage):]
        stages = list(stages or names)
        for name in stages:
            self.pipeline.stage(name)
        results = {}
        for name in stages:
            index, _ = self.pipeline.stage(name)
            outputs = {"model": self._train(index, overrides)}
            if evaluate:
                outputs.update(self._evaluate(index, outputs["model"]))
            if evaluate and push:
                outputs.update(self._run("Pusher", f"Pusher.{name}",
                                         {"model": outputs["model"], "blessing": outputs["blessing"]},
                                         {"base": str(self.base), "model_name": self.model_name}, None))
            results[name] = outputs
        return results

    def _examples(self, spec):
        if spec.source is None:
            return Artifact("Examples", str(spec.data), "external", data_fingerprint(spec.data))
        parameters = dict(self.pipeline.sources[spec.source])
        key = fingerprint("ExampleGen", parameters)
        return self._run("ExampleGen", f"ExampleGen.{spec.source}", {}, parameters,
                         self.directory.examples_dir(spec.source, key))["examples"]

    def _train(self, index, overrides):
        spec = self.pipeline.stages[index]
        inputs = {"examples": self._examples(spec), "base_model": self._model(index - 1) if index > 0 else None}
        params = {"pipeline": self.pipeline.to_json(), "stage": spec.name,
                  **{k: v for k, v in overrides.items() if v is not None}}
        folder = self.directory.stage(index, spec.name)
        model = self._run("Trainer", f"Trainer.{spec.name}", inputs, params, folder.path)["model"]
        if model.properties.get("worker"):
            return model
        self.directory.mark(index, spec.name, spec.fingerprint(), status="trained",
                      model=str(folder.model.relative_to(self.directory.path)))
        return model

    def _evaluate(self, index, model):
        name = self.pipeline.stages[index].name
        inputs = {"model": model, "baseline": self._evaluation(index - 1) if index > 0 else None,
                  "single_task": self._single_task(index)}
        folder = self.directory.stage(index, name)
        return self._run("Evaluator", f"Evaluator.{name}", inputs, {"split": "test"}, folder.evaluation)

    def _single_task(self, index):
        """The Model artifact of stage `index`'s single-task baseline, trained now if needed,
        when the stage's blessing asks for it (`bless: {min_vs_baseline}`); else None."""
        spec = self.pipeline.stages[index]
        if (spec.training.bless or {}).get("min_vs_baseline") is None:
            return None
        stages = [dataclasses.replace(s, data=pathlib.Path(self._examples(s).uri), source=None)
                  for s in self.pipeline.stages]
        pipeline = dataclasses.replace(self.pipeline, stages=stages, sources={})
        folder = train_single_task(pipeline, self.run_dir, spec.name, verbose=self.verbose)
        return Artifact("Model", str(folder.path), f"single_task.{spec.name}", sha256(folder.model),
                        {"stage": spec.name})

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
        record = self.lineage["executions"].get(f"Evaluator.{self.pipeline.stages[index].name}")
        if record:
            return Artifact(**record["outputs"]["evaluation"])
        model = self._model(index)
        return None if model is None else self._evaluate(index, model)["evaluation"]

    def _run(self, component, run_id, inputs, parameters, output_dir):
        module = COMPONENTS[component]
        module.SPEC.check(inputs, parameters)
        defining = {k: v for k, v in parameters.items() if k not in UNDEFINING}
        key = fingerprint(component, defining, {k: a.fingerprint for k, a in inputs.items() if a is not None})
        record = self.lineage["executions"].get(run_id)
        if record and record["fingerprint"] == key and all(
                not o["uri"] or pathlib.Path(o["uri"]).exists() for o in record["outputs"].values()):
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


def execute_recorded(run_id, record, output_dir=None, verbose=0):
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


def format_lineage(lineage):
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
