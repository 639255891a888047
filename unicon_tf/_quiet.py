"""Import TensorFlow once, keeping its start-up banners off the terminal.

TensorFlow's C++ runtime prints oneDNN, CUDA-stub and CPU-feature notices on import and
on first device discovery. They are captured in a temporary file and shown only if the
import fails, so real errors are never hidden.
"""

import os
import sys
import tempfile


def import_tensorflow_quietly():
    """Import `tensorflow` and `keras` with fd 2 captured; replay it if the import fails.

    Also hides TensorFlow's C++ INFO messages (warnings and errors still show) unless
    `TF_CPP_MIN_LOG_LEVEL` is already set.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured by a host)
        import tensorflow as tf  # noqa: F401

        return
    sys.stderr.flush()
    saved_fd = os.dup(stderr_fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), stderr_fd)
        try:
            import keras  # noqa: F401
            import tensorflow as tf

            tf.config.list_physical_devices()  # device probing logs now, not mid-run
        except BaseException:
            os.dup2(saved_fd, stderr_fd)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved_fd, stderr_fd)
            os.close(saved_fd)
