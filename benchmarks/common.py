"""What the benchmarks share (run them as `python benchmarks/<name>.py`)."""

import argparse
import time

import numpy as np


def integer_options(doc, **defaults):
    """Parse `--name N` options (`name=default` each) for a benchmark whose docstring is `doc`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser.parse_args()


def median_seconds(fn, repeats):
    """Median wall time of `fn()` over `repeats` calls, after one warm-up call (tracing,
    oneDNN primitive creation)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
