"""unicon-tf: continual learning of 3D medical foundation models in TensorFlow/Keras.

One Keras model keeps growing: new task heads and new imaging modalities are added to a
shared 3D encoder without changing what the model already does (UNICON, arXiv 2508.14024).

Example:
>>> import unicon_tf
>>> model = unicon_tf.foundation(input_shape=(32, 32, 32), modality="ct", task="classification")
>>> model = unicon_tf.expand(model, task="prognosis")
>>> sorted(unicon_tf.describe(model)["heads"])
['classification', 'prognosis']
"""

from unicon_tf._quiet import import_tensorflow_quietly
from unicon_tf.version import __version__

import_tensorflow_quietly()

from unicon_tf.model import describe, expand, foundation  # noqa: E402

__all__ = ["__version__", "describe", "expand", "foundation"]
