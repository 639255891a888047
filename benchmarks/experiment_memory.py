"""Memory of a long experiment grid: the experiment process's resident memory after each cell
of a small grid (2 folds, fractions 0.5 and 1, continual and single-task, 16^3 phantom), with
every cell in its own child process (the default) and with every cell in this process
(`isolate_cells=False`), and the largest child's peak.

A grid trains hundreds of models. In one process, TensorFlow keeps the graphs of every model
trained: every `keras.Model`, layer and variable is freed after its cell, but `FuncGraph`s
accumulated, about 330 per cell until session 12 (Keras' `one_step_on_data` train functions and one small graph
per optimizer slot variable, ~16,000 graph `Operation`s); `keras.backend.clear_session()`
after each cell and `MALLOC_ARENA_MAX=2` change nothing. Measured on the 2-core development
machine in one process: about +100 MB per cell (8 cells: 1052 to 1786 MB; the phantom
experiment's process went from 6.3 to 7.8 GB over 16 cells, a preset process 8.8 GB after
three cells). Hence one child process per cell. Measured in one run (session 10, 8 cells per
mode, a shared 2-core CPU): with a child per cell the experiment process stayed at 757 MB
after every cell (+0.0 MB/cell), the largest child peaked at 1061 MB; in one process, 1061
to 1790 MB (+109.5 MB/cell after the first two). Session 12, after `ContinualModel` began
building its optimizer before the train step is traced (no slot-variable graphs, one trace
instead of two; `stage_startup.py`): a child per cell 801 MB after every cell (+0.0), the
largest child 1018 MB; in one process 1048 to 1367 MB (+45.4 MB/cell after the first two).
What is left is not Python's to free (session 13, 4 cells in one process, `gc.collect()` after
each): 2 to 4 `FuncGraph`s stay alive per cell (Keras' `one_step_on_data`), none reachable from
any Python module (`objgraph.find_backref_chain` finds no chain: they are held from
TensorFlow's C++ side), no `keras.Model` survives its cell, and the process still grows
(1055, 1077, 1086, 1179 MB). The same leak is reported upstream for plain `Model.fit` in a
loop (keras-team/keras#17458, open; #21090; tensorflow/tensorflow#61791): a child process per
cell is the remedy.

    python benchmarks/experiment_memory.py [--cells 8]
"""

import argparse
import pathlib
import resource
import tempfile

import yaml

from unicon_tf import data
from unicon_tf.data import phantom
from unicon_tf.experiment import ExperimentPlan, run_experiment


def rss_mb():
    """Current resident set size in MB (Linux /proc; the peak where /proc is absent)."""
    status = pathlib.Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(cells, folder):
    """`({mode: [this process's RSS in MB after each cell]}, the largest child's peak RSS in MB)` over a
    grid of about `cells` cells per mode."""
    folder = pathlib.Path(folder)
    cohort = phantom.write_cohort(folder / "phantom", n=24, shape=(32, 32, 32), seed=3, spacing=6.0)
    records = folder / "ct16"
    data.ingest(cohort, records, data.Preprocessing(shape=(16, 16, 16), spacing=(12.0, 12.0, 12.0), center="mask"),
                workers=1, verbose=False)
    stages = [{"name": "classification", "task": "classification", "num_classes": 2, "data": str(records)},
              {"name": "segmentation", "task": "segmentation", "side_encoder": 4, "data": str(records)}]
    pipeline = folder / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "memory", "input_shape": [16, 16, 16], "modality": "ct",
                                        "encoder": {"width": 8, "depth": 3},
                                        "defaults": {"epochs": 2, "batch_size": 2, "seed": 0}, "stages": stages}))
    fractions = (0.5, 1.0)
    seeds = max(1, cells // (2 * len(fractions) * 2))
    plan = ExperimentPlan(folds=2, seeds=tuple(range(seeds)), fractions=fractions, baselines=("single_task",))
    rss = {}
    for mode, isolate in (("child process per cell", True), ("one process", False)):
        rss[mode] = []

        def measured(line, trace=rss[mode]):
            trace.append(rss_mb())
            print(f"{mode}, cell {len(trace)}: {trace[-1]:.0f} MB ({line})", flush=True)

        run_experiment(pipeline, folder / f"out-{isolate}", plan, echo=measured, isolate_cells=isolate)
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return rss, children_peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8, help="About how many cells to run per mode.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rss, children_peak = measure(args.cells, folder)
    for mode, trace in rss.items():
        later = trace[2:]
        growth = (later[-1] - later[0]) / max(1, len(later) - 1)
        print(f"{mode}: RSS after each cell (MB) {', '.join(f'{r:.0f}' for r in trace)}; "
              f"growth {growth:+.1f} MB/cell after the first two")
    print(f"largest child process's peak RSS: {children_peak:.0f} MB")


if __name__ == "__main__":
    main()
