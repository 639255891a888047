"""TFX-style components through the local runner: artifacts, lineage, cache, Pusher gate."""

import ast
import json

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from unicon_tf.cli import main
from unicon_tf.components import COMPONENTS, LocalRunner, execute_recorded, format_lineage


def imported_modules(module):
    """Every module a module's source imports (absolute names), from its syntax tree."""
    names = set()
    for node in ast.walk(ast.parse(open(module.__file__).read())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module.__name__}: relative import"
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_components_are_specs_plus_executors():
    components = {module.__name__ for module in COMPONENTS.values()}
    for name, module in COMPONENTS.items():
        assert module.SPEC.name == name and callable(module.execute)
        imported = imported_modules(module)
        # components do not import each other, nor the runner that wires them
        assert not imported & (components | {"unicon_tf.components.runner"}), (name, imported & components)
        assert not {"unicon_tf.components", "unicon_tf.components.runner"} & imported


def test_the_pipeline_graph_wires_each_run_once_for_both_runners(tmp_path):
    """The graph both runners read: each stage's runs, what feeds each input, the Pusher's
    condition, one ExampleGen per source (before its first stage), one parameter per
    external input, and the single-task baseline only where the blessing asks for it."""
    import yaml

    from unicon_tf.components.graph import External, Output, SingleTaskBaseline, pipeline_graph
    from unicon_tf.train.pipeline import load_pipeline

    spec = yaml.safe_load(open("pipelines/chest_ct.yaml"))
    spec["sources"] = {"lesion": {"manifest": "cohort/manifest.csv", "shape": [16, 16, 16], "spacing": [12, 12, 12]}}
    spec["stages"][1]["data"] = "lesion"
    spec["stages"][2]["bless"] = {"min_vs_baseline": 0.05}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    graph = pipeline_graph(load_pipeline(tmp_path / "p.yaml", data_root=tmp_path))
    stages = [s["name"] for s in spec["stages"]]
    assert list(graph.nodes) == [f"{c}.{s}" for s in stages[:1] for c in ("Trainer", "Evaluator", "Pusher")] + [
        "ExampleGen.lesion"] + [f"{c}.{s}" for s in stages[1:] for c in ("Trainer", "Evaluator", "Pusher")]
    first = spec["stages"][0]["data"]
    assert graph.externals == {
        f"{stages[0]}_examples": External("examples", str(tmp_path / first), f"{stages[0]}_examples",
                                          tuple(s["name"] for s in spec["stages"] if s["data"] == first)),
        "lesion_manifest": External("manifest", str(tmp_path / "cohort/manifest.csv"), "lesion_manifest", ("lesion",))}
    assert graph.parameters() == [*graph.externals, "serving_base", "model_name"]
    assert graph.nodes["ExampleGen.lesion"].parameters["manifest"] == str(tmp_path / "cohort/manifest.csv")
    trainer, evaluator, pusher = graph.stage_nodes(stages[1])
    assert trainer.inputs == {"examples": Output("ExampleGen.lesion", "examples"),
                              "base_model": Output(f"Trainer.{stages[0]}", "model")}
    assert trainer.parameters == {"pipeline": load_pipeline(tmp_path / "p.yaml", data_root=tmp_path).to_json(),
                                  "stage": stages[1]}
    assert evaluator.inputs == {"model": Output(trainer.run_id, "model"),
                                "baseline": Output(f"Evaluator.{stages[0]}", "evaluation")}
    assert pusher.inputs == {"model": Output(trainer.run_id, "model"), "blessing": Output(evaluator.run_id, "blessing")}
    assert pusher.condition == Output(evaluator.run_id, "blessing") and trainer.condition is None
    assert pusher.runtime == {"base": "serving_base", "model_name": "model_name"}
    assert graph.stage_nodes(stages[2])[1].inputs["single_task"] == SingleTaskBaseline(stages[2])
    assert "base_model" not in graph.nodes[f"Trainer.{stages[0]}"].inputs
    for node in graph.nodes.values():  # every input and parameter is one its component's spec declares
        spec_of = COMPONENTS[node.component].SPEC
        assert set(node.inputs) <= set(spec_of.inputs) and set(node.parameters) | set(node.runtime) <= set(
            spec_of.parameters), node.run_id
        assert all(isinstance(s, (External, SingleTaskBaseline)) or s.name in COMPONENTS[
            graph.nodes[s.run_id].component].SPEC.outputs for s in node.inputs.values()), node.run_id


@pytest.mark.e2e
def test_runner_records_lineage_caches_and_gates_the_pusher(runner_run):
    pipeline, run, base, results = runner_run
    first, second = results["classification"], results["prognosis"]
    assert first["model"].type == "Model" and (run / "stages/00-classification/model.keras").exists()
    assert json.loads((run / "stages/00-classification/stage.json").read_text())["data"]["path"].startswith(
        str(run / "examples" / "lesion16-"))
    examples_dirs = list((run / "examples").iterdir())
    assert len(examples_dirs) == 1 and (examples_dirs[0] / "schema.json").exists()  # one ExampleGen for both stages
    assert first["blessing"].properties["blessed"] and first["pushed_model"].properties["pushed"]
    assert (base / "tiny" / "1" / "saved_model.pb").exists()
    assert not second["blessing"].properties["blessed"]
    assert second["pushed_model"].properties == {"pushed": False, "reason": "; ".join(
        second["blessing"].properties["reasons"])}
    assert not (base / "tiny" / "2").exists()  # the Pusher skipped the unblessed stage

    lineage = json.loads((run / "lineage.json").read_text())
    assert list(lineage["executions"]) == ["ExampleGen.lesion16", "Trainer.classification", "Evaluator.classification",
                                           "Pusher.classification", "Trainer.prognosis", "Evaluator.prognosis",
                                           "Pusher.prognosis"]
    trainer = lineage["executions"]["Trainer.prognosis"]
    assert trainer["inputs"]["examples"]["producer"] == "ExampleGen.lesion16"
    assert trainer["inputs"]["base_model"]["fingerprint"] == lineage["executions"]["Trainer.classification"][
        "outputs"]["model"]["fingerprint"]
    # within one run the second stage reuses the ingested examples: the only cache hit
    assert [e["run"] for e in lineage["events"] if e["cached"]] == ["ExampleGen.lesion16"]
    assert len(lineage["events"]) == 8

    LocalRunner(pipeline, run, base=base, verbose=0).run()  # nothing changed: every run is a cache hit
    events = json.loads((run / "lineage.json").read_text())["events"]
    assert len(events) == 16 and all(e["cached"] for e in events[8:])
    assert not (base / "tiny" / "2").exists()

    text = format_lineage(json.loads((run / "lineage.json").read_text()))
    assert "not pushed" in text and "16 component runs, 9 cache hits" in text
    result = CliRunner().invoke(main, ["lineage", str(run)])
    assert result.exit_code == 0 and "Trainer.prognosis" in result.output
    rerun = CliRunner().invoke(main, ["run", str(pipeline), "--run-dir", str(run), "--base", str(base),
                                      "--from-stage", "prognosis"])
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((run / "lineage.json").read_text())["events"][-1]["cached"] is True

    # a stage whose definition changed since it was trained is refused, not returned from the cache
    model = run / "stages" / "01-prognosis" / "model.keras"
    trained = model.read_bytes()
    spec = yaml.safe_load(pipeline.read_text())
    for changes, named in (({"epochs": 2}, "training.epochs"), ({"learning_rate": 1e-2, "adapters": 2},
                                                                  "adapters, training.learning_rate")):
        spec["stages"][1] = {**spec["stages"][1], **changes}
        changed = pipeline.with_name("changed.yaml")
        changed.write_text(yaml.safe_dump(spec))
        spec["stages"][1] = {k: v for k, v in spec["stages"][1].items() if k not in changes}
        refused = CliRunner().invoke(main, ["run", str(changed), "--run-dir", str(run), "--base", str(base)])
        assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
        assert f"Stage 'prognosis' in {run} was trained with other {named} than {changed}" in refused.output
        assert "never overwritten" in refused.output and model.read_bytes() == trained


@pytest.mark.e2e
def test_a_recorded_component_run_executes_alone(runner_run, tmp_path):
    """What a container orchestrator needs: a component run is its recorded inputs and
    parameters; executed again elsewhere (no runner, no run directory around it), the
    Trainer gives the same model and the Evaluator the same blessing."""
    _, run, _, _ = runner_run
    executions = json.loads((run / "lineage.json").read_text())["executions"]
    trainer = executions["Trainer.prognosis"]
    assert trainer["inputs"]["base_model"]["uri"] == str(run / "stages" / "00-classification")
    assert trainer["output_dir"] == str(run / "stages" / "01-prognosis")
    assert executions["Evaluator.prognosis"]["inputs"]["baseline"]["producer"] == "Evaluator.classification"

    model = execute_recorded("Trainer.prognosis", trainer, output_dir=tmp_path / "elsewhere" / "model")["model"]
    assert model.uri == str(tmp_path / "elsewhere" / "model")  # a .keras file holds a date: compare the weights
    again = keras.models.load_model(tmp_path / "elsewhere" / "model" / "model.keras")
    original = keras.models.load_model(run / "stages" / "01-prognosis" / "model.keras")
    for a, b in zip(again.weights, original.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    evaluator = dict(executions["Evaluator.prognosis"], inputs={
        **executions["Evaluator.prognosis"]["inputs"], "model": model.to_json()})
    outputs = execute_recorded("Evaluator.prognosis", evaluator, output_dir=tmp_path / "elsewhere" / "evaluation")
    recorded = executions["Evaluator.prognosis"]["outputs"]
    assert outputs["evaluation"].properties == recorded["evaluation"]["properties"]
    assert outputs["blessing"].properties == recorded["blessing"]["properties"]
    assert (tmp_path / "elsewhere" / "evaluation" / "blessing.json").exists()
