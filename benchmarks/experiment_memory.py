"""Memory of a long experiment grid: resident memory after each cell of a small grid run in
this process (2 folds, fractions 0.5 and 1, continual and single-task, 16^3 phantom).

A grid trains hundreds of models in one process. Measured on the 2-core development
machine: about +100 MB per cell after the first cells (8 cells: 1052 to 1786 MB; the phantom
experiment's process went from 6.3 to 7.8 GB over 16 cells). Not fixed yet; what is known:
every model is freed after its cell (no `keras.Model`, layer or variable survives a
`gc.collect()`), but TensorFlow `FuncGraph`s accumulate, about 330 per cell (Keras'
`one_step_on_data` train functions and one small graph per optimizer slot variable, ~16,000
graph `Operation`s); `keras.backend.clear_session()` after each cell and
`MALLOC_ARENA_MAX=2` change nothing (+97 and +111 MB per cell).

    python benchmarks/experiment_memory.py [--cells 12]
"""

import argparse
import pathlib
import resource
import tempfile

import yaml

from unicon_tf import data
from unicon_tf.data import phantom
from unicon_tf.experiment import ExperimentPlan, run_experiment
from unicon_tf.experiment import runner


def rss_mb():
    """Current resident set size in MB (Linux /proc; the peak where /proc is absent)."""
    status = pathlib.Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(cells, folder):
    """RSS in MB after each cell of a grid of about `cells` cells."""
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
    rss, run_cell = [], runner.Experiment.run_cell

    def measured(self, *args):
        record = run_cell(self, *args)
        rss.append(rss_mb())
        print(f"cell {len(rss)}: {rss[-1]:.0f} MB", flush=True)
        return record

    runner.Experiment.run_cell = measured
    fractions = (0.5, 1.0)
    seeds = max(1, cells // (2 * len(fractions) * 2))
    run_experiment(pipeline, folder / "out", ExperimentPlan(folds=2, seeds=tuple(range(seeds)), fractions=fractions,
                                                             baselines=("single_task",)))
    return rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=12, help="About how many cells to run.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rss = measure(args.cells, folder)
    later = rss[2:]
    growth = (later[-1] - later[0]) / max(1, len(later) - 1)
    print(f"RSS per cell (MB): {', '.join(f'{r:.0f}' for r in rss)}; growth {growth:+.1f} MB/cell after the first two")


if __name__ == "__main__":
    main()
