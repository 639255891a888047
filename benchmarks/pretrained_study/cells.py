"""Run the pretrained study's cells one process each (`Experiment.run_cell`), for grids too
long for one process: an experiment process grows with every cell (on the preset, 8.8 GB
after three cells; `benchmarks/experiment_memory.py`), a fresh process per cell does not.
Finished cells are read back, so it resumes like `unicon-tf experiment`; afterwards
`run.sh`'s `pretrained_study.py` line compares the arms.

    python benchmarks/pretrained_study/cells.py WORK/real_ct --seeds 1 --fractions 0.25 0.5 \\
        --step-budget steps --arm pretrained --arm scratch:single_task

An `--arm` is `<config>[:<baseline>,...]`: `pretrained.yaml` or `scratch.yaml` of this folder
and the baselines run beside its continual run (e.g. `scratch:single_task`).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
CELL = """
import json, pathlib, sys
from unicon_tf.experiment.runner import Experiment, ExperimentPlan
plan, config, arm, fold, seed, fraction, data = json.loads(sys.argv[1])
experiment = Experiment(config, f"{data}/exp_{pathlib.Path(config).stem}", ExperimentPlan(**plan), data_root=data)
record = experiment.run_cell(arm, fold, seed, fraction)
print(f"{arm} fold {fold} seed {seed} fraction {fraction}:",
      {head: round(value, 3) for head, value in record["final"].items() if value is not None},
      f"({record['seconds']} s)", flush=True)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=pathlib.Path, help="the cohort's work folder (holds cohort/ and exp_<config>/)")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0])
    parser.add_argument("--step-budget", choices=["epochs", "steps"], default="epochs")
    parser.add_argument("--arm", action="append", required=True, help="<config>[:<baseline>,...]")
    args = parser.parse_args()
    for spec in args.arm:
        config, _, baselines = spec.partition(":")
        plan = {"folds": args.folds, "seeds": args.seeds, "fractions": args.fractions,
                "baselines": [b for b in baselines.split(",") if b], "step_budget": args.step_budget}
        for seed in args.seeds:
            for fold in range(args.folds):
                for fraction in args.fractions:
                    for arm in ["continual"] + plan["baselines"]:
                        print(f"== {time.strftime('%H:%M:%S')} {config} {arm} fold {fold} seed {seed} "
                              f"fraction {fraction}", flush=True)
                        cell = [plan, str(HERE / f"{config}.yaml"), arm, fold, seed, fraction, str(args.data)]
                        subprocess.run([sys.executable, "-c", CELL, json.dumps(cell)], check=True)


if __name__ == "__main__":
    main()
