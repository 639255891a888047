"""Memory of a long experiment grid: resident memory after each cell, with the runner's
release of each finished cell's Keras models (`unicon_tf.experiment.runner._release_models`)
and without it, each side in its own process on the same small grid.

A grid trains hundreds of models in one process; before the release the phantom experiment
(60 cells) grew by about 100 MB per cell. Prints each side's RSS per cell and the growth per
cell after the first two (the first cells load TensorFlow and trace the graphs).

    python benchmarks/experiment_memory.py [--cells 12]
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile


def side(release, cells, folder):
    """Run the grid in this process; print `{"rss_mb": [...]}` (RSS after each cell)."""
    import yaml

    from unicon_tf import data
    from unicon_tf.data import phantom
    from unicon_tf.experiment import ExperimentPlan, run_experiment
    from unicon_tf.experiment import runner

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
    if not release:
        runner._release_models = lambda: None
    rss, run_cell = [], runner.Experiment.run_cell

    def measured(self, *args):
        record = run_cell(self, *args)
        rss.append(_rss_mb())
        return record

    runner.Experiment.run_cell = measured
    fractions = (0.5, 1.0)
    seeds = max(1, cells // (2 * len(fractions) * 2))
    run_experiment(pipeline, folder / "out", ExperimentPlan(folds=2, seeds=tuple(range(seeds)), fractions=fractions,
                                                             baselines=("single_task",)))
    print(json.dumps({"rss_mb": rss}))


def _rss_mb():
    """Current resident set size in MB (Linux /proc; the peak where /proc is absent)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=12, help="About how many cells each side runs.")
    parser.add_argument("--side", choices=["release", "keep"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side(args.side == "release", args.cells, args.folder)
    results = {}
    for name in ("keep", "release"):
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run([sys.executable, __file__, "--side", name, "--folder", folder,
                                   "--cells", str(args.cells)], capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])["rss_mb"]
    for name, rss in results.items():
        later = rss[2:]
        growth = (later[-1] - later[0]) / max(1, len(later) - 1)
        print(f"{name:8s} RSS per cell (MB): {', '.join(f'{r:.0f}' for r in rss)}; growth {growth:+.1f} MB/cell")


if __name__ == "__main__":
    main()
