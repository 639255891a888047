"""Evaluator: every head after a stage -> `Evaluation` and `Blessing` artifacts."""

import json
import pathlib

from unicon_tf.components.base import Artifact, ComponentSpec, fingerprint
from unicon_tf.evaluate import evaluate_run

SPEC = ComponentSpec(
    name="Evaluator",
    inputs={"model": "Model"},
    outputs={"evaluation": "Evaluation", "blessing": "Blessing"},
    parameters=("stage", "split"),
)


def execute(inputs, parameters, context):
    """Evaluate the run up to the model's stage; bless it or say why not."""
    result = evaluate_run(context["run_dir"], stage=parameters["stage"], split=parameters.get("split", "test"))
    folder = pathlib.Path(inputs["model"].uri) / "evaluation"
    blessing = json.loads((folder / "blessing.json").read_text())
    row = result["matrix"][-1]
    return {
        "evaluation": Artifact("Evaluation", str(folder), context["id"], fingerprint(row),
                               {"tasks": result["tasks"], "row": row, "summary": result["summary"]}),
        "blessing": Artifact("Blessing", str(folder / "blessing.json"), context["id"], fingerprint(blessing),
                             {"blessed": blessing["blessed"], "reasons": blessing["reasons"]}),
    }
