"""Register unicon_tf's Keras layers whenever Keras gets imported.

`import unicon_tf` does not import TensorFlow (so `unicon-tf --help` answers at once). It
installs a one-shot import hook instead: when Keras is first imported, it is imported
quietly and `unicon_tf.model` follows, registering `ModalityStem`, the heads and the
encoder with Keras, so `keras.models.load_model` reads a saved stage after a plain
`import unicon_tf`. (Keras 3 itself imports the module named in a saved config only for
its own packages: without `import unicon_tf`, a load fails with "Could not locate class".)

This module sits above `unicon_tf.model` (it imports it when Keras arrives), and `_quiet`
below both: `unicon_tf.model` imports `_quiet`, never this module.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

from unicon_tf._quiet import stderr_captured


class _OnKerasImport(importlib.abc.MetaPathFinder):
    """Finds `keras` through the normal path finder, once, and wraps its loading: quiet,
    then `unicon_tf.model` (which registers the layers)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):  # only when Keras is loaded, not merely looked up
            uninstall_keras_hook()
            with stderr_captured():
                execute(module)
                tf = sys.modules.get("tensorflow")
                if tf is not None and not getattr(tf.__spec__, "_initializing", False):
                    tf.config.list_physical_devices()  # device probing logs now, not mid-run
            importlib.import_module("unicon_tf.model")

        spec.loader.exec_module = exec_module
        return spec


def install_keras_hook() -> None:
    """Register unicon_tf's layers now if Keras is imported, else when it first is."""
    if "keras" in sys.modules:
        importlib.import_module("unicon_tf.model")
    elif not any(isinstance(finder, _OnKerasImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OnKerasImport())


def uninstall_keras_hook() -> None:
    """Remove the hook (it removes itself when Keras is first loaded)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _OnKerasImport)]
