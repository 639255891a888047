"""The `unicon-tf` command line.

Example:
    unicon-tf --version
    unicon-tf describe model.keras
    unicon-tf describe model.keras --json
"""

import json
import pathlib

import click

from unicon_tf.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unicon-tf")
def main():
    """Continual learning of 3D medical foundation models (UNICON) in TensorFlow/Keras."""


@main.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def describe(model_path, as_json):
    """Show a saved model's stems, encoder, adapters and heads with parameter counts."""
    import keras

    import unicon_tf

    try:
        model = keras.models.load_model(model_path)
        info = unicon_tf.describe(model)
    except (ValueError, TypeError, OSError) as error:
        raise click.ClickException(f"{model_path}: cannot read a unicon_tf model: {error}") from error
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


def format_description(info):
    """A human-readable table of `unicon_tf.describe`'s dict."""
    shape = "x".join(str(d) for d in info["input_shape"])
    lines = [f"model '{info['name']}'  input {shape}  stages {info['stages']}  params {info['params']:,}", ""]
    lines.append(f"{'stem':<22}{'stage':>6}{'kind':>10}{'params':>12}")
    for modality, stem in info["stems"].items():
        lines.append(f"{modality:<22}{stem['stage']:>6}{stem['kind']:>10}{stem['params']:>12,}")
    for name, fusion in info["fusions"].items():
        lines.append(f"{'fusion ' + name:<22}{fusion['stage']:>6}{'':>10}{fusion['params']:>12,}")
    encoder = info["encoder"]
    levels = ", ".join("x".join(str(d) for d in level) for level in encoder["levels"])
    lines += ["", f"encoder  params {encoder['params']:,}  levels {levels}"]
    for name, adapter in encoder["adapters"].items():
        lines.append(f"  adapter {name}: rank {adapter['rank']}, params {adapter['params']:,}")
    lines += ["", f"{'head':<22}{'task':<16}{'modalities':<14}{'stage':>6}{'adapter':>9}{'params':>12}  output"]
    for name, head in info["heads"].items():
        rank = head["adapter"]["rank"] if head["adapter"] else "-"
        output = "x".join(str(d) for d in head["output_shape"]) or "1"
        lines.append(
            f"{name:<22}{head['task']:<16}{'+'.join(head['modalities']):<14}{head['stage']:>6}"
            f"{rank!s:>9}{head['params']:>12,}  {output}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
