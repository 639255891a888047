"""The `unicon-tf` console script: --version, --help, describe."""

import json
import subprocess

from click.testing import CliRunner

import unicon_tf
from unicon_tf.cli import main


def test_version_and_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).output.strip() == f"unicon-tf, version {unicon_tf.__version__}"
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "describe" in result.output


def test_console_script_runs_without_tensorflow_banners():
    result = subprocess.run(["unicon-tf", "--version"], capture_output=True, text=True, check=True)
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
