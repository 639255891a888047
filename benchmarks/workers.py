"""Benchmark workers: each framework measured in a process of its own, driven in turns.

TensorFlow and PyTorch in one process interfere (a CUDA build of torch imported after
TensorFlow crashes in `triton`; their OpenMP pools compete), so `ratios.py` starts one
worker process per framework and thread count and asks them in turns (A B A B) for
measurements. A worker reads one JSON request per line on stdin, `{"op": name, **args}`,
and answers one JSON line on its own stdout; everything the libraries print goes to
stderr. Its first line says whether it is ready or why not (`{"error": "not installed"}`).
This module imports neither framework.
"""

import json
import os
import resource
import subprocess
import sys


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux's ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def thread_environment(threads):
    """Environment variables that fix a worker's compute threads (OpenMP, MKL, TensorFlow's
    intra-op pool; its inter-op pool keeps its default) before its framework loads."""
    count = str(threads)
    return {"OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count, "TF_NUM_INTRAOP_THREADS": count,
            "TF_CPP_MIN_LOG_LEVEL": "2"}


def serve(handlers, ready):
    """Answer requests on stdin with `handlers[op](**args)` until stdin closes.

    Args:
        handlers: `{op: function returning a JSON-serialisable value}`.
        ready: the first line's content (`{"ready": True, ...}` or `{"error": why}`).
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the libraries print must not mix with the answers
    sys.stdout = sys.stderr
    answers.write(json.dumps(ready) + "\n")
    if "error" in ready:
        return
    for line in sys.stdin:
        request = json.loads(line)
        answers.write(json.dumps({"result": handlers[request.pop("op")](**request)}) + "\n")


class Worker:
    """A worker process (`python script --threads N`) and its request channel.

    Attributes:
        ready: the worker's first line (`{"error": ...}` when it cannot measure).
    """

    def __init__(self, script, threads):
        self.threads = threads
        here = os.path.dirname(os.path.abspath(__file__))
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(here, script), "--threads", str(threads)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, **thread_environment(threads)})
        self.ready = self._answer()

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.process.args[1:]} exited with {self.process.wait()}")
        return json.loads(line)

    def __call__(self, op, **args):
        """The worker's answer to `op(**args)`."""
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.process.stdin.flush()
        return self._answer()["result"]

    def close(self):
        self.process.stdin.close()
        self.process.wait()

