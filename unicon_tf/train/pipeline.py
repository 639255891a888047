"""Pipeline specs: an ordered list of continual-learning stages, written as YAML.

```yaml
name: chest_ct
input_shape: [32, 32, 32]
modality: ct                      # the first modality (stage 0's stem)
encoder: {width: 16, depth: 4}   # or {kind: vit, patch_size: 8, ..., weights: vit.npz}, {preset: astra_i3resnet152}
defaults: {epochs: 5, batch_size: 4, learning_rate: 3.0e-4, strategy: frozen}  # + select, patience
stages:
  - {name: classification, task: classification, num_classes: 2, data: ct32}
  - {name: prognosis, task: prognosis, strategy: adapters, adapters: 4, data: ct32}
  - {name: pet, task: segmentation, modality: pet, head: segmentation_ctpet, data: lesion32}
```

Stage keys: `name`, `task`, `data` (an ingested folder, relative paths resolving against
the data root, by default the pipeline file's folder; or the name of a `sources` entry,
`{manifest, shape, spacing[, center, mask_classes, windows]}`, that the pipeline runner
ingests with ExampleGen), optional `modality` (a new one),
`head` (the head's name), `modalities`, `adapters` (rank), `adapter_start` (the first
encoder level the new path computes, levels below shared with the base path; see
`expand`), the path's isolation options `adapter_levels` (levels whose layers get the
path's adapters and norm copies), `adapter_shortcuts` (adapters on 1x1x1 shortcut
convolutions too, default true) and `path_norm` (its own GroupNorm scale and shift),
head options (`num_classes`, `dropout`, `blocks_per_level`, `side_encoder`: `unicon_tf.options.HEAD_OPTIONS`),
the training keys of `unicon_tf.train.config.TrainingConfig` (model selection: `select`, `patience`, `monitor`, `min_epochs`,
`smoothing`, see `unicon_tf.train.selection`; blessing: `tolerance`, `threshold`, `bless:
{min_vs_baseline: delta}`, see `unicon_tf.evaluate.matrix.bless`; `loss: {dice: pooled |
per_patient, ce_weighting: none | lesion}`, see `unicon_tf.train.config.LOSS_OPTIONS`; `sampling: {foreground_probability:
p}`, see `unicon_tf.data.sampling`), and `resources` for an orchestrator
(`RESOURCE_KEYS`, e.g. `{cpu: 8, memory: 32G, gpu: 1}`).

Reading and checking a pipeline file imports neither TensorFlow nor Keras.
"""

import dataclasses
import hashlib
import json
import pathlib
import typing
from collections.abc import Mapping

import yaml

from unicon_tf.names import InvalidNameError, check_folder_name, check_name
from unicon_tf.options import ENCODER_OPTIONS, HEAD_OPTIONS, TASKS, check_head_options, check_path_levels, \
    default_head_name, default_modalities, encoder_levels, head_kind
from unicon_tf.presets.registry import PRESETS
from unicon_tf.train.config import (BLESS_KEYS, LOSS_OPTIONS, OPTIONAL_TRAINING_KEYS, kind_declaration,  # noqa: F401
                                    SELECTION_KEYS, TRAINING_DEFAULTS, TrainingConfig)

PATH_KEYS = {"adapter_levels": None, "adapter_shortcuts": True, "path_norm": False}
"""A stage's isolation options for its head's own encoder parameters (`expand`'s), with
their defaults."""
STAGE_KEYS = {"name", "task", "data", "modality", "head", "modalities", "adapters", "adapter_start", "resources",
              *PATH_KEYS}
RESOURCE_KEYS = {"cpu": (int, float, str), "memory": (int, str), "gpu": (int,), "accelerator": (str,)}
"""A stage's `resources` on an orchestrator (`unicon-tf compile`): cores ("8", "500m"),
memory ("32G", "16Gi"), GPU count and accelerator type ("nvidia.com/gpu",
"NVIDIA_TESLA_A100" on Vertex AI). The local runner ignores them."""


class PipelineError(ValueError):
    """A pipeline file that cannot be used; the message names the file, stage and key."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline (see the module docstring for the keys)."""

    name: str
    task: str
    data: pathlib.Path
    modality: str | None = None
    head: str | None = None
    modalities: tuple | None = None
    adapters: int | None = None
    adapter_start: int = 0
    path_options: dict = dataclasses.field(default_factory=dict)  # PATH_KEYS given (expand's keywords)
    head_options: dict = dataclasses.field(default_factory=dict)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    source: str | None = None  # a `sources` entry whose ExampleGen output is this stage's data
    resources: dict = dataclasses.field(default_factory=dict)  # see RESOURCE_KEYS

    def to_json(self) -> dict:
        config = dataclasses.asdict(self)
        config["training"] = self.training.to_json(complete=False)
        if not config["path_options"]:
            del config["path_options"]
        config["data"] = str(self.data)
        config["modalities"] = list(self.modalities) if self.modalities else None
        return config

    def fingerprint(self) -> str:
        """SHA-256 of what defines the stage's model (not the data path or epochs)."""
        defining = {k: v for k, v in self.to_json().items() if k not in ("data", "training", "resources")}
        if not defining["adapter_start"]:
            del defining["adapter_start"]  # runs from before the option keep their fingerprints
        defining["strategy"] = self.training.strategy
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """A parsed pipeline file."""

    name: str
    path: pathlib.Path
    input_shape: tuple
    modality: str
    encoder: dict
    stages: list
    sources: dict = dataclasses.field(default_factory=dict)

    def stage(self, name: str) -> tuple[int, StageSpec]:
        """`(index, StageSpec)` of the stage called `name`.

        Raises:
            PipelineError: no stage has that name.
        """
        for index, stage in enumerate(self.stages):
            if stage.name == name:
                return index, stage
        raise PipelineError(f"{self.path}: no stage '{name}' (stages: {[s.name for s in self.stages]}).")

    def head_modalities(self, index: int) -> list[str]:
        """The modalities stage `index`'s head reads: its `modalities`, else the pipeline's
        modality (for stage 0: the stage's own `modality`, if any) plus the stage's new one."""
        spec = self.stages[index]
        if spec.modalities:
            return list(spec.modalities)
        if index == 0:
            return [spec.modality or self.modality]
        return default_modalities(self.modality, spec.modality)

    def head_name(self, index: int) -> str:
        """The output name of stage `index`'s head: its `head`, else the default name."""
        spec = self.stages[index]
        return spec.head or default_head_name(spec.task, self.head_modalities(index))

    def to_json(self) -> dict:
        """A JSON-able dict that `PipelineSpec.from_json` turns back into this spec."""
        return {"name": self.name, "path": str(self.path), "input_shape": list(self.input_shape),
                "modality": self.modality, "encoder": dict(self.encoder), "sources": dict(self.sources),
                "stages": [s.to_json() for s in self.stages]}

    @classmethod
    def from_json(cls, config: Mapping) -> "PipelineSpec":
        """The spec `to_json` wrote (e.g. a component's recorded parameter).

        Example:
        >>> spec = PipelineSpec("p", pathlib.Path("p.yaml"), (16, 16, 16), "ct", {}, [
        ...     StageSpec("a", "classification", pathlib.Path("data"))])
        >>> PipelineSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
        True
        """
        stages = [StageSpec(**{"path_options": {}, **s, "data": pathlib.Path(s["data"]),
                               "training": TrainingConfig.from_json(s["training"]),
                               "modalities": tuple(s["modalities"]) if s["modalities"] else None})
                  for s in config["stages"]]
        return cls(name=config["name"], path=pathlib.Path(config["path"]), input_shape=tuple(config["input_shape"]),
                   modality=config["modality"], encoder=dict(config["encoder"]), stages=stages,
                   sources=dict(config["sources"]))


def load_pipeline(path: pathlib.Path | str, data_root: pathlib.Path | str | None = None) -> PipelineSpec:
    """Read and validate a pipeline YAML file.

    Args:
        path: the YAML file.
        data_root: folder that relative `data` paths resolve against (default: the
            pipeline file's folder).

    Returns:
        A `PipelineSpec`.

    Raises:
        PipelineError: the file is missing, not YAML, or a key or value is wrong (the
            message names the file, the stage and the key).

    Example:
    >>> import tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny.yaml"
    >>> _ = path.write_text('''
    ... name: tiny
    ... input_shape: [16, 16, 16]
    ... stages:
    ...   - {name: grade, task: classification, data: ct16, epochs: 2}
    ...   - {name: survival, task: prognosis, data: ct16, strategy: adapters, adapters: 4}
    ... ''')
    >>> spec = load_pipeline(path, data_root="/data")
    >>> [(s.name, s.training.strategy, str(s.data)) for s in spec.stages]
    [('grade', 'frozen', '/data/ct16'), ('survival', 'adapters', '/data/ct16')]
    >>> spec.head_name(1), spec.head_modalities(1)
    ('prognosis', ['ct'])
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: pipeline file does not exist.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PipelineError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping with 'name', 'input_shape' and 'stages'.")
    for key in ("name", "input_shape", "stages"):
        if key not in raw:
            raise PipelineError(f"{path}: missing key '{key}'.")
    unknown = set(raw) - {"name", "input_shape", "modality", "encoder", "defaults", "stages", "sources"}
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {sorted(unknown)}.")
    root = pathlib.Path(data_root) if data_root is not None else path.parent
    defaults = {**TRAINING_DEFAULTS, **(raw.get("defaults") or {})}
    unknown = set(defaults) - set(TRAINING_DEFAULTS)
    if unknown:
        raise PipelineError(f"{path}: unknown default(s) {sorted(unknown)}; known: {sorted(TRAINING_DEFAULTS)}.")
    sources = {_checked_name(f"{path}: sources", "name", str(name), "source", check_folder_name):
               _source(path, name, entry, root) for name, entry in (raw.get("sources") or {}).items()}
    encoder = _encoder(path, raw.get("encoder"), root)
    family = _family_name(encoder.get("encoder"))
    context = _StageContext(defaults, root, sources, family, encoder)
    stages = [_stage(path, index, entry, context)
              for index, entry in enumerate(raw["stages"] or [])]
    if not stages:
        raise PipelineError(f"{path}: 'stages' is empty.")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: stage names must be unique, got {names}.")
    modality = _checked_name(f"{path}", "modality", raw.get("modality", "ct"), "modality")
    name = _checked_name(f"{path}", "name", str(raw["name"]), "pipeline", check_folder_name)
    return PipelineSpec(name=name, path=path.resolve(), input_shape=tuple(raw["input_shape"]),
                        modality=modality, encoder=encoder,
                        stages=stages, sources=sources)


SOURCE_KEYS = {"manifest", "shape", "spacing", "center", "mask_classes", "windows"}


def _source(path, name, entry, root):
    """A `sources` entry: a NIfTI manifest and how ExampleGen ingests it."""
    where = f"{path}: source '{name}'"
    if not isinstance(entry, dict) or "manifest" not in entry or "shape" not in entry or "spacing" not in entry:
        raise PipelineError(f"{where}: needs 'manifest', 'shape' and 'spacing'.")
    unknown = set(entry) - SOURCE_KEYS
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(SOURCE_KEYS)}.")
    manifest = pathlib.Path(entry["manifest"])
    return {**entry, "manifest": str(manifest if manifest.is_absolute() else root / manifest)}


def _encoder(path, entry, root):
    """`foundation` keyword arguments from the `encoder` mapping: `kind: residual | vit |
    i3resnet` with the family's options, or `preset: <name>` (optionally with `weights`).

    A relative `weights` path resolves against the data root, like stage data.
    """
    if entry is not None and not isinstance(entry, dict):
        raise PipelineError(f"{path}: encoder must be a mapping, e.g. `encoder: {{preset: astra_i3resnet152}}` or "
                            f"`encoder: {{kind: residual, width: 16}}`; got {entry!r}.")
    entry = dict(entry or {})
    if "preset" in entry:
        name = entry.pop("preset")
        if not isinstance(name, str) or name not in PRESETS:
            raise PipelineError(f"{path}: encoder.preset {name!r} is unknown (expected one of {sorted(PRESETS)}).")
        unknown = set(entry) - {"weights"}
        if unknown:
            raise PipelineError(f"{path}: unknown encoder key(s) {sorted(unknown)} with preset '{name}'; "
                                "a preset takes only 'weights'.")
        if PRESETS[name].weights["from"] == "file" and entry.get("weights") is None:
            raise PipelineError(f"{path}: encoder.weights is missing: preset '{name}' loads a checkpoint you "
                                f"supply ({PRESETS[name].weights['format']}); add `weights: <file>` under encoder.")
        kind, known = name, ("weights",)
    else:
        kind = entry.pop("kind", "residual")
        if not isinstance(kind, str) or kind not in ENCODER_OPTIONS:
            raise PipelineError(f"{path}: encoder.kind {kind!r} is unknown (expected one of "
                                f"{sorted(ENCODER_OPTIONS)}).")
        known = ENCODER_OPTIONS[kind]
    unknown = set(entry) - set(known)
    if unknown:
        raise PipelineError(f"{path}: unknown encoder key(s) {sorted(unknown)} for kind '{kind}'; "
                            f"known: {sorted(known)}.")
    _check_encoder_counts(path, entry)
    if "weights" in entry:
        if not isinstance(entry["weights"], str) or not entry["weights"]:
            raise PipelineError(f"{path}: encoder.weights must be a file path, got {entry['weights']!r}.")
        weights = pathlib.Path(entry["weights"])
        entry["weights"] = str(weights if weights.is_absolute() else root / weights)
    return entry if kind == "residual" else {"encoder": kind, **entry}


def _check_encoder_counts(path, entry):
    """The encoder's `width`, `depth` and `layers`, read by the level check (`encoder_levels`)
    and the builders: whole numbers >= 1 (`layers`: four of them, an I3ResNet's blocks)."""
    def whole(value):  # YAML integers only: not true, 2.5 or '3'
        return not isinstance(value, bool) and isinstance(value, int) and value >= 1

    for key in ("width", "depth"):
        if entry.get(key) is not None and not whole(entry[key]):
            raise PipelineError(f"{path}: encoder.{key} must be a whole number >= 1, got {entry[key]!r}.")
    layers = entry.get("layers")
    if layers is not None and (not isinstance(layers, list) or len(layers) != 4 or not all(map(whole, layers))):
        raise PipelineError(f"{path}: encoder.layers must be four whole numbers >= 1 (blocks per I3ResNet layer), "
                            f"got {layers!r}.")


def _family_name(encoder):
    """The family of a pipeline's `encoder` argument (a family or preset name, or None)."""
    return PRESETS[encoder].family if encoder in PRESETS else encoder or "residual"


class _StageContext(typing.NamedTuple):
    """What every stage of a pipeline file is read against."""

    defaults: dict  # the training keys' values: TRAINING_DEFAULTS, then the file's `defaults`
    root: pathlib.Path  # the data root
    sources: dict  # the file's `sources`
    family: str  # the encoder family
    encoder: dict  # the encoder's `foundation` arguments


def _stage(path, index, entry, context):
    """Stage `index` (its mapping `entry`) of the pipeline file `path` as a `StageSpec`, checked."""
    where = f"{path}: stage {index + 1}"
    if not isinstance(entry, dict) or "name" not in entry or "task" not in entry or "data" not in entry:
        raise PipelineError(f"{where}: each stage needs 'name', 'task' and 'data'.")
    _checked_name(where, "name", str(entry["name"]), "stage", check_folder_name)
    where = f"{path}: stage '{entry['name']}'"
    task = entry["task"]
    try:
        kind = kind_declaration(task)
    except ValueError as error:
        raise PipelineError(f"{where}: {error}") from None
    head_options = {k: v for k, v in entry.items() if k not in STAGE_KEYS and k not in TRAINING_DEFAULTS}
    _check_head_options(where, task, context.family, head_options)
    training = _stage_training(where, entry, context.defaults, task, kind)
    _check_modalities(where, entry)
    adapter_start, path_options = _adapter_start(where, entry.get("adapter_start", 0)), _path_options(where, entry)
    try:
        check_path_levels(context.family, encoder_levels(context.family, context.encoder), adapter_start,
                          path_options.get("adapter_levels"))
    except ValueError as error:
        raise PipelineError(f"{where}: {error}") from None
    data = pathlib.Path(entry["data"])
    source = str(entry["data"]) if str(entry["data"]) in context.sources else None
    return StageSpec(
        name=str(entry["name"]), task=task, data=data if data.is_absolute() or source else context.root / data,
        source=source, modality=entry.get("modality"), head=entry.get("head"),
        modalities=tuple(entry["modalities"]) if entry.get("modalities") else None,
        adapters=entry.get("adapters"), adapter_start=adapter_start,
        path_options=path_options, head_options=head_options, training=training,
        resources=_resources(where, entry.get("resources")),
    )


def _stage_training(where, entry, defaults, task, kind):
    """The stage's `TrainingConfig`: its training keys over the pipeline's `defaults`
    (`loss` and `sampling` defaults only for the tasks whose kind (`KindDeclaration`) has
    them), checked."""
    training = {**defaults, **{k: v for k, v in entry.items() if k in TRAINING_DEFAULTS}}
    for key, applies in (("loss", bool(kind.loss_options)), ("sampling", kind.dense)):
        if key not in entry and not applies:  # from `defaults`: only for the stages whose task has them
            training[key] = {}
    return _checked_training(where, TrainingConfig(**training), task)


def _check_modalities(where, entry):
    """Refuse a stage's `modality`, `head` or `modalities` that is not a valid name (names the field)."""
    modality = entry.get("modality")
    if modality is not None:
        _checked_name(where, "modality", modality, "modality")
    if entry.get("head") is not None:
        _checked_name(where, "head", entry["head"], "head")
    modalities = entry.get("modalities")
    if modalities is not None and (isinstance(modalities, str) or not isinstance(modalities, (list, tuple))):
        raise PipelineError(f"{where}: field 'modalities' must be a list of modality names, got {modalities!r}.")
    for name in modalities or []:
        _checked_name(where, "modalities", name, "modality")


def _path_options(where, entry):
    """The stage's `PATH_KEYS` that differ from their defaults, their types checked (the
    ranges are checked against the encoder by `check_path_levels`)."""
    options = {}
    levels = entry.get("adapter_levels")
    if levels is not None:
        if not isinstance(levels, list) or not levels or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in levels):
            raise PipelineError(f"{where}: field 'adapter_levels' must be a non-empty list of encoder levels "
                                f"(integers >= 0), got {levels!r}.")
        options["adapter_levels"] = sorted(set(levels))
    for key in ("adapter_shortcuts", "path_norm"):
        value = entry.get(key, PATH_KEYS[key])
        if not isinstance(value, bool):
            raise PipelineError(f"{where}: field '{key}' must be true or false, got {value!r}.")
        if value != PATH_KEYS[key]:
            options[key] = value
    if options and entry.get("adapters") is None and not options.get("path_norm"):
        raise PipelineError(f"{where}: fields {sorted(options)} place the head's own encoder parameters: "
                            "give 'adapters' (a rank) or 'path_norm: true' with them.")
    return options


def _check_head_options(where, task, family, options):
    """Raise PipelineError naming the field for a head option the head of `task` on `family`
    does not take, of the wrong type (an int option given `two`, `2.5` or `true`), or one
    the head refuses (`num_classes: 1`): checked against `unicon_tf.options.HEAD_OPTIONS`,
    which `expand` will construct the head with; the head of a kind added as a module of
    `unicon_tf.tasks` only is checked by constructing it (`_check_added_kind_head`)."""
    if task not in TASKS:
        _check_added_kind_head(where, task, family, options)
        return
    try:
        check_head_options(task, options, family)
    except KeyError as error:
        raise PipelineError(f"{where}: unknown key(s) {error.args[0]} (a {task} head accepts "
                            f"{list(HEAD_OPTIONS[head_kind(task, family)])}; training keys: "
                            f"{sorted(TRAINING_DEFAULTS)}).") from None
    except TypeError as error:
        raise PipelineError(f"{where}: {error}") from None
    except ValueError as error:
        raise PipelineError(f"{where}: head options {options}: {error}") from None


def _check_added_kind_head(where, task, family, options):
    """`_check_head_options` for a kind that `unicon_tf.options` does not declare: its head
    class (`TaskKind.head_class`) is constructed with the options (TensorFlow is imported)."""
    from unicon_tf.tasks import task_kind  # an added kind: its module is its declaration

    head_class = task_kind(task).head_class(family)
    unknown = sorted(set(options) - set(head_class.options()))
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {unknown} (a {task} head accepts {list(head_class.options())}; "
                            f"training keys: {sorted(TRAINING_DEFAULTS)}).")
    try:
        head_class(**options)
    except (TypeError, ValueError) as error:
        raise PipelineError(f"{where}: head options {options}: {error}") from None


def _adapter_start(where, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PipelineError(f"{where}: adapter_start must be an encoder level >= 0, got {value!r}.")
    return value


def _resources(where, resources):
    """A stage's `resources` mapping, its keys and value types checked (their formats are
    the orchestrator's to check)."""
    if resources is None:
        return {}
    if not isinstance(resources, dict):
        raise PipelineError(f"{where}: resources must be a mapping of {sorted(RESOURCE_KEYS)}.")
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            raise PipelineError(f"{where}: unknown resources key '{key}'; known: {sorted(RESOURCE_KEYS)}.")
        if isinstance(value, bool) or not isinstance(value, RESOURCE_KEYS[key]) or (
                key == "gpu" and value < 0):
            raise PipelineError(f"{where}: resources: {key} = {value!r} is not valid.")
    return dict(resources)


def _checked_name(where, field, name, kind, check=check_name):
    """`name` if `check` (`unicon_tf.names.check_name` or `check_folder_name`) accepts it, else a
    PipelineError naming the field."""
    try:
        return check(name, kind)
    except InvalidNameError as error:
        raise PipelineError(f"{where}: field '{field}': {error}") from error


def _checked_training(where, training, task=None):
    """`training` (a `TrainingConfig`) checked for a stage of `task`.

    Raises:
        PipelineError: an unknown strategy or a training setting out of range (names the key).
    """
    try:
        return training.checked(task)
    except ValueError as error:
        raise PipelineError(f"{where}: {error}") from None


def with_overrides(stage: StageSpec, **overrides: object) -> StageSpec:
    """A copy of `stage` with training keys overridden (None values are ignored).

    Raises:
        PipelineError: an unknown strategy or a value out of range (names the key).
    """
    training = _checked_training(f"stage '{stage.name}'", stage.training.replace(**overrides), stage.task)
    return dataclasses.replace(stage, training=training)
