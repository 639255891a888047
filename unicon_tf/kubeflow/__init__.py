"""The pipelines of `pipelines/*.yaml` on Kubeflow Pipelines v2 (and so Vertex AI Pipelines).

Needs the `kfp` extra (`pip install 'unicon-tf[kfp]'`).

- `unicon_tf.kubeflow.compiler`: `compile_pipeline` writes a KFP pipeline spec with one
  task per component run of `LocalRunner`'s graph (ExampleGen, Trainer, Evaluator, Pusher
  per stage); `format_task_graph` prints a compiled spec's tasks.
- `unicon_tf.kubeflow.tasks`: what each task runs, the same executors behind a thin adapter.
- `unicon_tf.kubeflow.artifacts`: the unicon artifact types as KFP artifacts.

The package imports none of them itself: a task imports only `tasks` (importing KFP's
compiler inside a running KFP task is a circular import in the kfp SDK).

Example:
>>> from unicon_tf.kubeflow.compiler import compile_pipeline, format_task_graph, load_spec  # doctest: +SKIP
>>> compile_pipeline("pipelines/chest_ct.yaml", "chest_ct.json", image="unicon-tf:0.1.0")  # doctest: +SKIP
>>> print(format_task_graph(load_spec("chest_ct.json")))  # doctest: +SKIP
"""
