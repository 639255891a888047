"""Experiments a paper can stand on: cross-validation folds x seeds x training fractions,
the continual run and its baselines in every cell, intervals on every comparison.

| module      | what                                                                  |
|-------------|-----------------------------------------------------------------------|
| `folds`     | patient-level stratified folds, nested training fractions, re-split records |
| `runner`    | `run_experiment`: the cells, through the components, resumable        |
| `aggregate` | means, intervals, paired tests, patient bootstrap, forgetting, data efficiency |
| `report`    | `report.md` with tables and PNG figures                               |
"""

from unicon_tf.experiment.aggregate import aggregate, paired_tests, patient_bootstrap, summary_interval
from unicon_tf.experiment.folds import Patient, make_folds, read_patients, training_subset, write_split
from unicon_tf.experiment.runner import ARMS, Experiment, ExperimentPlan, run_experiment

__all__ = ["ARMS", "Experiment", "ExperimentPlan", "Patient", "aggregate", "make_folds", "paired_tests", "patient_bootstrap",
           "read_patients", "run_experiment", "summary_interval", "training_subset", "write_split"]
