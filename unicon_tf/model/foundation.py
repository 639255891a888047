"""Build the stage-0 foundation model, grow it with `expand`, and read it with `describe`.

The model is one Keras functional graph with a dict of inputs (one per modality) and a
dict of outputs (one per head):

    inputs{"ct", "pet", ...} -> stems -> [fusion] -> SharedEncoder -> heads -> outputs{head}

`expand` returns a new functional model over the *same* layer objects. It adds a head
(and, for a new modality, an input and a stem) on a path that either reuses an existing
path's feature tensors or calls the shared encoder once more (on a fused input, or with
the new head's adapter). With `adapter_start=s` that call starts at encoder level s: the
new path shares the first modality's base feature maps of levels < s (the costliest,
full-resolution ones) and computes levels s ... only. Nothing that an existing output
depends on is rebuilt, re-initialised or re-wired, so old outputs stay bit-identical.

The registry (head -> task, modalities, stage, adapter) is not stored beside the graph:
it *is* the configs of the stem, fusion and head layers, so it survives `.keras` saving.
"""

import math
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np

from unicon_tf.presets import registry as presets
from unicon_tf.model.encoder import SharedEncoder
from unicon_tf.model.families import FAMILIES, EncoderFamily, family_named, family_of
from unicon_tf.model.i3resnet import I3RESNET_OPTIONS  # noqa: F401 (the module registers the i3resnet family)
from unicon_tf.model.vit import VIT_OPTIONS  # (the module registers the vit family)
from unicon_tf.model.heads import default_head_name, default_modalities
from unicon_tf.model.parts import model_parts
from unicon_tf.model.stems import ModalityFusion, ModalityStem
from unicon_tf.names import check_name
from unicon_tf.options import check_path_levels
from unicon_tf.tasks import task_kind

__all__ = ["VIT_OPTIONS", "describe", "encoder_spec", "expand", "foundation", "model_parts", "non_finite_weights"]


def foundation(
    input_shape: Sequence[int],
    modality: str | Sequence[str] = "ct",
    task: str = "classification",
    num_classes: int = 2,
    width: int | None = None,
    depth: int | None = None,
    encoder: str | keras.Model | None = None,
    name: str = "unicon",
    head_name: str | None = None,
    fusion_level: int = 0,
    **head_options: Any,
) -> keras.Model:
    """The stage-0 model: modality stem(s), the shared encoder and one head.

    Args:
        input_shape: spatial shape `(D, H, W)` of every modality's volume; each dim must be
            divisible by the encoder's total stride (2 ** (depth - 1) for the built-in one).
        modality: name of the first modality (the input's key), e.g. `"ct"`; or a list of
            modalities, fused (e.g. a single-task CT+PET baseline trained from scratch).
        task: the first head's task kind (`unicon_tf.tasks.TASKS`), e.g. `classification`.
        num_classes: classes of a classification or segmentation head.
        width: channels of the built-in encoder's first level (and of the stem), default
            16; for `encoder="i3resnet"` the stem's width (default 64, ResNet-152's).
        depth: levels of the built-in encoder, default 4.
        encoder: None (the residual CNN), `"vit"` (a 3D ViT: patch-embedding stems, LoRA on
            attention, UNETR segmentation; options below), `"i3resnet"` (Merlin's inflated
            3D ResNet; options `layers`, `width`, `weights`: a `torch.save` checkpoint), a
            preset name (`unicon_tf.presets.names()`, e.g. `"astra_i3resnet152"`: a
            published encoder with its weights; `weights=<file>` for presets whose
            checkpoint you supply), or a user backbone (bring your own pretrained encoder):
            a functional `keras.Model` from a volume `(D, H, W, C)` to a list of
            multi-scale feature maps, finest first. With C == 1 the stem passes the volume
            through unchanged. Families: `unicon_tf.model.families`.
        name: the model's name.
        head_name: the head's (and output's) name; defaults to the task, suffixed with the
            modalities when it reads several (`default_head_name`).
        fusion_level: with several modalities, the encoder level s whose input fuses them:
            0 fuses the stems; s > 0 computes levels < s from the first modality alone and
            fuses the others' stem features (average-pooled) into its level s - 1 map, as
            `expand(..., adapter_start=s)` does for a new modality (on a frozen pretrained
            encoder the head then trains without backpropagating through levels < s).
        **head_options: further options of the head (see `unicon_tf.model.heads`), and
            with `encoder="vit"` the `VIT_OPTIONS`: `patch_size` (int or per axis, default
            16; a power of two for UNETR), `hidden_size` (768), `num_layers` (12),
            `num_heads` (12), `mlp_dim` (3072), `position` (`learned` | `sincos`),
            `position_grid` (the learned embedding's token grid, default the model's;
            another grid is interpolated), `feature_layers`, `qkv_bias`,
            `adapter_targets` (default `["query", "value"]`), `weights` (a MONAI ViT
            state dict, `.safetensors` or `.npz`, loaded into the CT stem and encoder)
            and `weights_format`.

    Returns:
        A functional `keras.Model` with inputs `{modality: (batch, D, H, W, 1)}` and
        outputs `{head_name: ...}`.

    Raises:
        InvalidNameError: a modality or head name breaks `unicon_tf.names.check_name`.
        ValueError: `input_shape` is not three positive dims or not divisible by the
            encoder's stride; `modality` names no or repeated modalities; an unknown
            `task` or head option; `num_classes` < 2; `fusion_level` > 0 with one
            modality, outside `[1, depth - 1]` or on an encoder without levels (a ViT).
        PretrainedWeightsError: `weights` that do not fit the ViT.

    Example:
    >>> model = foundation((32, 32, 32), modality="ct", task="classification", num_classes=2)
    >>> sorted(model.output)
    ['classification']
    """
    input_shape = _spatial_shape(input_shape)
    family, options, weights = encoder_spec(encoder, head_options, width=width, depth=depth)
    if family.build is None:
        shared = SharedEncoder(encoder, name="encoder")
    else:
        shared = family.build(input_shape, **options)
    stem_options = shared.stem_options()
    _check_feature_scales(shared, input_shape)

    modalities = [modality] if isinstance(modality, str) else list(modality)
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modality must name one or more distinct modalities, got {modality!r}.")
    for m in modalities:
        check_name(m, "modality")
    head_name = check_name(head_name or default_head_name(task, modalities), "head")
    inputs = {m: keras.Input(input_shape + (1,), name=m) for m in modalities}
    stems = [ModalityStem(m, channels=shared.input_channels, stage=0, **stem_options)(inputs[m]) for m in modalities]
    if fusion_level:
        _check_fusion_level(family, shared, fusion_level, modalities)
        base = shared(stems[0])
        level_input = ModalityFusion(modalities, stage=0, level=fusion_level)([base[fusion_level - 1]] + stems[1:])
        features = _features_from(shared, base, fusion_level, level_input)
    else:
        features = shared(stems[0] if len(stems) == 1 else ModalityFusion(modalities, stage=0)(stems))
    head = _make_head(task, shared, input_shape, name=head_name, modalities=modalities, stage=0,
                      num_classes=num_classes, **head_options)
    model = keras.Model(inputs, {head.name: _apply_head(head, features, inputs)}, name=name)
    if weights[0] is not None:
        family.load_weights(model, weights[0], format=weights[1])
    return model


def encoder_spec(encoder: str | keras.Model | None, options: dict, width: int | None = None,
                 depth: int | None = None) -> tuple[EncoderFamily, dict, tuple]:
    """The family, build options and weights `(path, format)` that `foundation(encoder=...)` means.

    Pops the family's options (and `weights`, `weights_format`) from `options`, leaving
    the head's.

    Args:
        encoder: None or a family name (`unicon_tf.model.families.FAMILIES`), a preset name
            (`unicon_tf.presets.names()`), or a user's `keras.Model` backbone.
        options: `foundation`'s remaining keyword options (modified: the encoder's removed).
        width, depth: `foundation`'s own encoder arguments (None: the family's default).

    Raises:
        ValueError: an unknown encoder name, or options the chosen family does not take.
        PretrainedWeightsError: a preset whose weights cannot be found (`presets.weights_path`).
    """
    chosen = {"width": width, "depth": depth}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    preset = None
    if encoder is None or isinstance(encoder, str) and encoder in FAMILIES and encoder != "custom":
        family = family_named(encoder or "residual")
    elif isinstance(encoder, str) and encoder in presets.PRESETS:
        preset = presets.preset(encoder)
        family = family_named(preset.family)
    elif isinstance(encoder, str):
        raise ValueError(f"Unknown encoder '{encoder}': expected a family ({sorted(set(FAMILIES) - {'custom'})}), "
                         f"a preset ({presets.names()}) or a keras.Model backbone.")
    else:
        family = family_named("custom")
    accepted = set(family.options) | ({"weights", "weights_format"} if family.load_weights is not None else set())
    foreign = {k: options.pop(k) for k in list(options)
               if k not in accepted and any(k in f.options for f in FAMILIES.values())}
    foreign.update({k: v for k, v in chosen.items() if k not in accepted})
    if foreign:
        owners = sorted({f.name for f in FAMILIES.values() for k in foreign if k in f.options})
        raise ValueError(f"Option(s) {sorted(foreign)} apply to encoder={' or '.join(repr(o) for o in owners)} only"
                         f" (this model's encoder: {preset.name if preset else family.name}).")
    chosen.update({k: options.pop(k) for k in list(options) if k in accepted})
    weights = chosen.pop("weights", None), chosen.pop("weights_format", None)
    if preset is not None:
        fixed = sorted(set(chosen) & set(preset.options))
        if fixed:
            raise ValueError(f"Preset '{preset.name}' fixes {fixed}; use encoder='{family.name}' for another size.")
        chosen = {**preset.options, **chosen}
        weights = (str(presets.weights_path(preset.name, weights[0])), weights[1])
    return family, chosen, weights


def expand(model: keras.Model, task: str | None = None, modality: str | None = None, name: str | None = None,
           adapters: int | None = None, modalities: Sequence[str] | None = None,
           adapter_targets: Iterable[str] | None = None, adapter_start: int = 0,
           adapter_levels: Iterable[int] | None = None, adapter_shortcuts: bool = True, path_norm: bool = False,
           **head_options: Any) -> keras.Model:
    """Add a head (and optionally a modality) to a model, sharing every existing layer.

    Args:
        model: a model built by `foundation` or `expand` (or loaded from `.keras`).
        task: the new head's task kind (`unicon_tf.tasks.TASKS`), e.g. `prognosis`.
        modality: a new input modality, e.g. `"pet"`; gets its own stem, and the new head
            reads it fused with the first modality.
        name: the new head's (and output's) name; defaults to the task, suffixed with the
            modalities when it reads several (`segmentation_ctpet`).
        adapters: rank r of zero-initialised low-rank adapters on the encoder's Conv3D
            kernels (ViT: attention projections), used only on the new head's path; None
            for none.
        modalities: the modalities the new head reads (default: the first modality, plus
            `modality` when given).
        adapter_targets: for a ViT, the projections the adapters go on, from `query`,
            `key`, `value`, `out`, `mlp` (default: the encoder's, `["query", "value"]`).
        adapter_start: the first encoder level the new path computes (0: all levels; the
            residual CNN only: a ViT computes every block at one resolution).
            With s > 0 the path reuses the base (no adapter) feature maps of its first
            modality for levels < s; the adapters act on levels >= s only, and a new
            modality is fused (its stem features average-pooled to that grid) into the
            level s - 1 feature map that enters level s. Each path costs then about the
            encoder's levels >= s instead of a whole encoder pass.
        adapter_levels: the encoder levels (all >= `adapter_start`) whose layers get the
            path's adapters and norm copies; None: every level from `adapter_start`. The
            path still computes every level from `adapter_start` (residual CNN only).
        adapter_shortcuts: whether the 1x1x1 shortcut convolutions get adapters too.
        path_norm: give the new path its own copy of the encoder's GroupNorm scale and
            shift (in the chosen levels), initialised to the shared ones and trained on
            this path only (residual CNN built by this version; works with or without
            `adapters`).
        **head_options: the head's options, e.g. `num_classes=3`; a segmentation head's
            `side_encoder=w` adds a small trainable encoder of the volumes whose features
            enter the frozen skips through zero-initialised projections.

    Returns:
        A new functional `keras.Model` with one more output (and input, for a modality).
        Existing outputs are computed by the same layers on the same tensors as before.

    Raises:
        InvalidNameError: `modality` or `name` breaks `unicon_tf.names.check_name`.
        ValueError: no or an unknown `task`, an unknown head option, a `modality` the
            model already has, `modalities` it has no stem for, a head `name` already
            used, an adapter rank < 1, `adapter_levels` outside `[adapter_start, depth - 1]`
            or without adapters or `path_norm`, or `path_norm` on an encoder without
            `PathGroupNormalization` layers.

    Example:
    >>> model = foundation((32, 32, 32))
    >>> model = expand(model, task="prognosis")
    >>> model = expand(model, modality="pet", task="segmentation", num_classes=2)
    >>> sorted(model.output)
    ['classification', 'prognosis', 'segmentation_ctpet']
    """
    parts = model_parts(model)
    if task is None:
        raise ValueError("expand needs a task: a new modality is only useful with a head that reads it.")
    family = family_of(parts["encoder"])
    head_class = task_kind(task).head_class(family.name)
    unknown = sorted(set(head_options) - set(head_class.options()))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for a {task} head; it accepts {head_class.options()}.")
    if modality is not None:
        check_name(modality, "modality")
    if modality is not None and modality in parts["stems"]:
        raise ValueError(f"Modality '{modality}' is already present (stem 'stem_{modality}').")
    primary = min(parts["stems"].values(), key=lambda stem: stem.stage).modality
    modalities = list(modalities) if modalities is not None else default_modalities(primary, modality)
    known = set(parts["stems"]) | ({modality} if modality else set())
    missing = [m for m in modalities if m not in known]
    if missing:
        raise ValueError(f"The head would read modalities {missing} that the model has no stem for.")
    name = check_name(name or default_head_name(task, modalities), "head")
    if name in model.output or any(layer.name == name for layer in model.layers):
        raise ValueError(f"A head or layer named '{name}' already exists; pass another name=.")
    if adapters is not None and int(adapters) < 1:
        raise ValueError(f"adapters must be a rank >= 1 (or None), got {adapters}.")
    if adapter_targets is not None and adapters is None:
        raise ValueError("adapter_targets chooses where adapters go: pass adapters=r (a rank) with it.")
    if (adapter_levels is not None or not adapter_shortcuts) and adapters is None and not path_norm:
        raise ValueError("adapter_levels and adapter_shortcuts choose where the path's own parameters go: pass "
                         "adapters=r (a rank) or path_norm=True with them.")
    encoder = parts["encoder"]
    adapter_start = int(adapter_start or 0)
    if adapter_levels is not None:
        if isinstance(adapter_levels, (int, str)) or not adapter_levels:
            raise ValueError(f"adapter_levels must be a non-empty list of encoder levels, got {adapter_levels!r}.")
        adapter_levels = sorted({int(level) for level in adapter_levels})
    check_path_levels(family.name, encoder.depth if family.levels else None, adapter_start, adapter_levels)

    stage = 1 + max(part.stage for group in ("stems", "fusions", "heads") for part in parts[group].values())
    input_shape = tuple(model.input[primary].shape[1:4])
    inputs, outputs = dict(model.input), dict(model.output)

    stem_outputs = {m: stem.output for m, stem in parts["stems"].items()}
    if modality is not None:
        inputs[modality] = keras.Input(input_shape + (1,), name=modality)
        stem = ModalityStem(modality, channels=encoder.input_channels, stage=stage, **encoder.stem_options())
        stem_outputs[modality] = stem(inputs[modality])

    same_path = [h for h in parts["heads"].values() if h.modalities == modalities and h.adapter is None]
    adapter = None
    if path_norm:  # checked first: it refuses encoders without per-path norms before anything is added
        encoder.add_path_norm(name, start=adapter_start, levels=adapter_levels)
        adapter = name
    if adapters is not None:
        encoder.add_adapter(name, rank=adapters, targets=adapter_targets, start=adapter_start, levels=adapter_levels,
                            shortcuts=adapter_shortcuts)
        adapter = name
    if adapter is None and same_path:
        features = same_path[0].encoder_features(same_path[0].input)
    elif adapter_start == 0:
        first = stem_outputs[modalities[0]]
        path_input = _fused(parts, modalities, stage, 0, first, stem_outputs) if len(modalities) > 1 else first
        features = encoder(path_input, adapter=adapter)
    else:
        base = _base_features(parts, encoder, stem_outputs[modalities[0]], modalities[0])
        if adapter is None and len(modalities) == 1:
            features = base
        else:
            level_input = base[adapter_start - 1]
            if len(modalities) > 1:
                level_input = _fused(parts, modalities, stage, adapter_start, level_input, stem_outputs)
            features = _features_from(encoder, base, adapter_start, level_input, adapter)

    head = _make_head(task, encoder, input_shape, name=name, modalities=modalities, stage=stage,
                      adapter_rank=adapters, adapter_start=adapter_start, adapter_levels=adapter_levels,
                      adapter_shortcuts=adapter_shortcuts if adapters is not None else True, path_norm=path_norm,
                      **head_options)
    outputs[name] = _apply_head(head, features, inputs)
    return keras.Model(inputs, outputs, name=model.name)


def describe(model: keras.Model) -> dict[str, Any]:
    """The model's registry: stems, encoder (with adapters), heads and parameter counts.

    Args:
        model: a model built by `foundation`/`expand` or loaded from `.keras`.

    Returns:
        A JSON-serialisable dict with keys `name`, `input_shape`, `stages`, `stems`,
        `fusions`, `encoder`, `heads` and `params` (total).

    Example:
    >>> info = describe(foundation((16, 16, 16), width=8, depth=2))
    >>> info["heads"]["classification"]["task"]
    'classification'
    """
    parts = model_parts(model)
    encoder = parts["encoder"]
    adapters = encoder.adapters
    base_params = sum(math.prod(w.shape) for w in encoder.base_weights())
    input_shape = tuple(next(iter(model.input.values())).shape[1:4])
    heads = {}
    for name, head in parts["heads"].items():
        entry = head.describe()
        entry["output_shape"] = list(model.output[name].shape[1:])
        heads[name] = entry
    stages = sorted({part.stage for group in ("stems", "fusions", "heads") for part in parts[group].values()})
    return {
        "name": model.name,
        "input_shape": list(input_shape),
        "stages": len(stages),
        "stems": {m: {"stage": s.stage, "kind": s.kind, "params": s.count_params()} for m, s in parts["stems"].items()},
        "fusions": {
            "+".join(mods): {"modalities": list(mods), "stage": f.stage, "level": f.level, "params": f.count_params()}
            for mods, f in parts["fusions"].items()
        },
        "encoder": {
            **family_of(encoder).summary(encoder),
            "params": base_params,
            "levels": [list(shape[1:]) for shape in encoder.feature_shapes(input_shape)],
            "adapters": adapters,
            "path_norms": encoder.path_norms,
        },
        "heads": heads,
        "params": model.count_params(),
    }


def _fused(parts, modalities, stage, level, first, stem_outputs):
    """The fused input of encoder level `level` for `modalities` (an existing fusion's
    output, or a new `ModalityFusion` of `first` and the other modalities' stem features)."""
    fusion = parts["fusions"].get(tuple(modalities))
    if fusion is not None:
        if fusion.level != level:
            raise ValueError(f"The model already fuses {modalities} at encoder level {fusion.level}; a path "
                             f"reading them must start there (adapter_start={fusion.level}), got {level}.")
        return fusion.output
    fusion = ModalityFusion(modalities, stage=stage, level=level)
    return fusion([first] + [stem_outputs[m] for m in modalities[1:]])


def _features_from(encoder, base, start, level_input, adapter=None):
    """A path's feature maps when it computes levels >= `start` from `level_input` (level
    start - 1's map, fused or not): the base maps of levels < start - 1, then `level_input`,
    then the deeper levels."""
    return list(base[: start - 1]) + [level_input] + list(encoder(level_input, adapter=adapter, start=start))


def _check_fusion_level(family, encoder, level, modalities):
    if len(modalities) < 2:
        raise ValueError(f"fusion_level={level} fuses modalities: name two or more (got {modalities}).")
    if not family.levels:
        raise ValueError(f"fusion_level={level} needs an encoder of levels (the residual CNN, the I3ResNet); the "
                         f"{family.name} encoder's feature states all come from one token grid: use 0.")
    if not 0 < level < encoder.depth:
        raise ValueError(f"fusion_level must be an encoder level in [0, {encoder.depth - 1}], got {level}.")


def _base_features(parts, encoder, stem_output, modality):
    """The base (no adapter) feature maps of a one-modality path: an existing head's input,
    or a new encoder call that later paths share."""
    for head in parts["heads"].values():
        if head.modalities == [modality] and head.adapter is None:
            return list(head.encoder_features(head.input))
    return list(encoder(stem_output))


def non_finite_weights(model: keras.Model) -> list[str]:
    """Paths of the model's weights that hold a NaN or an infinity (empty when all are finite).

    A stage whose weights are not all finite is never checkpointed, saved, blessed or
    exported: its outputs would be NaN (or silently clipped to a class by an argmax).

    Example:
    >>> model = foundation((16, 16, 16), width=8, depth=2)
    >>> non_finite_weights(model)
    []
    """
    return [w.path for w in model.weights if not np.all(np.isfinite(keras.ops.convert_to_numpy(w)))]


def _apply_head(head, features, inputs):
    """The head's output tensor; a head that reads volumes also gets its modalities' inputs."""
    if not head.reads_volumes:
        return head(features)
    return head(list(features) + [inputs[m] for m in head.modalities])


def _make_head(task, encoder, input_shape, **options):
    """A head of task kind `task` for `encoder`'s family, with the kind's option defaults."""
    kind = task_kind(task)
    head_class = kind.head_class(family_of(encoder).name)
    return head_class(**kind.head_options(options, head_class, encoder, input_shape))


def _spatial_shape(input_shape):
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be three positive spatial dims (D, H, W), got {tuple(input_shape)}.")
    return shape


def _check_feature_scales(encoder, input_shape):
    """Every feature map must be the input grid divided by one integer per level."""
    shapes = encoder.feature_shapes(input_shape)
    coarsest = shapes[-1][1:4]
    if any(d is None or d < 1 for d in coarsest):
        raise ValueError(f"The encoder gives empty features {tuple(coarsest)} for input_shape {input_shape}: "
                         f"{_stride_hint(encoder)}.")
    for finer, shape in zip([(None, *input_shape)] + shapes[:-1], shapes):
        if any(f % d for f, d in zip(finer[1:4], shape[1:4])):  # a decoder upsamples each map onto the finer one
            raise ValueError(f"input_shape {input_shape} does not fit the encoder (feature map {tuple(shape[1:4])} "
                             f"does not divide {tuple(finer[1:4])}): {_stride_hint(encoder)}.")


def _stride_hint(encoder):
    """What input shapes an encoder takes: multiples of its total stride per axis, measured on
    a probe grid (an I3ResNet's is (32, 32, 16): its stem does not stride the last axis)."""
    probe = (512, 512, 512)
    strides = [p // c for p, c in zip(probe, encoder.feature_shapes(probe)[-1][1:4])]
    return f"use multiples of {strides} voxels per axis (the encoder's total stride), at least that"
