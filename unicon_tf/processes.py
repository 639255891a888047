"""Run a function in a fresh child process and get its result or its exception back here.

The experiment runner trains each cell this way: TensorFlow keeps the graphs of every model
a process trained (see `unicon_tf.experiment.runner`), and a child's memory goes back to the
system when it exits. Built on `multiprocessing` (the `spawn` start method) rather than
`concurrent.futures.ProcessPoolExecutor`, which can neither stop a running task nor say how
its worker died. The child:

- is spawned, not forked: a fork would copy this process's TensorFlow threads and state;
- starts with SIGINT ignored (inherited from the moment it is started): Ctrl-C reaches the
  whole process group, and this process then stops the child, which so prints no traceback
  from inside an import and never keeps training after the parent gave up;
- exits within about a second once this process is gone (killed, timed out, `docker stop`),
  so that it never goes on writing into folders a rerun uses;
- sends back what the function returned, or the exception it raised, re-raised here with the
  child's traceback as its `__cause__` (`ChildTraceback`).

Example:
>>> import operator
>>> run_in_child(operator.add, 2, 3, what="an addition")  # doctest: +SKIP
5
"""

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from unicon_tf.run import StageError

PARENT_POLL_SECONDS = 1.0


class ChildTraceback(Exception):
    """The traceback, as text, of an exception a child process raised (the `__cause__` of
    that exception when `run_in_child` re-raises it)."""


def run_in_child(function: Callable[..., Any], *args: Any, what: str) -> Any:
    """`function(*args)` in a fresh spawned child process; its return value.

    `function` and `args` are pickled to the child (`function` importable by name there: a
    module-level function), the result back.

    Args:
        function: what the child runs.
        *args: its arguments.
        what: names the work in errors ("Cell continual fold 0 seed 0 frac1").

    Returns:
        What `function` returned in the child.

    Raises:
        Exception: whatever `function` raised in the child, re-raised here from a
            `ChildTraceback` (its traceback there).
        StageError: the child died before reporting (killed by a signal, such as the
            out-of-memory killer's SIGKILL, or failed while starting, e.g. a script without an
            `if __name__ == "__main__":` guard), naming `what` and how it ended.
        KeyboardInterrupt, or any error raised in this process while it waits: the child is
            stopped first.
    """
    context = multiprocessing.get_context("spawn")
    connection, child_end = context.Pipe()
    child = context.Process(target=_child, args=(child_end, os.getpid()), name=f"unicon-tf: {what}")
    with _sigint_ignored():  # a short window: the work itself is sent once the child runs
        child.start()
    child_end.close()
    try:
        connection.send((function, args))
        outcome = connection.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the child is gone without a word
        outcome = None
    except BaseException:
        child.terminate()
        child.join()
        raise
    finally:
        connection.close()
    child.join()
    if outcome is None:
        raise StageError(f"{what}: its process {_ending(child.exitcode)}.")
    returned, value, trace = outcome
    if not returned:
        raise value from ChildTraceback(trace)
    return value


def _child(connection, parent: int) -> None:
    _exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # where the parent could not ignore it for us (not its main thread)
    try:
        function, args = connection.recv()  # imports what the function needs (TensorFlow, for a cell)
        outcome = (True, function(*args), None)
    except BaseException as error:
        outcome = (False, error, traceback.format_exc())
    try:
        connection.send(outcome)
    except Exception as error:  # a result or exception that does not pickle
        connection.send((False, StageError(f"the child's outcome could not be sent back ({error}): "
                                           f"{outcome[1]!r}"[:2000]), outcome[2]))
    connection.close()


def _exit_with_parent(parent: int) -> None:
    """End this process once `parent` is no longer its parent (it died; the child was re-parented)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="unicon-tf parent watch", daemon=True).start()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child starts (a fork, an exec and a few bytes), so that the child
    inherits `SIG_IGN` from its first instruction: Python keeps an inherited `SIG_IGN`, and
    the child's imports then never end in a KeyboardInterrupt traceback. Only the main
    thread may change a handler; elsewhere the child ignores SIGINT once it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ending(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return (f"exited with code {exitcode} before reporting (its error is printed above; a script that starts "
            "it at its top level needs an `if __name__ == \"__main__\":` guard: the child imports the script)")
