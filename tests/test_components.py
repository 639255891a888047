"""TFX-style components through the local runner: artifacts, lineage, cache, Pusher gate."""

import ast
import json

import keras
import numpy as np
import pytest
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
