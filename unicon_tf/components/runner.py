"""A local runner: a pipeline's stages as a graph of component runs, with lineage and cache.

For every stage: ExampleGen (once per data source) -> Trainer -> Evaluator -> Pusher. Each
run is recorded in `<run>/lineage.json` with its parameters, the artifacts that went in and
came out, and a fingerprint of all of them; a component whose fingerprint is unchanged
and whose outputs exist is not run again (a cache hit, also recorded).

Example:
>>> runner = LocalRunner("pipelines/chest_ct.yaml", "runs/chest_ct")  # doctest: +SKIP
>>> runner.run()  # doctest: +SKIP
"""

import datetime
import json
import pathlib
import time

from unicon_tf.components import evaluator, example_gen, pusher, trainer
from unicon_tf.components.base import Artifact, fingerprint
from unicon_tf.data.records import sha256
from unicon_tf.files import write_json_atomic
from unicon_tf.train.pipeline import PipelineSpec, load_pipeline
from unicon_tf.train.stage import RunDirectory, data_fingerprint

COMPONENTS = {"ExampleGen": example_gen, "Trainer": trainer, "Evaluator": evaluator, "Pusher": pusher}


class LocalRunner:
    """Runs a pipeline's components in order in one process.

    Args:
        pipeline: a `PipelineSpec` or pipeline YAML path.
        run_dir: the run directory (stages, lineage, ingested examples).
        base: TF Serving base folder for the Pusher.
        model_name: served model name (default: the pipeline's name).
        data_root: for relative paths of a pipeline file.
        verbose: Keras verbosity.
    """

    def __init__(self, pipeline, run_dir, base="saved_models", model_name=None, data_root=None, verbose=1):
        self.pipeline = pipeline if isinstance(pipeline, PipelineSpec) else load_pipeline(pipeline, data_root)
        self.run_dir = pathlib.Path(run_dir)
        self.base, self.model_name, self.verbose = pathlib.Path(base), model_name, verbose
        self.lineage_file = self.run_dir / "lineage.json"
        self.lineage = (json.loads(self.lineage_file.read_text()) if self.lineage_file.exists()
                        else {"pipeline": self.pipeline.name, "executions": {}, "events": []})

    def run(self, stages=None, from_stage=None, evaluate=True, push=True, **overrides):
        """Run the given stages (default: all, or all from `from_stage`) through the graph.

        Args:
            stages: stage names to run (each needs its previous stage trained).
            from_stage: run this stage and every later one.
            evaluate: run the Evaluator after each Trainer.
            push: run the Pusher after each Evaluator (needs `evaluate`).
            **overrides: Trainer parameters (strategy, epochs, learning_rate).

        Returns:
            `{stage: {output name: Artifact}}` of the stages run.
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
            index, spec = self.pipeline.stage(name)
            examples = self._examples(spec)
            inputs = {"examples": examples, "base_model": self._model(index - 1) if index > 0 else None}
            params = {"stage": name, **{k: v for k, v in overrides.items() if v is not None}}
            outputs = self._run("Trainer", f"Trainer.{name}", inputs, params)
            if evaluate:
                outputs.update(self._run("Evaluator", f"Evaluator.{name}", {"model": outputs["model"]},
                                         {"stage": name, "split": "test"}))
            if evaluate and push:
                outputs.update(self._run("Pusher", f"Pusher.{name}",
                                         {"model": outputs["model"], "blessing": outputs["blessing"]},
                                         {"stage": name, "base": str(self.base), "model_name": self.model_name}))
            results[name] = outputs
        return results

    def _examples(self, spec):
        if spec.source is None:
            return Artifact("Examples", str(spec.data), "external", data_fingerprint(spec.data))
        parameters = dict(self.pipeline.sources[spec.source])
        return self._run("ExampleGen", f"ExampleGen.{spec.source}", {}, parameters)["examples"]

    def _model(self, index):
        """The Model artifact of stage `index`: from the lineage, or from the run directory."""
        name = self.pipeline.stages[index].name
        record = self.lineage["executions"].get(f"Trainer.{name}")
        if record:
            return Artifact(**record["outputs"]["model"])
        run = RunDirectory(self.run_dir, self.pipeline)
        if not run.model_path(index).exists():
            return None  # the Trainer (train_stage) refuses with the reason
        return Artifact("Model", str(run.stage_dir(index)), "external", sha256(run.model_path(index)), {"stage": name})

    def _run(self, component, run_id, inputs, parameters):
        module = COMPONENTS[component]
        module.SPEC.check(inputs, parameters)
        defining = {k: v for k, v in parameters.items() if k != "resume"}  # resuming changes no result
        key = fingerprint(component, defining, {k: a.fingerprint for k, a in inputs.items() if a is not None})
        record = self.lineage["executions"].get(run_id)
        if record and record["fingerprint"] == key and all(
                not o["uri"] or pathlib.Path(o["uri"]).exists() for o in record["outputs"].values()):
            self._event(run_id, cached=True)
            return {k: Artifact(**v) for k, v in record["outputs"].items()}
        context = {"id": run_id, "pipeline": self.pipeline, "run_dir": self.run_dir, "verbose": self.verbose,
                   "output_dir": self.run_dir / "examples" / f"{run_id.split('.', 1)[1]}-{key[:12]}"}
        started = time.time()
        outputs = module.execute({k: a for k, a in inputs.items() if a is not None}, parameters, context)
        self.lineage["executions"][run_id] = {
            "component": component, "fingerprint": key, "parameters": parameters,
            "inputs": {k: a.to_json() for k, a in inputs.items() if a is not None},
            "outputs": {k: a.to_json() for k, a in outputs.items()}, "seconds": round(time.time() - started, 2),
        }
        self._event(run_id, cached=False)
        return outputs

    def _event(self, run_id, cached):
        self.lineage["events"].append({"run": run_id, "cached": cached,
                                       "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        write_json_atomic(self.lineage_file, self.lineage)


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
