"""Import TensorFlow once, keeping its start-up banners off the terminal; a Keras progress
verbosity that suits where progress goes.

TensorFlow's C++ runtime prints oneDNN, CUDA-stub and CPU-feature notices on import and
on first device discovery. They are captured in a temporary file and shown only if the
import fails, so real errors are never hidden.

`unicon_tf._keras_hook` uses the same capture when Keras is first imported.
"""

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO


def import_tensorflow_quietly() -> None:
    """Import `tensorflow` and `keras` with fd 2 captured; replay it if the import fails.

    Also hides TensorFlow's C++ INFO messages (warnings and errors still show) unless
    `TF_CPP_MIN_LOG_LEVEL` is already set.
    """
    if "tensorflow" in sys.modules:
        return
    with stderr_captured():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # device probing logs now, not mid-run


@contextlib.contextmanager
def stderr_captured() -> Iterator[None]:
    """Run the body with fd 2 going to a temporary file, replayed if the body raises."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    try:
        stderr_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured by a host)
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(stderr_fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), stderr_fd)
        try:
            yield
        except BaseException:
            os.dup2(saved_fd, stderr_fd)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved_fd, stderr_fd)
            os.close(saved_fd)


def progress_verbosity(verbose: int, stream: TextIO | None = None) -> int:
    """The Keras `fit` verbosity that suits where progress goes: Keras' bar (`verbose=1`)
    redraws itself with backspaces, carriage returns and ANSI colour codes whatever the
    output is (its check `"posix" in sys.modules` holds on every Linux), which makes log
    files and CI logs unreadable; when `stream` (default: stdout) is not a terminal, one
    plain line per epoch (`verbose=2`) is printed instead.

    Args:
        verbose: 0 (silent), 1 (bar) or 2 (a line per epoch).
        stream: where Keras prints (default `sys.stdout`, read when called).

    Returns:
        `verbose`, or 2 for 1 when `stream` is not a terminal.

    Example:
    >>> import io
    >>> progress_verbosity(1, io.StringIO()), progress_verbosity(0, io.StringIO())
    (2, 0)
    """
    stream = sys.stdout if stream is None else stream
    interactive = getattr(stream, "isatty", None)
    if verbose == 1 and not (interactive and interactive()):
        return 2
    return verbose
