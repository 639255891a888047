"""TFX-style components (spec + executor) and a local runner with lineage and caching.

| component    | inputs                      | outputs                  | calls                        |
|--------------|-----------------------------|--------------------------|------------------------------|
| `ExampleGen` | -                           | Examples                 | `unicon_tf.data.ingest`      |
| `Trainer`    | Examples, base Model        | Model                    | `unicon_tf.train.train_stage`|
| `Evaluator`  | Model                       | Evaluation, Blessing     | `unicon_tf.evaluate`         |
| `Pusher`     | Model, Blessing             | PushedModel (or skipped) | `unicon_tf.serving`          |
"""

from unicon_tf.components.base import Artifact, ComponentSpec, fingerprint
from unicon_tf.components.runner import COMPONENTS, LocalRunner, format_lineage

__all__ = ["Artifact", "COMPONENTS", "ComponentSpec", "LocalRunner", "fingerprint", "format_lineage"]
