"""The `unicon-tf` console script: --version, --help, describe."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import unicon_tf
from unicon_tf.cli import main


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip() == f"unicon-tf, version {unicon_tf.__version__}"
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "describe" in result.output


ENV = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}


def test_help_and_version_do_not_import_tensorflow():
    for argument in ("--help", "--version"):
        code = ("import sys\nfrom unicon_tf.cli import main\ntry:\n    main([%r])\nexcept SystemExit:\n    pass\n"
                "print('imported:', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))" % argument)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
        assert result.stdout.strip().endswith("imported: []"), result.stdout


@pytest.mark.slow
def test_a_plain_keras_load_works_after_import_unicon_tf(small_foundation, volumes, tmp_path):
    """Keras 3 imports the module of a saved custom class only for its own packages, so a
    process that never imports unicon_tf cannot load a stage (documented in the README);
    `import unicon_tf` is enough, before or after `import keras`."""
    path = tmp_path / "model.keras"
    small_foundation.save(path)
    np_path = tmp_path / "ct.npy"
    np.save(np_path, volumes["ct"])
    load = (f"import numpy as np\nmodel = keras.models.load_model({str(path)!r})\n"
            f"print(float(np.asarray(model({{'ct': np.load({str(np_path)!r})}})['classification']).sum()))")
    runs = {}
    for label, imports in (("keras only", "import keras\n"), ("unicon_tf first", "import unicon_tf\nimport keras\n"),
                           ("keras first", "import keras\nimport unicon_tf\n")):
        runs[label] = subprocess.run([sys.executable, "-c", imports + load], capture_output=True, text=True, env=ENV)
    assert runs["keras only"].returncode == 1 and "Could not locate class 'ModalityStem'" in runs["keras only"].stderr
    expected = float(np.asarray(small_foundation({"ct": volumes["ct"]}, training=False)["classification"]).sum())
    for label in ("unicon_tf first", "keras first"):
        assert runs[label].returncode == 0, runs[label].stderr[-2000:]
        assert float(runs[label].stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)
    assert "oneDNN" not in runs["unicon_tf first"].stderr  # Keras imported through the hook stays quiet


def test_console_script_runs_without_tensorflow_banners():
    # the environment's own script (a venv's bin/, not activated, may not be on PATH)
    script = pathlib.Path(sys.executable).parent / "unicon-tf"
    result = subprocess.run([str(script) if script.exists() else "unicon-tf", "--version"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == f"unicon-tf, version {unicon_tf.__version__}"
    assert result.stderr == ""


def test_describe_prints_heads_stems_and_parameters(small_foundation, tmp_path):
    model = unicon_tf.expand(small_foundation, modality="pet", task="segmentation", adapters=2)
    path = tmp_path / "model.keras"
    model.save(path)
    runner = CliRunner()
    table = runner.invoke(main, ["describe", str(path)])
    assert table.exit_code == 0, table.output
    info = unicon_tf.describe(model)
    for name, head in info["heads"].items():
        assert name in table.output and f"{head['params']:,}" in table.output
    assert "adapter segmentation_ctpet: rank 2" in table.output
    assert f"params {info['params']:,}" in table.output
    as_json = runner.invoke(main, ["describe", str(path), "--json"])
    assert json.loads(as_json.output) == json.loads(json.dumps(info))


def test_describe_refuses_a_file_that_is_not_a_model(tmp_path):
    bogus = tmp_path / "notes.keras"
    bogus.write_text("not a zip")
    result = CliRunner().invoke(main, ["describe", str(bogus)])
    assert result.exit_code != 0
    assert "notes.keras" in result.output and "cannot read a unicon_tf model" in result.output


def test_a_tensorflow_error_on_bad_input_is_one_line():
    """TensorFlow's own errors (a SavedModel it cannot read) are not `OSError`s: `user_errors` counts them too."""
    import click
    import tensorflow as tf

    from unicon_tf.cli import user_errors

    def unreadable():
        raise tf.errors.FailedPreconditionError(None, None, "x/saved_model.pb is a directory")

    result = CliRunner().invoke(click.command()(user_errors(unreadable)), [])
    assert result.exit_code == 1 and result.output == "Error: x/saved_model.pb is a directory\n", result.output
