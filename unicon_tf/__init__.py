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

from collections.abc import Callable
from typing import Any

from unicon_tf._keras_hook import install_keras_hook
from unicon_tf.version import __version__

install_keras_hook()  # Keras, once imported, can load saved unicon_tf models

__all__ = ["__version__", "describe", "expand", "foundation"]


def __getattr__(name: str) -> Callable[..., Any]:
    """`describe`, `expand` and `foundation` import TensorFlow on first use, not with the
    package: `unicon-tf --help` and `--version` stay fast (PEP 562)."""
    if name in ("describe", "expand", "foundation"):
        from unicon_tf import model

        return getattr(model, name)
    raise AttributeError(f"module 'unicon_tf' has no attribute {name!r}")
