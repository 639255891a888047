"""The pipelines of `pipelines/*.yaml` on Kubeflow Pipelines v2 (and so Vertex AI Pipelines).

Needs the `kfp` extra (`pip install 'unicon-tf[kfp]'`). `compile_pipeline` writes a KFP
pipeline spec with one task per component run of `LocalRunner`'s graph (ExampleGen,
Trainer, Evaluator, Pusher per stage), each running the same executor in the image
built from the repository's Dockerfile (`unicon_tf.kubeflow.tasks`); `format_task_graph`
prints a compiled spec's tasks.

Example:
>>> from unicon_tf.kubeflow import compile_pipeline, format_task_graph, load_spec  # doctest: +SKIP
>>> compile_pipeline("pipelines/chest_ct.yaml", "chest_ct.json", image="unicon-tf:0.1.0")  # doctest: +SKIP
>>> print(format_task_graph(load_spec("chest_ct.json")))  # doctest: +SKIP
"""

from unicon_tf.kubeflow.compiler import DEFAULT_IMAGE, build_pipeline, compile_pipeline, format_task_graph, load_spec

__all__ = ["DEFAULT_IMAGE", "build_pipeline", "compile_pipeline", "format_task_graph", "load_spec"]
