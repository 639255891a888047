#!/usr/bin/env bash
# Issue 24 item 8: the pretrained frozen Astra I3ResNet-152
# + heads (pretrained.yaml) vs the from-scratch CNN foundation (scratch.yaml) vs the
# single-task model, for classification, prognosis and CT segmentation, 2 folds x 2 seeds, on
# one cohort; FRACTIONS="0.25 0.5 1" adds the data-fraction grid, STEP_BUDGET=steps divides a later
# stage's epochs (and patience) by the fraction (about as many optimizer steps at every fraction;
# with the default `epochs`, a quarter of 18 training patients is one or two steps per epoch).
#
#   benchmarks/pretrained_study/run.sh real-ct WORK [pyradiomics-3.0.1.tar.gz]
#   benchmarks/pretrained_study/run.sh phantom WORK
#
# Needs `pip install "unicon-tf[astra,dicom]"` (the preset's weights; SimpleITK for the real
# CT). Writes WORK/<cohort>/{cohort,exp_pretrained,exp_scratch} and the comparison to
# benchmarks/results/pretrained_study_<cohort>/. Hours on a 2-core CPU (the frozen encoder
# runs once per patient and fold-seed; its features are cached); minutes on a GPU.
# Each cell runs in its own process (the experiment's memory stays flat); an interrupted run
# resumes where it stopped.
set -euo pipefail
kind=${1:?phantom or real-ct}; work=${2:?work folder}; source=${3:-pyradiomics-3.0.1.tar.gz}
here=$(cd "$(dirname "$0")" && pwd)
data="$work/${kind//-/_}"
mkdir -p "$data"
if [ ! -f "$data/cohort/manifest.csv" ]; then
  if [ "$kind" = real-ct ]; then
    [ -f "$source" ] || pip download pyradiomics==3.0.1 --no-deps --no-binary :all: -d "$(dirname "$source")"
    unicon-tf phantom --anatomy real-ct --source "$source" --out "$data/cohort" -n 48 --shape 128 128 128 \
      --spacing 1.5 --lesion-radius 4 9 --lesion-contrast 100
  else
    unicon-tf phantom --out "$data/cohort" -n 48 --shape 64 64 64 --spacing 3 --lesion-radius 4 9 --lesion-contrast 60
  fi
fi
for arm in pretrained scratch; do
  unicon-tf experiment "$here/$arm.yaml" --data-root "$data" --folds 2 --seeds 2 --fractions ${FRACTIONS:-1} \
    --step-budget "${STEP_BUDGET:-epochs}" \
    --baselines single_task --out "$data/exp_$arm"
done
python "$here/../pretrained_study.py" --out "$here/../results/pretrained_study_${kind//-/_}" --reference single_task \
  --arm pretrained="$data/exp_pretrained:continual" --arm scratch="$data/exp_scratch:continual" \
  --arm single_task="$data/exp_scratch:single_task"
