"""mixed_bfloat16 against float32 on the phantom stages: the final test metrics of the
same pipeline trained once per precision, and each run's wall time.

The pipeline is the demo's (`unicon_tf.demo.FULL`: classification, prognosis,
segmentation with a side encoder, PET segmentation with adapters) on one phantom cohort,
trained by the `LocalRunner` with `defaults.precision` set to each value in turn; the
metrics are the Evaluator's (AUC, C-index, Dice on the test split) after the last stage.
Step-time ratios, interleaved, are in `ratios.py` (column float32 / bfloat16); the wall
times here are one run each, for orientation only.

    python benchmarks/bfloat16_quality.py [--patients 96] [--out bfloat16_quality.json]   # ~20 min on 2 cores
"""

import argparse
import json
import os
import pathlib
import tempfile
import time

import yaml

from unicon_tf import evaluate
from unicon_tf.components import LocalRunner
from unicon_tf.data import phantom
from unicon_tf.demo import FULL
from unicon_tf.run import Run

PRECISIONS = ("float32", "mixed_bfloat16")


def measure(root, patients, echo=print):
    """`{precision: {"metrics": {task: final test metric}, "seconds": wall time of the run,
    "train_seconds": {stage: its training time}}}`."""
    root = pathlib.Path(root)
    phantom.write_cohort(root / "phantom", n=patients, shape=(FULL.cohort_shape,) * 3, spacing=3.0,
                         split_fractions={"train": 1 / 2, "val": 1 / 6})
    result = {}
    for precision in PRECISIONS:
        echo(f"{precision}: the demo's four stages")
        pipeline = FULL.pipeline((root / "phantom" / "manifest.csv").resolve())
        pipeline["defaults"]["precision"] = precision
        path = root / f"{precision}.yaml"
        path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
        started = time.perf_counter()
        LocalRunner(path, root / precision, base=root / f"serving_{precision}", verbose=0).run()
        seconds = time.perf_counter() - started
        matrix = evaluate.evaluate_run(root / precision, write_predictions=False)
        records = [folder.record() for folder in Run(root / precision).trained_stages()]
        train_seconds = {record["stage"]: record["train_seconds"] for record in records}
        result[precision] = {"metrics": dict(zip(matrix["tasks"], matrix["matrix"][-1])),
                             "main_metric": matrix["main_metric"], "seconds": seconds, "train_seconds": train_seconds}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=FULL.patients)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bfloat16_quality.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        result = {"patients": args.patients, "load_average_before": load, "runs": measure(root, args.patients)}
    result["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for precision, run in result["runs"].items():
        print(f"{precision:<16}" + "  ".join(f"{task} {value:.3f}" for task, value in run["metrics"].items())
              + f"  ({run['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
