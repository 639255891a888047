"""The pipelines on Kubeflow Pipelines v2: the compiled spec, and a run under kfp.local."""

import json
import pathlib

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from unicon_tf.cli import main

kfp = pytest.importorskip("kfp")

CHEST_CT = pathlib.Path(__file__).parents[1] / "pipelines" / "chest_ct.yaml"
STAGES = ["classification", "prognosis", "segmentation", "pet"]


def chest_ct_with_resources(folder, resources):
    """chest_ct.yaml with `resources` on its segmentation stage."""
    spec = yaml.safe_load(CHEST_CT.read_text())
    spec["stages"][2]["resources"] = resources
    path = folder / "chest_ct.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tasks_by_name(spec):
    """`{display name: (task, component, the dsl.If task it is under or None)}` of a compiled IR."""
    found = {}

    def walk(dag, condition):
        for task in dag["tasks"].values():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"], task)
            else:
                found[task["taskInfo"]["name"]] = (task, component, condition)

    walk(spec["root"]["dag"], None)
    return found


def test_compiled_chest_ct_loads_back_with_its_tasks_types_dependencies_and_blessing_condition(tmp_path):
    pipeline = chest_ct_with_resources(tmp_path, {"cpu": 8, "memory": "32G", "gpu": 1})
    output = tmp_path / "out" / "chest_ct.json"
    result = CliRunner().invoke(main, ["compile", str(pipeline), "--target", "kfp", "--output", str(output),
                                       "--image", "registry.example/unicon-tf:9", "--data-root", "gs://bucket/data"])
    assert result.exit_code == 0, result.output

    component = kfp.components.load_component_from_file(str(output))  # the KFP SDK reads it back
    assert component.name == "chest-ct"
    spec = component.pipeline_spec  # the IR as protobuf; compare with the file as plain data
    assert spec.root.dag.tasks.keys() == json.loads(output.read_text())["root"]["dag"]["tasks"].keys()
    spec = json.loads(output.read_text())
    tasks = tasks_by_name(spec)
    expected = {"ImportExamples.classification"} | {f"{c}.{s}" for s in STAGES
                                                    for c in ("Trainer", "Evaluator", "Pusher")}
    assert set(tasks) == expected

    def source(task_name, input_name):
        """(producer display name, output) of a task's input, through a dsl.If's channels."""
        task, _, condition = tasks[task_name]
        entry = task["inputs"]["artifacts"][input_name]
        if "componentInputArtifact" in entry:
            entry = condition["inputs"]["artifacts"][entry["componentInputArtifact"]]
        producer = entry["taskOutputArtifact"]
        name = spec["root"]["dag"]["tasks"][producer["producerTask"]]["taskInfo"]["name"]
        return name, producer["outputArtifactKey"]

    def output_types(task_name):
        outputs = tasks[task_name][1].get("outputDefinitions", {})
        return ({k: v["artifactType"]["schemaTitle"] for k, v in outputs.get("artifacts", {}).items()},
                {k: v["parameterType"] for k, v in outputs.get("parameters", {}).items()})

    assert output_types("Trainer.prognosis") == ({"model": "system.Model"}, {})
    assert output_types("Evaluator.pet") == ({"evaluation": "system.Metrics", "blessing": "system.Artifact"},
                                             {"Output": "BOOLEAN"})  # blessed
    assert output_types("Pusher.pet") == ({"pushed_model": "system.Artifact"}, {})
    for stage in STAGES:
        assert source(f"Trainer.{stage}", "examples") == ("ImportExamples.classification", "artifact")
        assert source(f"Evaluator.{stage}", "model") == (f"Trainer.{stage}", "model")
        assert source(f"Pusher.{stage}", "model") == (f"Trainer.{stage}", "model")
        assert source(f"Pusher.{stage}", "blessing") == (f"Evaluator.{stage}", "blessing")
        _, _, condition = tasks[f"Pusher.{stage}"]  # the Pusher runs only if its Evaluator blessed the stage
        blessed = condition["inputs"]["parameters"]
        channel = next(k for k, v in blessed.items() if v.get("taskOutputParameter", {}).get(
            "outputParameterKey") == "Output")
        producer = blessed[channel]["taskOutputParameter"]["producerTask"]
        assert spec["root"]["dag"]["tasks"][producer]["taskInfo"]["name"] == f"Evaluator.{stage}"
        assert condition["triggerPolicy"]["condition"] == f"inputs.parameter_values['{channel}'] == true"
        assert tasks[f"Trainer.{stage}"][2] is None and tasks[f"Evaluator.{stage}"][2] is None
    for previous, stage in zip(STAGES, STAGES[1:]):
        assert source(f"Trainer.{stage}", "base_model") == (f"Trainer.{previous}", "model")
        assert source(f"Evaluator.{stage}", "baseline") == (f"Evaluator.{previous}", "evaluation")
    assert "base_model" not in tasks["Trainer.classification"][0]["inputs"]["artifacts"]

    executors = spec["deploymentSpec"]["executors"]
    containers = [e["container"] for e in executors.values() if "container" in e]
    assert len(containers) >= 4 and {c["image"] for c in containers} == {"registry.example/unicon-tf:9"}
    importer = next(e["importer"] for e in executors.values() if "importer" in e)
    assert importer["typeSchema"]["schemaTitle"] == "system.Dataset"
    assert importer["metadata"] == {"type": "Examples"}
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["classification_examples"]["defaultValue"] == "gs://bucket/data/phantom/lesion32"
    assert parameters["serving_base"]["defaultValue"] == "/models"
    assert parameters["model_name"]["defaultValue"] == "chest_ct"
    for name in ("Trainer.segmentation", "Evaluator.segmentation", "Trainer.pet"):
        resources = executors[tasks[name][1]["executorLabel"]]["container"].get("resources", {})
        if name == "Trainer.pet":
            assert resources == {}
        else:
            assert resources["resourceCpuLimit"] == "8" and resources["resourceMemoryLimit"] == "32G"
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
    trainer = tasks["Trainer.pet"][0]["inputs"]["parameters"]
    assert trainer["stage"]["runtimeValue"]["constant"] == "pet"
    config = json.loads(trainer["pipeline"]["runtimeValue"]["constant"])
    assert [s["name"] for s in config["stages"]] == STAGES and config["stages"][2]["resources"]["gpu"] == 1

    # the printed task graph: stage by stage, with resources and the blessing condition
    lines = result.output.splitlines()
    assert lines[0] == "pipeline chest-ct: 13 tasks"
    names = [line.split("  ")[0] for line in lines[2:] if line and not line.startswith(" ")]
    assert names[:5] == ["ImportExamples.classification", "Trainer.classification", "Evaluator.classification",
                         "Pusher.classification", "Trainer.prognosis"]
    assert set(names) == expected | {f"wrote {output}"}
    assert "Trainer.segmentation  [cpu 8, memory 32G, 1 x nvidia.com/gpu]" in lines
    assert "Pusher.pet  if Evaluator.pet.Output == true" in lines
    assert "    base_model <- Trainer.prognosis.model: Model (system.Model)" in lines
    assert "    -> Output: blessed (boolean)" in lines and "    -> artifact: Examples (system.Dataset)" in lines

    same = CliRunner().invoke(main, ["compile", str(pipeline), "--output", str(tmp_path / "chest_ct.yaml"),
                                     "--image", "registry.example/unicon-tf:9", "--data-root", "gs://bucket/data"])
    assert same.exit_code == 0 and yaml.safe_load((tmp_path / "chest_ct.yaml").read_text()) == spec


@pytest.mark.parametrize("resources, named", [({"memory": "lots"}, "memory"), ({"gpus": 1}, "gpus"),
                                              ({"gpu": -1}, "gpu"), ({"cpu": "eight"}, "cpu")])
def test_bad_resources_are_refused_naming_the_file_stage_and_key(tmp_path, resources, named):
    pipeline = chest_ct_with_resources(tmp_path, resources)
    output = tmp_path / "chest_ct.json"
    output.write_text("{}")  # an earlier compile is left as it was
    result = CliRunner().invoke(main, ["compile", str(pipeline), "--output", str(output)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(pipeline) in result.output and "stage 'segmentation'" in result.output and named in result.output
    assert output.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["chest_ct.json",
                                                                                          "chest_ct.yaml"]


def test_compile_refuses_an_output_that_is_not_yaml_or_json(tmp_path):
    result = CliRunner().invoke(main, ["compile", str(CHEST_CT), "--output", str(tmp_path / "p.txt")])
    assert result.exit_code == 1 and "p.txt" in result.output and ".json" in result.output


def records(root, pattern):
    """The unicon records KFP output artifacts of one kind hold (JSON files), by producer."""
    found = {}
    for path in root.glob(pattern):
        record = json.loads(path.read_text())
        found[record["producer"]] = record
    return found


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # kfp.local: an image not named 'python' runs here
@pytest.mark.filterwarnings("ignore:.*no effect in the current local runner:UserWarning")  # display names
def test_a_two_stage_pipeline_runs_under_kfp_local_as_under_the_local_runner(runner_run, tmp_path, monkeypatch):
    """kfp.local runs each task as a subprocess of this Python (no containers): the same
    executors give the same stage models (weights) and blessings as `LocalRunner`."""
    import keras
    from kfp import local

    import unicon_tf
    from unicon_tf.kubeflow.compiler import build_pipeline

    pipeline, _, _, expected = runner_run  # classification blessed, prognosis not

    monkeypatch.setenv("PYTHONPATH", str(pathlib.Path(unicon_tf.__file__).parents[1]))  # the tasks' unicon_tf
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               workspace_root=str(tmp_path / "workspace"))
    build_pipeline(pipeline, base=tmp_path / "kfp_models")()

    runs = list((tmp_path / "kfp").iterdir())
    assert len(runs) == 1
    root = runs[0]
    for stage, outputs in expected.items():
        (model_dir,) = [p.parent for p in root.glob("trainer*/model/stage.json")
                        if json.loads(p.read_text())["stage"] == stage]
        ours = keras.models.load_model(model_dir / "model.keras")
        theirs = keras.models.load_model(pathlib.Path(outputs["model"].uri) / "model.keras")
        assert [w.path for w in ours.weights] == [w.path for w in theirs.weights]
        for a, b in zip(ours.weights, theirs.weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{stage}: {a.path}")
    blessings = records(root, "evaluator*/blessing")
    assert {producer: r["properties"] for producer, r in blessings.items()} == {
        f"Evaluator.{stage}": outputs["blessing"].properties for stage, outputs in expected.items()}
    evaluations = {json.loads((p / "blessing.json").read_text())["stage"]: json.loads((p / "metrics.json").read_text())
                   for p in root.glob("evaluator*/evaluation")}
    assert set(evaluations) == set(expected)
    pushed = records(root, "pusher*/pushed_model")  # the condition ran the Pusher for the blessed stage only
    assert list(pushed) == ["Pusher.classification"] and pushed["Pusher.classification"]["properties"]["pushed"]
    assert (tmp_path / "kfp_models" / "tiny" / "1" / "saved_model.pb").exists()
    assert not (tmp_path / "kfp_models" / "tiny" / "2").exists()
    assert expected["classification"]["pushed_model"].properties["pushed"]
    assert not expected["prognosis"]["pushed_model"].properties["pushed"]


def test_compile_without_the_kfp_extra_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    for name in [n for n in sys.modules if n == "kfp" or n.startswith(("kfp.", "unicon_tf.kubeflow"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "kfp", None)  # as if not installed
    result = CliRunner().invoke(main, ["compile", str(CHEST_CT), "--output", str(tmp_path / "p.json")])
    assert result.exit_code == 1 and "pip install 'unicon-tf[kfp]'" in result.output
    assert not (tmp_path / "p.json").exists()


def test_each_kfp_task_signature_matches_its_component_spec():
    """A KFP task takes the component spec's inputs and gives its outputs, under the same
    names, as the KFP types that carry their unicon types (optional where the spec says `?`),
    and its parameters are the spec's, but for the stated KFP encodings."""
    from kfp import dsl

    from unicon_tf.components import COMPONENTS
    from unicon_tf.kubeflow.artifacts import KFP_TYPES
    from unicon_tf.kubeflow.tasks import TASKS
    from unicon_tf.train.pipeline import SOURCE_KEYS

    as_artifact = {("ExampleGen", "manifest"): "system.Dataset"}  # a parameter imported as a KFP artifact
    bundled = {("ExampleGen", "source"): SOURCE_KEYS - {"manifest"}}  # the `sources` entry as one dict
    local_only = {("Evaluator", "single_task")}  # KFP trains no single-task baseline
    run_only = {"strategy", "epochs", "learning_rate", "init", "resume", "distribute", "precision", "profile_batch",
                "accept_changes"}  # the Trainer parameters `unicon-tf run` overrides; a KFP task takes the pipeline's
    assert set(TASKS) == set(COMPONENTS)
    for name, function in TASKS.items():
        spec, kfp = COMPONENTS[name].SPEC, dsl.component(function, base_image="unicon-tf:test",
                                                               install_kfp_package=False).component_spec
        artifacts = {k: v for k, v in kfp.inputs.items() if v.type.startswith("system.")}
        expected = {k: (KFP_TYPES[t.rstrip("?")].schema_title, t.endswith("?")) for k, t in spec.inputs.items()
                    if (name, k) not in local_only}
        expected.update({k: (t, False) for (component, k), t in as_artifact.items() if component == name})
        assert {k: (v.type.split("@")[0], v.optional) for k, v in artifacts.items()} == expected, name
        outputs = {k: v.type.split("@")[0] for k, v in kfp.outputs.items() if k != "Output"}
        assert outputs == {k: KFP_TYPES[t].schema_title for k, t in spec.outputs.items()}, name
        parameters = set(kfp.inputs) - set(artifacts) - {"run_id"}
        covered = set()
        for parameter in parameters:
            covered |= bundled.get((name, parameter), {parameter})
        assert covered | {k for (c, k) in as_artifact if c == name} == set(spec.parameters) - run_only, name

