"""Evaluator: a `Model` artifact -> `Evaluation` and `Blessing` artifacts.

Scores every head of the model on its own data; blesses it against the previous stage's
row, which the optional `baseline` Evaluation artifact (the previous stage's) carries,
and, for a stage with `bless: {min_vs_baseline: delta}`, against the optional
`single_task` Model artifact (the stage's single-task baseline of the same run).
Writes into `context["output_dir"]`.
"""

from collections.abc import Mapping
from typing import Any

from unicon_tf.components.base import Artifact, ComponentSpec, fingerprint
from unicon_tf.evaluate import evaluate_stage

SPEC = ComponentSpec(
    name="Evaluator",
    inputs={"model": "Model", "baseline": "Evaluation?", "single_task": "Model?"},
    outputs={"evaluation": "Evaluation", "blessing": "Blessing"},
    parameters=("split",),
)


def execute(inputs: Mapping[str, Artifact], parameters: Mapping[str, Any],
            context: Mapping[str, Any]) -> dict[str, Artifact]:
    """Evaluate the model artifact; bless it or say why not."""
    baseline, single_task = inputs.get("baseline"), inputs.get("single_task")
    result = evaluate_stage(inputs["model"].uri, baseline.properties["row"] if baseline else None,
                            split=parameters.get("split", "test"), out=context["output_dir"],
                            single_task=single_task.uri if single_task else None)
    folder, blessing = result["folder"], result["blessing"]
    return {
        "evaluation": Artifact("Evaluation", str(folder.path), context["id"], fingerprint(result["row"]),
                               {"tasks": result["tasks"], "row": result["row"]}),
        "blessing": Artifact("Blessing", str(folder.blessing_file), context["id"], fingerprint(blessing),
                             {"blessed": blessing["blessed"], "reasons": blessing["reasons"]}),
    }
