"""Training under tf.distribute strategies and mixed precision; TensorBoard event files.

MirroredStrategy over 2 logical CPU devices and MultiWorkerMirroredStrategy over 2 local
processes run in subprocesses (tests/fixtures/distributed_checks.py): logical devices and
collective ops must be configured before TensorFlow starts, which this process did long ago.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import UNICON_ORDER, second_stage, write_pipeline
from unicon_tf import train
from unicon_tf.data import dataset

CHECKS = pathlib.Path(__file__).parent / "fixtures" / "distributed_checks.py"
ROOT = pathlib.Path(__file__).parent.parent


def check(*args, env=None, timeout=300):
    """Run a distributed check in a new process; its last stdout line as JSON."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    done = subprocess.run([sys.executable, str(CHECKS), *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.distributed
def test_cox_risk_sets_span_the_global_batch_on_two_replicas():
    # One SGD step (learning rate 1, so the update is the gradient) on 5 patients: one
    # device with the batch vs 2 replicas with 3 + 2 rows (one padding row).
    result = check("cox")
    assert result["replicas"] == 2
    assert result["loss"][1] == pytest.approx(result["loss"][0], rel=1e-6)
    assert result["c_index"][1] == result["c_index"][0]
    assert result["gradient_norm"] > 1.0  # not vacuous
    assert result["gradient_max_diff"] < 1e-5, result  # float32 reduction order only


def compare(path_one, path_two, batch):
    """`(max weight difference, max conv-bias difference, max output difference)` of two models.

    Conv biases feed a GroupNorm that removes them: their gradient is zero in exact
    arithmetic, float32 round-off in any other summation order, which Adam's normalised
    step turns into moves of up to the learning rate. They are compared apart.
    """
    one, two = keras.models.load_model(path_one), keras.models.load_model(path_two)
    conv_biases = {f"{layer.path}/bias" for layer in one._flatten_layers() if isinstance(layer, keras.layers.Conv3D)}
    diffs = {a.path: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(one.weights, two.weights)}
    weights = max(v for k, v in diffs.items() if k not in conv_biases)
    biases = max([v for k, v in diffs.items() if k in conv_biases] or [0.0])
    x = {m: batch[m] for m in one.input}
    outputs = {k: float(np.max(np.abs(np.asarray(v) - np.asarray(two(x)[k])))) for k, v in one(x).items()}
    return weights, biases, max(outputs.values())


@pytest.mark.distributed
@pytest.mark.slow
def test_mirrored_stages_match_one_device(phantom_records, tmp_path):
    # Global batch 3 over 2 replicas: 2 + 1 rows, the last batch padded; classification, then
    # segmentation with validation on adapters (prognosis's Cox risk sets across replicas:
    # test_cox_risk_sets_span_the_global_batch_on_two_replicas).
    stages = [UNICON_ORDER[0], UNICON_ORDER[2]]
    pipeline = write_pipeline(tmp_path, phantom_records, stages=stages, batch_size=3, epochs=1, augment=False)
    result = check("stages", tmp_path / "one", tmp_path / "two", pipeline, *[s["name"] for s in stages])
    batch = next(iter(dataset(phantom_records, "val", batch_size=4)))[0]
    batch = {k: np.asarray(v) for k, v in batch.items()}
    steps = 3  # 1 epoch of ceil(7 / 3) batches
    for index, stage in enumerate(stages):
        name = stage["name"]
        folder = f"stages/{index:02d}-{name}/model.keras"
        assert result[name]["replicas"] == 2
        weights, biases, outputs = compare(tmp_path / "one" / folder, tmp_path / "two" / folder, batch)
        # float32 summation order, through Adam's normalised steps (learning rate 1e-3)
        assert weights < 2e-4 and outputs < 5e-4, (name, weights, biases, outputs)
        assert biases <= 2 * 1e-3 * steps, (name, biases)
        for a, b in zip(result[name]["one"], result[name]["mirrored"]):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5, nan_ok=True), (name, key)
    assert "val_segmentation_dice" in result["segmentation"]["mirrored"][-1]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def workers(run, pipeline, stage, tmp, *extra, env=None):
    """Both workers of a 2-process MultiWorkerMirroredStrategy cluster on localhost."""
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": config,
                       "TMPDIR": str(tmp), **(env or {})}
        processes.append(subprocess.Popen([sys.executable, str(CHECKS), "worker", str(run), str(pipeline), stage,
                                           *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=environment))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_multiworker_stage_resumes_and_only_the_chief_writes(phantom_records, tmp_path):
    # select: last, so that the saved model is the chief's network after its last epoch
    pipeline = write_pipeline(tmp_path, phantom_records, stages=[UNICON_ORDER[0]], epochs=2, batch_size=4,
                              select="last")
    run, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    # Both workers stop at the end of epoch 2, after epoch 1's checkpoint; then resume.
    assert workers(run, pipeline, "classification", tmp, env={"UNICON_TEST_INTERRUPT": "1"}) == [
        {"interrupted": True}] * 2
    folder = run / "stages/00-classification"
    assert json.loads((folder / "checkpoint/state.json").read_text())["epoch"] == 1
    chief, other = workers(run, pipeline, "classification", tmp, "resume")
    assert (chief["chief"], other["chief"]) == (True, False) and chief["replicas"] == 2
    assert len(chief["history"]) == 2 and chief["history"] == other["history"]
    np.testing.assert_allclose(other["weights"], chief["weights"], rtol=1e-6)  # in-sync replicas
    saved = keras.models.load_model(folder / "model.keras").get_weights()
    np.testing.assert_allclose([[np.sum(w), np.sum(np.square(w))] for w in saved], chief["weights"], rtol=1e-6)
    # One set of stage files, the chief's; the other worker's temporary folder is gone.
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["00-classification"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.keras", "stage.json", "tensorboard"]
    assert list(tmp.iterdir()) == []
    assert json.loads((run / "run.json").read_text())


@pytest.mark.slow
def test_bfloat16_stage_trains_saves_float32_and_writes_tensorboard(phantom_records, stage0_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unicon_tf import serving

    record = second_stage(stage0_run, phantom_records, tmp_path, strategy="finetune", alpha=1.0, epochs=2,
                          precision="mixed_bfloat16")
    assert record["spec"]["training"]["precision"] == "mixed_bfloat16"
    assert all(np.isfinite(v) for epoch in record["history"] for v in epoch.values())
    folder = tmp_path / "run/stages/01-prognosis"
    model = keras.models.load_model(folder / "model.keras")
    assert {layer.compute_dtype for layer in model._flatten_layers()} == {"float32"}  # saved in float32
    assert {w.dtype for w in model.weights} == {"float32"}
    before = keras.models.load_model(tmp_path / "run/stages/00-classification/model.keras")
    assert any(not np.array_equal(a, b) for a, b in zip(before.get_weights(), model.get_weights()[:len(before.weights)]))
    version = serving.export_model(model, tmp_path / "sm", "tiny", version=1)
    loaded = tf.saved_model.load(str(version))
    signature = loaded.signatures["serving_default"]
    assert {spec.dtype for spec in signature.structured_input_signature[1].values()} == {tf.float32}
    assert {spec.dtype for spec in signature.structured_outputs.values()} <= {tf.float32, tf.int64, tf.int32}

    # TensorBoard: every loss term, plugin term and metric, train and validation, per epoch.
    for split, prefix in (("train", ""), ("validation", "val_")):
        events = EventAccumulator(str(folder / "tensorboard" / split), size_guidance={"tensors": 0})
        events.Reload()
        tags = set(events.Tags()["tensors"])
        expected = {f"epoch_{k[len(prefix):]}" for k in record["history"][-1] if k.startswith(prefix)
                    and (prefix or not k.startswith("val_"))}
        assert expected <= tags, (split, expected - tags)
        assert {"epoch_loss", "epoch_prognosis_loss", "epoch_distillation", "epoch_prognosis_c_index"} <= tags
        losses = events.Tensors("epoch_loss")
        assert [e.step for e in losses] == [0, 1]
        assert float(tf.make_ndarray(losses[-1].tensor_proto)) == pytest.approx(record["history"][-1][f"{prefix}loss"],
                                                                                rel=1e-5)
    assert "epoch_classification_distillation" in tags  # a plugin's per-head term (validation)
