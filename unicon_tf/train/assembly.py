"""A stage's network and plugins: the previous stage's model expanded with the stage's
head (or a new foundation model at stage 0), its teacher, its dtype policy and what
trains under the stage's strategy; the plugins its strategy adds (LwF, L2-SP, EWC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import keras

from unicon_tf import presets
from unicon_tf.data import read_schema
from unicon_tf.files import sha256
from unicon_tf.model import expand, foundation, model_parts
from unicon_tf.model.storage import load_model
from unicon_tf.run import StageError, StageFolder
from unicon_tf.train.plugins import EWC, Distillation, WeightPenalty
from unicon_tf.train.precision import set_precision
from unicon_tf.train.strategies import configure_trainable, shared_trainable_variables

if TYPE_CHECKING:
    import pathlib

    import numpy as np

    from unicon_tf.model.heads import Head
    from unicon_tf.train.pipeline import PipelineSpec, StageSpec
    from unicon_tf.train.plugins import Plugin


@dataclasses.dataclass(frozen=True)
class StageNetwork:
    """A stage's network, assembled.

    Attributes:
        network: the Keras model the stage trains (every head so far, the new one last).
        teacher: the previous stage's model, frozen (None at stage 0).
        teacher_ref: what the teacher is, for the record (`{stage, model, sha256}`,
            `{init, sha256}` or None).
        head: the name of the head the stage trains.
    """

    network: keras.Model
    teacher: keras.Model | None
    teacher_ref: dict | None
    head: str

    @property
    def head_layer(self) -> Head:
        """The trained head's layer (`unicon_tf.model.heads.Head`)."""
        return model_parts(self.network)["heads"][self.head]


def assemble(pipeline: PipelineSpec, index: int, spec: StageSpec, init: pathlib.Path | str | None = None,
             base: StageFolder | pathlib.Path | str | None = None) -> StageNetwork:
    """The network of stage `index` of `pipeline`, under the stage's precision, with what
    its strategy trains set trainable.

    Args:
        pipeline, spec: the `PipelineSpec` and the stage's `StageSpec` (overrides applied).
        index: the stage's position.
        init: stage 0 only: a `.keras` model to start from instead of `foundation`.
        base: the previous stage's `StageFolder` (None at stage 0).

    Raises:
        StageError: the data does not fit the encoder preset (`check_preset_contract`).
    """
    hp = spec.training
    check_preset_contract(pipeline, spec)  # before the (large) pretrained encoder is built
    keras.utils.set_random_seed(hp.seed)
    network, teacher, teacher_ref = _network_for_stage(pipeline, index, spec, init, base)
    if hp.precision != "float32":
        set_precision(network, hp.precision)
        if teacher is not None:
            set_precision(teacher, hp.precision)
    assembled = StageNetwork(network, teacher, teacher_ref, spec.head or _newest_head(network))
    configure_trainable(network, assembled.head_layer.stage, hp.strategy,
                        pretrained="weights" in pipeline.encoder or pipeline.encoder.get("encoder") in presets.PRESETS)
    return assembled


def check_preset_contract(pipeline: PipelineSpec, spec: StageSpec) -> None:
    """Refuse a stage whose data was not ingested as the pipeline's encoder preset expects.

    Raises:
        StageError: naming the data folder, the preset and each mismatch (spacing, window,
            intensity range, shape).
    """
    name = pipeline.encoder.get("encoder")
    if name not in presets.PRESETS:
        return
    problems = presets.schema_mismatches(name, read_schema(spec.data), pipeline.modality)
    if problems:
        raise StageError(f"Stage '{spec.name}': {spec.data}/schema.json does not match encoder preset '{name}': "
                         + "; ".join(problems) + f". Ingest it with `unicon-tf ingest --preset {name}`.")


def previous_stage(pipeline: PipelineSpec, index: int,
                   base: StageFolder | pathlib.Path | str | None) -> tuple[StageFolder | None, dict | None]:
    """`(StageFolder, record)` of the previous stage, checked against the pipeline; (None, None)
    for the first stage."""
    if index == 0:
        return None, None
    previous = pipeline.stages[index - 1]
    if base is None:
        raise StageError(f"Stage '{pipeline.stages[index].name}' starts from stage '{previous.name}': "
                         "give its trained folder (the Trainer's base_model).")
    base = base if isinstance(base, StageFolder) else StageFolder(base)
    record = base.record()
    if record["fingerprint"] != previous.fingerprint():
        raise StageError(f"{base.path} was trained from a different definition of stage '{previous.name}' "
                         "(another pipeline or an edited one): use another --run-dir.")
    return base, record


def _newest_head(network):
    heads = model_parts(network)["heads"].values()
    return max(heads, key=lambda h: h.stage).name


def _network_for_stage(pipeline, index, spec, init, base):
    """(network, teacher or None, teacher reference) for the stage."""
    options = dict(spec.head_options)
    if index == 0:
        if init is not None:
            network = load_model(init)
            if (spec.head or spec.task) not in network.output:  # otherwise train the head it has
                network = expand(network, task=spec.task, name=spec.head, adapters=spec.adapters,
                                 adapter_start=spec.adapter_start, **spec.path_options, **options)
            return network, None, {"init": str(init), "sha256": sha256(init)}
        modalities = pipeline.head_modalities(0)  # several: a single-task baseline of a multi-modality stage
        network = foundation(pipeline.input_shape, modality=modalities, task=spec.task, name=pipeline.name,
                             head_name=spec.head, fusion_level=spec.adapter_start if len(modalities) > 1 else 0,
                             **pipeline.encoder, **options)
        return network, None, None
    previous = base.model
    network = load_model(previous)
    teacher = load_model(previous)
    network = expand(network, task=spec.task, modality=spec.modality, name=spec.head, adapters=spec.adapters,
                     modalities=list(spec.modalities) if spec.modalities else None,
                     adapter_start=spec.adapter_start, **spec.path_options, **options)
    reference = {"stage": pipeline.stages[index - 1].name, "model": str(previous), "sha256": sha256(previous)}
    return network, teacher, reference


def stage_plugins(spec: StageSpec, network: keras.Model, teacher: keras.Model | None, available: Sequence[str],
                  fisher: dict[str, np.ndarray] | None, ewc_later: bool) -> list[Plugin]:
    """The stage's plugins: LwF and L2-SP or EWC under `finetune`; an inactive EWC that only
    adds this stage's Fisher when a later stage uses EWC."""
    hp = spec.training
    finetune = hp.strategy == "finetune"
    plugins = []
    if finetune and teacher is not None and hp.alpha > 0:
        old = {name: h.task for name, h in model_parts(teacher)["heads"].items()}
        plugins.append(Distillation(teacher, old, alpha=hp.alpha, temperature=hp.temperature,
                                    modalities=available))
    ewc = finetune and hp.beta > 0 and hp.penalty == "ewc" and teacher is not None
    if ewc and fisher is None:
        raise StageError(f"Stage '{spec.name}' uses EWC, but the previous stage saved no fisher.npz "
                         "(it is written when a later stage declares penalty: ewc): retrain it.")
    if finetune and hp.beta > 0 and not ewc:
        plugins.append(WeightPenalty(shared_trainable_variables(network), beta=hp.beta))
    if ewc or ewc_later:
        plugins.append(EWC(shared_trainable_variables(network), model_parts(network)["encoder"].base_weights(),
                           beta=hp.beta if ewc else 0.0, fisher=fisher, gamma=hp.ewc_gamma))
    return plugins
