"""TFX-style components (spec + executor), the pipeline graph of their runs, and a local
runner with lineage and caching (the KFP compiler, `unicon_tf.kubeflow`, translates the same
graph).

| component    | inputs                      | outputs                  | calls                        |
|--------------|-----------------------------|--------------------------|------------------------------|
| `ExampleGen` | -                           | Examples                 | `unicon_tf.data.ingest`      |
| `Trainer`    | Examples, base Model        | Model                    | `unicon_tf.train.fit_stage`  |
| `Evaluator`  | Model, baseline Evaluation  | Evaluation, Blessing     | `unicon_tf.evaluate.evaluate_stage` |
| `Pusher`     | Model, Blessing             | PushedModel (or skipped) | `unicon_tf.serving.push_stage` |
"""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.components.base import Artifact, ComponentSpec, fingerprint  # noqa: E402
from unicon_tf.components.graph import PipelineGraph, pipeline_graph  # noqa: E402
from unicon_tf.components.runner import COMPONENTS, LocalRunner, execute_recorded, format_lineage  # noqa: E402

__all__ = ["Artifact", "COMPONENTS", "ComponentSpec", "LocalRunner", "PipelineGraph", "execute_recorded", "fingerprint",
           "format_lineage", "pipeline_graph"]
