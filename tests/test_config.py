"""The typed training configuration and the declarative head and encoder options: a pipeline
file is read and checked without TensorFlow, and stage fingerprints (which run directories
and checkpoints record) are the ones unicon-tf computed before them."""

import dataclasses
import inspect
import json
import pathlib
import subprocess
import sys

import pytest

from unicon_tf.options import ENCODER_LEVELS, ENCODER_OPTIONS, HEAD_OPTIONS, check_head_options, head_kind
from unicon_tf.train.config import TRAINING_DEFAULTS, TrainingConfig
from unicon_tf.train.pipeline import PipelineError, PipelineSpec, load_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]

RICH = """
name: rich
input_shape: [16, 16, 16]
modality: ct
encoder: {width: 8, depth: 3}
defaults: {epochs: 3, batch_size: 2, learning_rate: 1.0e-3, strategy: frozen}
stages:
  - {name: grade, task: classification, num_classes: 3, dropout: 0.25, data: ct16, select: last, patience: 2}
  - {name: survival, task: prognosis, data: ct16, strategy: finetune, beta: 0.5, penalty: ewc, adapters: 4,
     adapter_start: 1, adapter_levels: [2, 1], path_norm: true, bless: {min_vs_baseline: 0.02}}
  - {name: lesion, task: segmentation, modality: pet, data: ct16, loss: {dice: per_patient},
     sampling: {foreground_probability: 0.5}, blocks_per_level: 1, profile_batch: [1, 2], resources: {cpu: 2}}
"""

# (StageSpec.fingerprint, checkpoint_fingerprint's sha256) as unicon-tf 0.x computed them
# before the typed configuration (main at bbb9a60): run.json and checkpoints hold these.
GOLDEN = {
    "classification": ("ed083f41ef8c92e4bbfe18c8a119781bc7c494c536d0278d2b95252e6b2d979f",
                       "3c5e07bcbadb23917660982e180bc3632dc09a340d8f95bdb1a2ffcef8d731c0"),
    "prognosis": ("8bcec726f124cf91e682a56177f2a33519c5c384dd80331357431fc9d61c7e32",
                  "81a3c28b1adf68b6435f5b1f6d4521b0636ca6a22cc632b98a67adcaad967505"),
    "segmentation": ("db830d8c93dad81818b18dfafd6805bd96c8400534d1a970846a0e820bd69c72",
                     "db8ef32ee8fa94d600d28b7132e6145e004a2ca331bbe860230f1ef1801f3a1c"),
    "pet": ("14fa8ead1da71c47734b9bd3c6a736acb87cf495648995438f952b03f5963fbc",
            "3883d655301b77d7d540015a52fb8769dff9670f451e8565e4ddada864f0d5f4"),
    "grade": ("847b628192411075bd08665fe8d89231d730a6d33369fc7191737af796a23cd5",
              "61910f564fd91b1090c49e59824c6e0dc518a0bbb4f8acc5ae11444ff5d10a93"),
    "survival": ("d9f2c8600860e69f741072bdc8f8ff9bef2333b8924381cfa8f1622b97c172f6",
                 "9d00de64c099c71eb2fbee7a5768ab2e69b9a485c16ed6ff35695a84e749a961"),
    "lesion": ("a2c086dad34c0b96b025054387759a1c2cf05eccda774814f6d95484be162790",
               "cc9a8547c53c1b37ae4463735a0ee59885524cee96328bfe29d564d4dbf718f9"),
}


def test_loading_a_pipeline_imports_neither_tensorflow_nor_keras():
    code = ("import sys, unicon_tf.train.pipeline as p; spec = p.load_pipeline('pipelines/chest_ct.yaml'); "
            "print(len(spec.stages), sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["4", "[]"], result.stdout + result.stderr


def test_fingerprints_of_existing_runs_are_unchanged(tmp_path):
    from unicon_tf.train.stage import checkpoint_fingerprint

    (tmp_path / "rich.yaml").write_text(RICH)
    for path in (REPO / "pipelines/chest_ct.yaml", tmp_path / "rich.yaml"):
        pipeline = load_pipeline(path, data_root="/data")
        for spec in pipeline.stages:
            assert (spec.fingerprint(), checkpoint_fingerprint(pipeline, spec, data=False)["sha256"]) \
                == GOLDEN[spec.name], spec.name
        # a component's recorded parameter reads back to the same spec and fingerprints
        again = PipelineSpec.from_json(json.loads(json.dumps(pipeline.to_json())))
        assert again == pipeline and [s.fingerprint() for s in again.stages] == [s.fingerprint() for s in pipeline.stages]


def test_training_config_is_typed_frozen_and_checks_each_field(tmp_path):
    (tmp_path / "rich.yaml").write_text(RICH)
    lesion = load_pipeline(tmp_path / "rich.yaml").stages[2].training
    assert isinstance(lesion, TrainingConfig)
    assert (lesion.epochs, lesion.batch_size, lesion.loss, lesion.profile_batch) == (3, 2, {"dice": "per_patient"},
                                                                                   [1, 2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        lesion.epochs = 9
    assert TrainingConfig().to_json() == TRAINING_DEFAULTS
    assert set(lesion.to_json(complete=False)) == set(TRAINING_DEFAULTS) - {"select", "patience", "monitor",
                                                                             "min_epochs", "smoothing", "bless"}
    for field, value, message in (("ewc_gamma", 1.5, r"ewc_gamma = 1.5 is out of range"),
                                  ("learning_rate", "1e-3", r"learning_rate = '1e-3' must be a number \(YAML reads"),
                                  ("epochs", True, r"epochs = True must be a number\.$"),
                                  ("monitor", "auc", r"monitor must be one of \['auto', 'metric', 'loss'\]"),
                                  ("sampling", {"foreground_probability": 0.5}, r"segmentation stages only"),
                                  ("precision", "fp8", r"Unknown precision 'fp8'")):
        with pytest.raises(ValueError, match=message):
            TrainingConfig(**{field: value}).checked("prognosis")
    with pytest.raises(TypeError):
        TrainingConfig().replace(epoch=3)  # not a training key


def test_declared_head_and_encoder_options_are_what_the_heads_and_families_take():
    from unicon_tf.model.families import FAMILIES
    from unicon_tf.model.unetr import UNETRHead
    from unicon_tf.options import TASKS as DECLARED
    from unicon_tf.tasks import TASKS

    classes = {**{task: kind.head for task, kind in TASKS.items() if task in DECLARED}, "unetr": UNETRHead}
    assert set(classes) == set(HEAD_OPTIONS)
    for kind, head_class in classes.items():
        signature = inspect.signature(head_class.__init__).parameters
        assert {name: option.default for name, option in HEAD_OPTIONS[kind].items()} == \
            {name: signature[name].default for name in head_class.options()}, kind
    for family in ENCODER_OPTIONS:
        assert FAMILIES[family].options == ENCODER_OPTIONS[family]
        assert FAMILIES[family].levels == (family in ENCODER_LEVELS), family
    # the declared level counts are the built encoders' (a tiny residual CNN and I3ResNet)
    for family, options in (("residual", {"width": 4, "depth": 2}), ("residual", {"width": 4}),
                            ("i3resnet", {"layers": (1, 1, 1, 1), "width": 4})):
        encoder = FAMILIES[family].build((32, 32, 32), **options)
        assert encoder.depth == ENCODER_LEVELS[family](options), (family, options)
        for task in DECLARED:
            assert TASKS[task].head_class(family) is classes[head_kind(task, family)]
    # a value the declaration refuses is one the head's constructor refuses, with its message
    for task, family, options in (("classification", "residual", {"num_classes": 1}),
                                  ("classification", "residual", {"dropout": 1.0}),
                                  ("prognosis", "residual", {"pooling": "sum"}),
                                  ("segmentation", "residual", {"blocks_per_level": 0}),
                                  ("segmentation", "residual", {"side_encoder": -1}),
                                  ("segmentation", "vit", {"feature_size": 0})):
        with pytest.raises(ValueError) as built:
            classes[head_kind(task, family)](**options)
        with pytest.raises(ValueError) as declared:
            check_head_options(task, options, family)
        assert str(declared.value) == str(built.value)


def test_bad_head_options_name_the_file_and_field(tmp_path):
    path = tmp_path / "p.yaml"
    for stage, message in (("{name: a, task: classification, data: d, num_classes: two}",
                            r"p.yaml: stage 'a': field 'num_classes' must be a int like its default 2, got 'two'"),
                           ("{name: a, task: prognosis, data: d, num_classes: 2}",
                            r"p.yaml: stage 'a': unknown key\(s\) \['num_classes'\] \(a prognosis head accepts "
                            r"\['dropout', 'pooling'\]"),
                           ("{name: a, task: segmentation, data: d, num_classes: 1}",
                            r"p.yaml: stage 'a': head options \{'num_classes': 1\}: num_classes must be >= 2")):
        path.write_text(f"name: p\ninput_shape: [16, 16, 16]\nstages:\n  - {stage}\n")
        with pytest.raises(PipelineError, match=message):
            load_pipeline(path)


STAGE_JSON_KEYS = ["stage", "index", "fingerprint", "pipeline", "head", "task", "modalities", "heads", "spec",
                   "strategy", "plugins", "cached_features", "cache_bytes", "teacher", "data", "history",
                   "train_seconds", "finished", "unicon_tf", "tensorflow", "keras", "fisher", "replicas", "selection",
                   "resume_changes"]
"""stage.json's keys, in order, as unicon-tf wrote them before the typed record."""


def test_stage_record_reads_stage_json_written_now_and_before(stage0_run):
    from unicon_tf.train.record import StageRecord

    path = stage0_run / "stages" / "00-classification" / "stage.json"
    raw = json.loads(path.read_text())
    assert list(raw) == STAGE_JSON_KEYS
    record = StageRecord.from_json({**raw, "folder": str(path.parent)})  # StageFolder.record() adds `folder`
    assert record.to_json() == raw and record.fisher == "fisher.npz" and record.strategy == "scratch"
    older = {k: v for k, v in raw.items() if k not in ("cache_bytes", "replicas", "selection", "resume_changes")}
    assert StageRecord.from_json(older) == dataclasses.replace(record, cache_bytes=0, replicas=1, selection=None,
                                                               resume_changes=[])
    with pytest.raises(KeyError, match="fingerprint"):
        StageRecord.from_json({k: v for k, v in raw.items() if k != "fingerprint"})


def test_precision_auto_resolves_to_this_machines_policy_where_a_stage_uses_it():
    """`precision: auto` loads from a pipeline and becomes the machine's policy where the
    network and optimizer are set (`mixed_bfloat16` on a CPU with AVX512_BF16 or AMX)."""
    import keras

    from unicon_tf.model import foundation
    from unicon_tf.train.precision import auto_precision, optimizer_for, set_precision

    assert TrainingConfig(precision="auto").checked("classification").precision == "auto"
    chosen = auto_precision()
    assert chosen in ("float32", "mixed_float16", "mixed_bfloat16")
    network = set_precision(foundation((8, 8, 8), width=4, depth=2), "auto")
    assert network.layers[-1].dtype_policy.name == chosen
    assert network.layers[-1].output_layer.compute_dtype == "float32"
    wrapped = optimizer_for("auto", keras.optimizers.Adam())
    assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer) == (chosen == "mixed_float16")
