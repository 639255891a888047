"""The `unicon-tf` command line.

TensorFlow is imported only inside the commands that need it, so `--help` and
`--version` answer at once.

Example:
    unicon-tf phantom --out cohort -n 120
    unicon-tf ingest cohort/manifest.csv --out data/ct64 --shape 64 64 64 --spacing 3 3 3
    unicon-tf describe model.keras
"""

import functools
import json
import pathlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import click

from unicon_tf.names import DISTRIBUTE, PRECISIONS, STRATEGIES
from unicon_tf.run import BASELINES
from unicon_tf.version import __version__


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors of bad input (a pipeline, run, data or export that cannot be used)
    into a one-line message and exit status 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as error:  # re-raised unless bad input (`_user_errors`)
            if not isinstance(error, _user_errors()):
                raise
            raise click.ClickException(str(error)) from error

    return wrapper


def _user_errors():
    """The error types of bad input, imported only once one is raised (`--help` stays light).
    `DataError`, `PipelineError`, `InvalidNameError` and `PretrainedWeightsError` are
    `ValueError`s; an `OSError` (a missing, unreadable or unwritable file, a stage's base
    weights file moved or altered: `StorageError`) names its file; so does TensorFlow's
    `OpError` (e.g. a SavedModel it cannot read), counted once TensorFlow is imported."""
    from unicon_tf.files import FolderLockError
    from unicon_tf.run import StageError
    from unicon_tf.serving import ExportError
    from unicon_tf.train import TrainingError

    tensorflow = sys.modules.get("tensorflow")
    return (StageError, TrainingError, ExportError, FolderLockError, ValueError, OSError,
            *((tensorflow.errors.OpError,) if tensorflow is not None else ()))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unicon-tf")
def main() -> None:
    """Continual learning of 3D medical foundation models (UNICON) in TensorFlow/Keras."""


@main.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def describe(model_path: pathlib.Path, as_json: bool) -> None:
    """Show a saved model's stems, encoder, adapters and heads with parameter counts."""
    from unicon_tf import model as unicon_model  # first: imports TensorFlow quietly
    from unicon_tf.model.storage import load_model

    try:
        model = load_model(model_path)
        info = unicon_model.describe(model)
    except (ValueError, TypeError, OSError) as error:
        raise click.ClickException(f"{model_path}: cannot read a unicon_tf model: {error}") from error
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@main.command("presets")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the presets' descriptions as JSON.")
@user_errors
def presets_command(name: str | None, as_json: bool) -> None:
    """List the pretrained encoder presets, or describe preset NAME (input contract, source, licence, weights)."""
    from unicon_tf import presets

    infos = [presets.describe(n) for n in ([name] if name else presets.names())]
    if as_json:
        click.echo(json.dumps(infos if name is None else infos[0], indent=2))
        return
    for info in infos:
        contract, weights = info["input"], info["weights"]
        where = (f"package {weights['package']} ({weights['install']}), SHA-256 {weights['sha256'][:12]}..."
                 if weights["from"] == "package" else
                 f"a file you name: `encoder: {{preset: {info['name']}, weights: <file>}}` in a pipeline, or "
                 f"weights=<file> in Python ({weights['format']})")
        spacing, window = contract["spacing_mm"], contract["intensity_window_hu"]
        trained = f" (trained at {contract['trained_shape']})" if contract.get("trained_shape") else ""
        click.echo(f"{info['name']}\n  {info['architecture']}, {info['params']:,} parameters\n"
                   f"  input: {contract['axes']}; {contract['orientation']}, "
                   f"spacing {f'{spacing} mm' if isinstance(spacing, list) else spacing}, "
                   f"window {f'{window} HU' if isinstance(window, list) else window} -> {contract['intensity_range']}, "
                   f"shape multiple of {contract['shape_multiple']}{trained}\n"
                   f"  source: {info['source']}; licence {info['licence']}\n  weights: {where}")


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--out", required=True, type=click.Path(path_type=pathlib.Path), help="New output folder.")
@click.option("--shape", nargs=3, type=int, default=(64, 64, 64), show_default=True, help="Output grid D H W.")
@click.option("--spacing", nargs=3, type=float, default=None, help="Voxel size (mm) [default: 2 2 2, or the preset's].")
@click.option("--preset", default=None, metavar="NAME",
              help="Write the data an encoder preset expects: its spacing, CT window and intensity range "
                   "(see `unicon-tf presets`).")
@click.option("--center", type=click.Choice(["body", "mask"]), default="body", show_default=True,
              help="Crop around the body or around the mask.")
@click.option("--window", "windows", nargs=3, type=(str, float, float), multiple=True, metavar="MODALITY LOW HIGH",
              help="Intensity window of a modality (default: ct -1000 1000 HU, pet 0 20 SUV).")
@click.option("--scale", "scales", nargs=2, type=(str, float), multiple=True, metavar="MODALITY FACTOR",
              help="Multiply a modality's raw values first, one factor for the cohort (per patient: a "
                   "<modality>_scale or weight_kg/injected_dose_bq manifest column; not both).")
@click.option("--mask-classes", type=int, default=2, show_default=True, help="Label-map classes incl. background.")
@click.option("--workers", type=int, default=None, help="Preprocessing processes [default: what the available memory holds, at most the CPU count].")
@click.option("--shard-size", type=int, default=64, show_default=True, help="Examples per TFRecord shard.")
@click.option("--skip-bad", is_flag=True, help="Write good patients and list bad ones in rejected.csv.")
@click.option("--runner", type=click.Choice(["multiprocessing", "beam"]), default="multiprocessing", show_default=True,
              help="Local process pool, or an Apache Beam pipeline (needs `pip install 'unicon-tf[beam]'`).")
@click.option("--beam-args", default=None, metavar='"--runner=... ..."',
              help="Beam pipeline options, one quoted string [default: DirectRunner]; see docs/scale.md.")
@user_errors
def ingest(manifest: pathlib.Path, out: pathlib.Path, shape: tuple[int, int, int],
           spacing: tuple[float, float, float] | None, preset: str | None, center: str,
           windows: tuple[tuple[str, float, float], ...], scales: tuple[tuple[str, float], ...], mask_classes: int,
           workers: int | None, shard_size: int, skip_bad: bool, runner: str, beam_args: str | None) -> None:
    """Preprocess a NIfTI cohort (MANIFEST csv) into sharded TFRecords, schema.json and stats.json."""
    from unicon_tf import data, presets

    window_map = {m: (w.low, w.high, w.scale, w.out_range) for m, w in data.DEFAULT_WINDOWS.items()}
    if preset is not None:
        contract = presets.ingest_options(preset)
        if spacing is not None and tuple(spacing) != contract["spacing"]:
            raise click.BadParameter(f"--spacing {' '.join(map(str, spacing))} differs from preset '{preset}''s "
                                     f"{' '.join(map(str, contract['spacing']))} mm")
        if any(m in contract["windows"] for m, _, _ in windows):
            raise click.BadParameter(f"--window of {sorted(contract['windows'])} is fixed by preset '{preset}'")
        if any(m in contract["windows"] for m, _ in scales):
            raise click.BadParameter(f"--scale of {sorted(contract['windows'])} is fixed by preset '{preset}' "
                                     "(its window reads raw values: HU for CT)")
        spacing = contract["spacing"]
        window_map.update(contract["windows"])
        mismatches = presets.schema_mismatches(preset, {"preprocessing": {
            "shape": list(shape), "spacing": list(spacing),
            "windows": {"ct": {"low": contract["windows"]["ct"][0], "high": contract["windows"]["ct"][1],
                               "out_range": contract["windows"]["ct"][3]}}}})
        if mismatches:
            raise click.BadParameter(f"preset '{preset}': " + "; ".join(mismatches), param_hint="--shape")
    spacing = spacing or (2.0, 2.0, 2.0)
    window_map.update({m: (low, high, window_map.get(m, (0, 0, 1.0))[2]) for m, low, high in windows})
    for modality, factor in scales:
        if modality not in window_map:
            raise click.BadParameter(f"no window for modality '{modality}': add --window {modality} LOW HIGH")
        window_map[modality] = window_map[modality][:2] + (factor,) + tuple(window_map[modality][3:])
    preprocessing = data.Preprocessing(shape=shape, spacing=spacing, windows=window_map, center=center,
                                       mask_classes=mask_classes)
    schema = data.ingest(manifest, out, preprocessing, workers=workers, skip_bad=skip_bad, shard_size=shard_size,
                         runner=runner, beam_args=beam_args)
    counts = ", ".join(f"{split} {info['count']}" for split, info in schema["splits"].items())
    rejected = out / "rejected.csv"
    click.echo(f"wrote {out} ({counts})" + (f"; rejected patients listed in {rejected}" if rejected.exists() else ""))


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=pathlib.Path), help="Output folder.")
@click.option("-n", "count", type=int, default=120, show_default=True, help="Number of patients.")
@click.option("--shape", nargs=3, type=int, default=(64, 64, 64), show_default=True, help="CT grid in voxels.")
@click.option("--spacing", type=float, default=3.0, show_default=True, help="CT voxel size (mm).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lesion-radius", nargs=2, type=float, default=None, metavar="LOW HIGH",
              help="Lesion radius ~ U(LOW, HIGH) mm for every label [default: the documented per-label sizes].")
@click.option("--lesion-contrast", type=float, default=None, metavar="HU",
              help="CT contrast of a solid lung lesion above the lung, HU (part-solid: 500/890 of it) "
                   "[default: 890, i.e. 40 HU lesions in -850 HU lung; real-ct: 100].")
@click.option("--anatomy", type=click.Choice(["drawn", "real-ct"]), default="drawn", show_default=True,
              help="drawn: the phantom's geometric anatomy; real-ct: views of real chest CTs (--source) with "
                   "synthetic lesions (radius 4-9 mm unless --lesion-radius).")
@click.option("--source", type=click.Path(exists=True, path_type=pathlib.Path), default=None,
              help="--anatomy real-ct: the pyradiomics 3.0.1 sdist (`pip download pyradiomics==3.0.1 --no-deps "
                   "--no-binary :all: -d DIR`), or a folder of *_image.nrrd chest CTs. Needs the dicom extra.")
@user_errors
def phantom(out: pathlib.Path, count: int, shape: tuple[int, int, int], spacing: float, seed: int,
            lesion_radius: tuple[float, float] | None, lesion_contrast: float | None, anatomy: str,
            source: pathlib.Path | None) -> None:
    """Write the built-in synthetic PET/CT cohort (NIfTI files and manifest.csv).

    --lesion-radius 4 9 --lesion-contrast 100 (with --spacing 2) makes small, faint lesions.
    --anatomy real-ct --source pyradiomics-3.0.1.tar.gz draws them in real chest CT.
    """
    from unicon_tf.data import phantom as phantom_cohort  # first: imports TensorFlow quietly
    from unicon_tf.data import real_ct

    import keras

    from unicon_tf._quiet import progress_verbosity

    if count < 1:
        raise click.BadParameter(f"-n must be >= 1, got {count}")
    if (anatomy == "real-ct") != (source is not None):
        raise click.UsageError("--source goes with --anatomy real-ct, and --anatomy real-ct needs it.")
    if anatomy == "real-ct":
        default = real_ct.DEFAULT_LESIONS
        lesions = phantom_cohort.LesionOptions(
            radius_mm=lesion_radius or default.radius_mm,
            ct_contrast_hu=default.ct_contrast_hu if lesion_contrast is None else lesion_contrast)
        real_ct.check_lesions(lesions, shape, spacing)  # before the progress bar
    else:
        lesions = phantom_cohort.LesionOptions(radius_mm=lesion_radius or None, ct_contrast_hu=lesion_contrast)
        lesions.check(shape[0] * spacing, spacing)
    progress = keras.utils.Progbar(count, unit_name="patient", verbose=progress_verbosity(1))
    if anatomy == "real-ct":
        manifest = real_ct.write_cohort(out, source, count, shape, seed, spacing, progress=progress.update,
                                        lesions=lesions)
    else:
        manifest = phantom_cohort.write_cohort(out, count, shape, seed, spacing, progress=progress.update,
                                               lesions=lesions)
    click.echo(f"wrote {count} patients; manifest: {manifest}")


@main.command()
@click.option("--pipeline", "pipeline_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Pipeline YAML (e.g. pipelines/chest_ct.yaml).")
@click.option("--stage", required=True, help="The stage to train.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
              help="Run directory [default: runs/<pipeline name>].")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder that relative data paths resolve against [default: the pipeline's folder].")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="Override the stage's strategy.")
@click.option("--epochs", type=int, default=None, help="Override the stage's epochs.")
@click.option("--learning-rate", type=float, default=None, help="Override the stage's learning rate.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), default=None,
              help="First stage only: start from this .keras model instead of a new foundation model.")
@click.option("--resume", is_flag=True, help="Continue an interrupted stage from its last checkpoint.")
@click.option("--accept-changes", is_flag=True,
              help="With --resume: continue although the stage's definition or data changed since the checkpoint "
                   "(the changes are recorded in stage.json and the lineage).")
@click.option("--distribute", type=click.Choice(DISTRIBUTE), default=None,
              help="Override the stage's distribute: mirrored (this host's devices) or multiworker (TF_CONFIG).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="Override the stage's precision.")
@click.option("--profile-batch", default=None, metavar="N|FIRST,LAST",
              help="TensorBoard profiler: the batch (or range of batches) to profile [default: the stage's, 0].")
@user_errors
def train(pipeline_path: str, stage: str, run_dir: pathlib.Path | None, data_root: str | None, strategy: str | None,
          epochs: int | None, learning_rate: float | None, init: str | None, resume: bool, accept_changes: bool,
          distribute: str | None, precision: str | None, profile_batch: str | None) -> None:
    """Train one stage of a pipeline, starting from the previous stage's model.

    Goes through the same runner as `unicon-tf run` (ExampleGen for `sources` data, then
    the Trainer), so the stage is recorded in the run's lineage.
    """
    from unicon_tf import components
    from unicon_tf import train as training
    from unicon_tf.run import StageFolder

    if accept_changes and not resume:
        raise click.UsageError("--accept-changes applies to --resume only.")
    pipeline = training.load_pipeline(pipeline_path, data_root=data_root)
    runner = components.LocalRunner(pipeline, run_dir or pathlib.Path("runs") / pipeline.name)
    outputs = runner.run(stages=[stage], evaluate=False, strategy=strategy, epochs=epochs,
                         learning_rate=learning_rate, init=init, resume=resume or None,
                         accept_changes=accept_changes or None, distribute=distribute,
                         precision=precision, profile_batch=_profile_batch(profile_batch))[stage]
    if outputs["model"].properties.get("worker"):
        click.echo(f"stage '{stage}': this worker is done; the chief writes {outputs['model'].uri}")
        return
    record = StageFolder(outputs["model"].uri).record()
    for entry in record.get("resume_changes", []):
        click.echo(f"resumed after epoch {entry['after_epoch']} with changes (accepted): "
                   + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in entry["changes"].items()))
    last = record["history"][-1] if record["history"] else {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_") or k == "loss")
    click.echo(f"stage '{stage}' ({record['strategy']}) saved to {outputs['model'].uri}; last epoch: {shown}")
    if record.get("selection"):
        click.echo(f"model selection: {record['selection']['reason']}")


def _profile_batch(value):
    """`--profile-batch` as TensorBoard takes it: None, a batch number, or [first, last]."""
    if value is None:
        return None
    try:
        numbers = [int(v) for v in str(value).split(",")]
    except ValueError:
        raise click.BadParameter(f"--profile-batch takes N or FIRST,LAST, got {value!r}") from None
    if len(numbers) > 2:
        raise click.BadParameter(f"--profile-batch takes N or FIRST,LAST, got {value!r}")
    return numbers[0] if len(numbers) == 1 else numbers


@main.command()
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option("--stage", default=None, help="The last stage to evaluate [default: the last trained].")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@user_errors
def evaluate(run_dir: pathlib.Path, stage: str | None, split: str) -> None:
    """Evaluate every head after every stage: matrix, forgetting, blessing, report.md."""
    from unicon_tf import evaluate as evaluation
    from unicon_tf.files import folder_lock
    from unicon_tf.run import Run

    with folder_lock(run_dir, "evaluation"):  # it writes the run's evaluation, matrix and report
        result = evaluation.evaluate_run(run_dir, stage=stage, split=split)
        records = Run(run_dir).stage_records(stage)
        report, summary, gain = evaluation.write_report(run_dir, result, records, evaluation.load_baselines(run_dir))
    click.echo(format_matrix(result))
    click.echo(", ".join(f"{k.replace('_', ' ')} {v:+.4f}" for k, v in summary.items()
                         if isinstance(v, float)))
    echo_comparisons(result, evaluation.load_baselines(run_dir))
    echo_pet_gain(gain)
    for blessing in result["blessing"]:
        click.echo(f"{blessing['stage']}: {'blessed' if blessing['blessed'] else 'NOT blessed'}"
                   + ("" if blessing["blessed"] else ": " + "; ".join(blessing["reasons"])))
    click.echo(f"report: {report}")


@main.command()
@click.option("--pipeline", "pipeline_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--kind", "kinds", multiple=True, type=click.Choice(BASELINES),
              help="Which baselines [default: all three].")
@user_errors
def baselines(pipeline_path: str, run_dir: pathlib.Path, data_root: str | None, kinds: tuple[str, ...]) -> None:
    """Train and evaluate the baselines: single-task from scratch, naive fine-tuning, joint."""
    from unicon_tf import evaluate as evaluation
    from unicon_tf import train as training
    from unicon_tf.files import folder_lock

    with folder_lock(run_dir, "run"):  # through the evaluation, which writes in the run directory too
        trained = training.train_baselines(pipeline_path, run_dir, kinds=kinds or BASELINES, data_root=data_root,
                                           verbose=1)
        results = evaluation.evaluate_baselines(run_dir, trained)
    for result in results.values():
        click.echo(format_matrix(result))


@main.command()
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@click.option("--stage", default=None, help="The stage to export [default: the last trained].")
@click.option("--model-name", default=None, help="Served model name [default: the pipeline's name].")
@click.option("--base", type=click.Path(file_okay=False, path_type=pathlib.Path), default="saved_models",
              show_default=True, help="TF Serving base folder.")
@click.option("--serving-root", default="/models", show_default=True,
              help="Where --base is mounted in the serving container (for models.config).")
@click.option("--label", "labels", multiple=True, help="Point a version label at the new version (stable, canary).")
@click.option("--force", is_flag=True, help="Export even if the stage is not blessed.")
@click.option("--example-request", is_flag=True, help="Also write request.json, a REST request for serving_default.")
@user_errors
def export(run_dir: pathlib.Path, stage: str | None, model_name: str | None, base: pathlib.Path, serving_root: str,
           labels: tuple[str, ...], force: bool, example_request: bool) -> None:
    """Export a blessed stage as the next SavedModel version for TensorFlow Serving."""
    from unicon_tf import serving

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", serving.ServingWarning)
        version_dir = serving.export_stage(run_dir, stage, base=base, model_name=model_name, force=force,
                                           labels=labels, serving_root=serving_root, example_request=example_request)
    for warning in caught:
        if issubclass(warning.category, serving.ServingWarning):
            click.echo(f"warning: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    info = json.loads((version_dir / "unicon.json").read_text())
    click.echo(f"exported {version_dir} (signatures: {', '.join(info['signatures'])}; parity max |diff| "
               f"{info['parity_max_abs_diff']:.1e}); config: {base / 'models.config'}")
    if example_request:
        click.echo(f"example REST request: {version_dir / 'request.json'}")


@main.command()
@click.option("--saved-model", required=True, type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path),
              help="A version folder written by unicon-tf export.")
@click.option("--ct", type=click.Path(exists=True), default=None,
              help="CT: a NIfTI or ITK file, or a DICOM series folder (then also written as DICOM SEG).")
@click.option("--pet", type=click.Path(exists=True), default=None,
              help="PET: a NIfTI or ITK file, or a DICOM series folder (SUV from its tags unless --scale pet).")
@click.option("--series-uid", "series_uids", nargs=2, type=(str, str), multiple=True, metavar="MODALITY UID",
              help="The SeriesInstanceUID to read where a modality's folder holds several series.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--overlap", type=float, default=0.5, show_default=True, help="Sliding-window overlap.")
@click.option("--scale", "scales", nargs=2, type=(str, float), multiple=True, metavar="MODALITY FACTOR",
              help="This patient's factor on a modality's raw values (e.g. pet SUVbw factor, mL/Bq).")
@user_errors
def predict(saved_model: pathlib.Path, ct: str | None, pet: str | None, series_uids: tuple[tuple[str, str], ...],
            out: pathlib.Path, overlap: float, scales: tuple[tuple[str, float], ...]) -> None:
    """Predict every head for one patient's images (sliding window for segmentation)."""
    from unicon_tf import serving
    from unicon_tf.data.dicom import SeriesRef

    images = {m: p for m, p in (("ct", ct), ("pet", pet)) if p}
    for modality, uid in series_uids:
        if not (modality in images and pathlib.Path(images[modality]).is_dir()):
            raise click.UsageError(f"--series-uid {modality}: give --{modality} as a DICOM series folder")
        images[modality] = SeriesRef(pathlib.Path(images[modality]), uid)
    result = serving.predict_nifti(saved_model, images, out, overlap=overlap, scales=dict(scales))
    click.echo(json.dumps(result["heads"], indent=2))


@main.command("run")
@click.argument("pipeline_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
              help="Run directory [default: runs/<pipeline name>].")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--from-stage", default=None, help="Start from this stage (earlier ones must be trained).")
@click.option("--base", type=click.Path(file_okay=False, path_type=pathlib.Path), default="saved_models",
              show_default=True, help="TF Serving base folder for the Pusher.")
@click.option("--no-push", is_flag=True, help="Stop after the Evaluator.")
@click.option("--resume", is_flag=True, help="Continue an interrupted stage from its last checkpoint.")
@user_errors
def run_pipeline(pipeline_path: str, run_dir: pathlib.Path | None, data_root: str | None, from_stage: str | None,
                 base: pathlib.Path, no_push: bool, resume: bool) -> None:
    """Run a pipeline: ExampleGen, Trainer, Evaluator and Pusher per stage, with lineage and cache."""
    from unicon_tf import components
    from unicon_tf import train as training

    pipeline = training.load_pipeline(pipeline_path, data_root=data_root)
    runner = components.LocalRunner(pipeline, run_dir or pathlib.Path("runs") / pipeline.name, base=base)
    results = runner.run(from_stage=from_stage, push=not no_push, **({"resume": True} if resume else {}))
    for stage, outputs in results.items():
        pushed = outputs.get("pushed_model")
        state = "" if pushed is None else (f", pushed {pushed.uri}" if pushed.properties["pushed"]
                                           else f", not pushed: {pushed.properties['reason']}")
        click.echo(f"{stage}: model {outputs['model'].uri}" + state)
    click.echo(f"lineage: {runner.lineage_file}")


@main.command("compile")
@click.argument("pipeline_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", type=click.Choice(["kfp"]), default="kfp", show_default=True,
              help="The orchestrator: Kubeflow Pipelines v2 (also runs on Vertex AI Pipelines).")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="The compiled pipeline: .yaml or .json.")
@click.option("--image", default=None, help="Container image of the tasks [default: unicon-tf:<version>, "
              "built from the repository's Dockerfile].")
@click.option("--base", default="/models", show_default=True,
              help="Default serving_base: where the Pusher writes versions, as the tasks see it.")
@click.option("--model-name", default=None, help="Default model_name [default: the pipeline's name].")
@click.option("--data-root", default=None,
              help="Folder or URI (gs://, s3://, minio://) that relative data paths resolve against "
                   "[default: the pipeline's folder].")
@user_errors
def compile_command(pipeline_path: str, target: str, output: pathlib.Path, image: str | None, base: str,
                    model_name: str | None, data_root: str | None) -> None:
    """Compile a pipeline for an orchestrator and print its task graph."""
    try:
        from unicon_tf.kubeflow import compiler as kubeflow
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("kfp"):
            raise
        raise click.ClickException("--target kfp needs the kfp extra: pip install 'unicon-tf[kfp]'") from error
    path = kubeflow.compile_pipeline(pipeline_path, output, image=image or kubeflow.DEFAULT_IMAGE, base=base,
                                     model_name=model_name, data_root=data_root)
    click.echo(kubeflow.format_task_graph(kubeflow.load_spec(path)))
    click.echo(f"wrote {path}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
@user_errors
def lineage(run_dir: pathlib.Path) -> None:
    """Print a run's lineage: every component run, its input and output artifacts."""
    from unicon_tf.components import format_lineage
    from unicon_tf.run import Run

    path = Run(run_dir).lineage_file
    if not path.exists():
        raise click.ClickException(f"{path} does not exist: runs made with unicon-tf run record a lineage.")
    click.echo(format_lineage(json.loads(path.read_text())))


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=pathlib.Path), default="demo", show_default=True,
              help="Working folder: cohort, pipeline, run directory and report.")
@click.option("--fast", is_flag=True, help="A smaller cohort and fewer epochs (a smoke run).")
@click.option("--base", type=click.Path(file_okay=False, path_type=pathlib.Path), default="saved_models",
              show_default=True, help="TF Serving base folder for the blessed stages.")
@click.option("--preset", default=None, metavar="NAME",
              help="Run the stages on a pretrained encoder preset (e.g. astra_i3resnet152; see `unicon-tf presets`).")
@user_errors
def demo(out: pathlib.Path, fast: bool, base: pathlib.Path, preset: str | None) -> None:
    """The whole UNICON workflow on the built-in phantom cohort, with baselines and a report."""
    from unicon_tf.demo import run_demo

    result = run_demo(out, fast=fast, base=base, echo=click.echo, preset=preset)
    click.echo("")
    click.echo(format_matrix(result["continual"]))
    for baseline in result["baselines"].values():
        click.echo(format_matrix(baseline))
    summary, gain = result["summary"], result["gain"]
    forgetting = summary["forgetting_per_task"]
    click.echo(f"forgetting: continual {summary['forgetting']:+.4f} (per task "
               + ", ".join(f"{f:+.3f}" for f in forgetting) + ")")
    naive = result["baselines"].get("naive")
    if naive:
        from unicon_tf.evaluate import summarize

        click.echo(f"forgetting: naive fine-tuning {summarize(naive['matrix'])['forgetting']:+.4f}")
    echo_comparisons(result["continual"], result["baselines"])
    echo_pet_gain(gain)
    pushed = [p.uri for p in result["pushed"] if p.properties["pushed"]]
    click.echo(f"exported: {', '.join(pushed) or 'none (no stage blessed)'}")
    click.echo(f"report: {result['report']}  ({result['seconds']:.0f} s)")


@main.command()
@click.argument("pipeline_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="K of the patient-level, stratified K-fold cross-validation.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training seeds per fold (0 .. S-1).")
@click.option("--fractions", type=click.FloatRange(min=0, max=1, min_open=True), multiple=True, default=(1.0,),
              show_default=True, help="Fractions of each later stage's training patients (repeat or list).")
@click.option("--baselines", "kinds", type=click.Choice(["single_task", "naive", "joint"]), multiple=True,
              default=("single_task", "naive"), show_default=True, help="Arms beside the continual run.")
@click.option("--val-fraction", type=click.FloatRange(min=0, max=1, max_open=True), default=0.25, show_default=True,
              help="Share of a fold's non-test patients kept for validation.")
@click.option("--fold-seed", type=int, default=0, show_default=True, help="Seed of the fold partition.")
@click.option("--step-budget", type=click.Choice(["epochs", "steps"]), default="epochs", show_default=True,
              help="steps: at fraction f < 1 a later stage's epochs, patience and min_epochs are divided by f "
                   "(about as many optimizer steps as at fraction 1).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Experiment folder (an existing one is resumed).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--in-process", is_flag=True,
              help="Run every cell in this process, not each in its own child process: TensorFlow keeps the "
                   "graphs of every model trained, so memory grows with each cell (~100 MB on a small CNN, "
                   "GBs on a preset).")
@click.argument("more_fractions", nargs=-1, type=click.FloatRange(min=0, max=1, min_open=True))
@user_errors
def experiment(pipeline_path: str, folds: int, seeds: int, fractions: tuple[float, ...], kinds: tuple[str, ...],
               val_fraction: float, fold_seed: int, step_budget: str, out: pathlib.Path, data_root: str | None,
               in_process: bool, more_fractions: tuple[float, ...]) -> None:
    """Cross-validated experiment: folds x seeds x fractions, continual and baselines, intervals, report.

    Fractions may follow --fractions as a list: --fractions 0.25 0.5 1.0.
    """
    import tensorflow as tf

    from unicon_tf.experiment import ExperimentPlan, run_experiment

    if not in_process:  # the cells' processes train: this one must not reserve the GPUs' memory
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow's devices are already initialised (an embedding process)
            pass
    plan = ExperimentPlan(folds=folds, seeds=tuple(range(seeds)), fractions=tuple(fractions) + more_fractions,
                          baselines=tuple(kinds), val_fraction=val_fraction, fold_seed=fold_seed,
                          step_budget=step_budget)
    result = run_experiment(pipeline_path, out, plan, data_root=data_root, echo=click.echo,
                            isolate_cells=not in_process)
    for entry in result["data_efficiency"]:
        reached = entry["reached_at"]
        if reached:
            where = "not reached" if reached["fraction"] is None else f"{reached['fraction']:g}"
            click.echo(f"{entry['task']}: continual reaches the full-data single-task {entry['metric']} at {where}")
    click.echo(f"report: {result['report']}")
    click.echo(f"numbers: {pathlib.Path(result['out']) / 'experiment.json'}")


def echo_comparisons(continual: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> None:
    """Print each task against its single-task baseline, each arm's selection rule stated
    and a comparison across rules or against a model at chance flagged."""
    from unicon_tf.evaluate import comparisons, format_comparisons

    for line in format_comparisons(comparisons(continual, baselines)):
        click.echo(f"vs single-task: {line}")


def echo_pet_gain(gain: Mapping[str, Any] | None) -> None:
    """Print `unicon_tf.evaluate.pet_gain`'s result (nothing when the run has no PET head)."""
    from unicon_tf.evaluate import format_gain

    for line in format_gain(gain) if gain else []:
        click.echo(f"PET: {line}")


def format_matrix(result: Mapping[str, Any]) -> str:
    """The stage x task matrix of an evaluation as a text table."""
    width = max(12, *(len(t) + 2 for t in result["tasks"]))
    lines = [f"{result['kind']} ({result['split']} split)",
             f"{'after':<16}" + "".join(f"{t:>{width}}" for t in result["tasks"])]
    for stage, row in zip(result["stages"], result["matrix"]):
        lines.append(f"{stage:<16}" + "".join(f"{'':>{width}}" if v is None else f"{v:>{width}.3f}" for v in row))
    from unicon_tf.evaluate.report import format_rules

    rules = format_rules(result)
    return "\n".join(lines + ([rules] if rules else []))


def format_description(info: Mapping[str, Any]) -> str:
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
    if encoder.get("kind") == "vit":
        lines.append(f"  vit: patch {'x'.join(map(str, encoder['patch_size']))}, hidden {encoder['hidden_size']}, "
                     f"{encoder['num_layers']} blocks, {encoder['num_heads']} heads, mlp {encoder['mlp_dim']}, "
                     f"{encoder['position']} positions, states of blocks {encoder['feature_layers']}")
    if encoder.get("kind") == "i3resnet":
        lines.append(f"  i3resnet: bottlenecks {encoder['layers']}, width {encoder['width']}, BatchNorm frozen")
    for name, adapter in encoder["adapters"].items():
        lines.append(f"  adapter {name}: rank {adapter['rank']}, params {adapter['params']:,}, "
                     f"on {', '.join(adapter['targets'])}")
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
