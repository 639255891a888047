"""A function in a fresh child process (`unicon_tf.processes.run_in_child`, the experiment's
cells): its result or exception comes back, and the child never outlives its parent."""

import contextlib
import operator
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from unicon_tf.processes import ChildTraceback, run_in_child
from unicon_tf.run import StageError


def _killed():
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer ends a process


def test_the_child_s_result_and_exception_come_back():
    assert run_in_child(operator.add, 2, 3, what="an addition") == 5
    with pytest.raises(ZeroDivisionError) as raised:
        run_in_child(operator.truediv, 1, 0, what="a division")
    assert isinstance(raised.value.__cause__, ChildTraceback) and "ZeroDivisionError" in str(raised.value.__cause__)


def test_a_killed_child_is_a_stage_error_naming_the_work_and_the_signal():
    with pytest.raises(StageError, match=r"^a cell: its process was killed by SIGKILL \(out of memory\?\)\.$"):
        run_in_child(_killed, what="a cell")


def _children(pid):
    return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _running(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _ignores_sigint(pid):
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(mask & (1 << (signal.SIGINT - 1)))


def _worker(pid):
    """The parent's spawned worker (not multiprocessing's resource tracker), once it exists."""
    for child in _children(pid):
        with contextlib.suppress(FileNotFoundError):
            if b"spawn_main" in pathlib.Path(f"/proc/{child}/cmdline").read_bytes():  # once it has exec'd
                return child
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes' children and signal masks from /proc")
@pytest.mark.parametrize("signal_to", ["group:SIGINT", "parent:SIGINT", "parent:SIGTERM", "parent:SIGKILL"])
def test_the_child_ends_with_its_parent_without_a_traceback(signal_to):
    whom, name = signal_to.split(":")
    # Ctrl-C raises KeyboardInterrupt as in a terminal, even where this test runs with SIGINT ignored
    # (a background job of a non-interactive shell inherits SIG_IGN)
    code = ("import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from unicon_tf.processes import run_in_child; run_in_child(time.sleep, 60, what='a sleep')")
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while (_worker(parent.pid) is None or _ignores_sigint(parent.pid)) and time.time() < deadline:
        time.sleep(0.05)  # until `start()` is over: the parent ignores SIGINT while it forks the child
    child = _worker(parent.pid)
    assert child is not None and not _ignores_sigint(parent.pid), "the child did not start"
    assert _ignores_sigint(child)  # inherited: Ctrl-C during its imports is no traceback
    # Ctrl-C reaches the whole group, a supervisor's signal the parent alone
    (os.killpg if whom == "group" else os.kill)(parent.pid, signal.Signals[name])
    parent.wait(timeout=30)
    deadline = time.time() + 10
    while _running(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _running(child)
    errors = parent.stderr.read()
    assert "SpawnProcess" not in errors  # the child printed no traceback
    assert errors.count("Traceback") == (name == "SIGINT")  # only the parent's own KeyboardInterrupt
