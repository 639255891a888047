"""A function in a fresh child process (`unicon_tf.processes.run_in_child`, the experiment's
cells): its result or exception comes back, and the child never outlives its parent."""

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
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a process's children from /proc")
@pytest.mark.parametrize("signal_to", ["group:SIGINT", "parent:SIGINT", "parent:SIGTERM", "parent:SIGKILL"])
def test_the_child_ends_with_its_parent_without_a_traceback(signal_to):
    whom, name = signal_to.split(":")
    code = "import time; from unicon_tf.processes import run_in_child; run_in_child(time.sleep, 60, what='a sleep')"
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, start_new_session=True)
    started = time.time()
    while not _children(parent.pid) and time.time() - started < 30:
        time.sleep(0.05)
    time.sleep(0.5)  # past `start()`, whose few milliseconds ignore SIGINT in the parent too
    children = _children(parent.pid)
    assert children, "no child process started"
    # Ctrl-C reaches the whole group, a supervisor's signal the parent alone
    (os.killpg if whom == "group" else os.kill)(parent.pid, signal.Signals[name])
    parent.wait(timeout=30)
    deadline = time.time() + 10
    while any(_running(c) for c in children) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_running(c) for c in children)
    errors = parent.stderr.read()
    assert "SpawnProcess" not in errors  # the child printed no traceback
    assert errors.count("Traceback") == (name == "SIGINT")  # only the parent's own KeyboardInterrupt
