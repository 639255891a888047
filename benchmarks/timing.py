"""Shared timing helper of the benchmarks (run them as `python benchmarks/<name>.py`)."""

import time

import numpy as np


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
