"""Load published 3D ViT weights (MONAI's `ViT`, the encoder of MONAI's `UNETR`).

A state dict is read from `.safetensors` (with the optional `safetensors` package, its
NumPy API: no torch needed) or from a NumPy `.npz` of the same keys, then mapped onto
the `vit` encoder and the model's first patch-embedding stem:

| MONAI key                                        | unicon_tf variable                        |
|--------------------------------------------------|-------------------------------------------|
| `patch_embedding.patch_embeddings.weight/bias`   | first stem `stem_<modality>/conv` (the     |
|                                                  | kernel transposed from (C, 1, p, p, p))    |
| `patch_embedding.position_embeddings` (1, n, C)  | encoder `position_embedding` (n, C)        |
| `blocks.N.norm1`, `blocks.N.norm2`, `norm`       | `blockN_norm1`, `blockN_norm2`, `norm`     |
| `blocks.N.attn.qkv` (3C, C), split q | k | v     | `blockN_query`, `blockN_key`,             |
| (or `attn.to_q`, `to_k`, `to_v`)                 | `blockN_value` (kernels transposed)        |
| `blocks.N.attn.out_proj`                         | `blockN_out`                              |
| `blocks.N.mlp.linear1`, `blocks.N.mlp.linear2`   | `blockN_mlp1`, `blockN_mlp2`              |

A UNETR state dict (keys under `vit.`) is read through its `vit.` part; its decoder's
keys are reported as ignored. `blocks.N.norm_cross_attn.*` (a LayerNorm MONAI creates in
every block but uses only with cross-attention) is skipped. Nothing is assigned unless
every tensor fits.
"""

import pathlib
from typing import TYPE_CHECKING

import numpy as np

from unicon_tf.model.encoder import SharedEncoder
from unicon_tf.model.families import family_of
from unicon_tf.model.parts import model_parts
from unicon_tf.weights_error import PretrainedWeightsError

if TYPE_CHECKING:
    import keras

FORMATS = ("safetensors", "npz")


def read_state_dict(path: pathlib.Path | str, format: str | None = None) -> dict[str, np.ndarray]:
    """`{key: float32 array}` from a `.safetensors` or `.npz` state dict.

    Args:
        path: the file.
        format: `safetensors` or `npz`; default from the file's suffix.

    Raises:
        PretrainedWeightsError: a missing, unreadable or truncated file, an unknown format,
            `safetensors` not installed, or a tensor holding NaN or Inf (each named).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: weights file does not exist.")
    format = format or path.suffix.lstrip(".").lower()
    if format not in FORMATS:
        raise PretrainedWeightsError(f"{path}: unknown weights format '{format}': expected one of {list(FORMATS)} "
                                     "(convert a PyTorch checkpoint with safetensors.torch.save_file).")
    if format == "safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise PretrainedWeightsError(f"{path}: reading .safetensors needs the 'safetensors' package "
                                         "(pip install safetensors), or give the state dict as .npz.") from error
    try:
        if format == "npz":
            with np.load(path) as archive:
                state = {key: np.asarray(archive[key], np.float32) for key in archive.files}
        else:
            state = {key: np.asarray(value, np.float32) for key, value in load_file(str(path)).items()}
    except Exception as error:  # numpy and safetensors raise many types for a corrupt or truncated file
        raise PretrainedWeightsError(f"{path}: unreadable or truncated {format} state dict "
                                     f"({type(error).__name__}: {error}).") from error
    bad = sorted(key for key, value in state.items() if not np.all(np.isfinite(value)))
    if bad:
        raise PretrainedWeightsError(f"{path}: {len(bad)} tensor(s) hold NaN or Inf: {', '.join(bad[:5])}"
                                     f"{' ...' if len(bad) > 5 else ''}.")
    return state


def load_pretrained(model_or_encoder: "keras.Model | SharedEncoder", path: pathlib.Path | str,
                    format: str | None = None, strict: bool = True) -> dict[str, list[str]]:
    """Load a MONAI `ViT` state dict into a `vit` model (stem + encoder) or its encoder.

    Args:
        model_or_encoder: a unicon model built with `encoder="vit"` (its first modality's
            stem receives the patch embedding), or its `SharedEncoder` alone (the patch
            embedding is then left out and listed under `skipped`).
        path: `.safetensors` or `.npz` state dict with MONAI's key names.
        format: `safetensors` or `npz`; default from the suffix.
        strict: refuse keys the model has no place for (otherwise they are listed under
            `ignored`). Missing and wrongly shaped tensors are always refused.

    Returns:
        `{"loaded": [keys], "ignored": [keys], "skipped": [keys]}`.

    Raises:
        PretrainedWeightsError: naming each missing, unexpected and wrongly shaped tensor;
            nothing is assigned then.

    Example:
    >>> model = unicon_tf.foundation((96, 96, 96), encoder="vit", patch_size=16)  # doctest: +SKIP
    >>> load_pretrained(model, "unetr_vit.safetensors")["loaded"][:2]  # doctest: +SKIP
    ['blocks.0.attn.out_proj.bias', 'blocks.0.attn.out_proj.weight']
    """
    encoder, stem = _encoder_and_stem(model_or_encoder)
    state = read_state_dict(path, format)
    prefix = "vit." if not any(k.startswith("patch_embedding.") for k in state) and \
        any(k.startswith("vit.") for k in state) else ""
    ignored = sorted(k for k in state if not k.startswith(prefix))
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    targets, skipped, checks = _targets(encoder, stem, state)

    unexpected = check_state(path, targets, state, skipped, strict=strict, what="the ViT", checks=checks)
    return {"loaded": sorted(targets), "ignored": ignored + ([] if strict else sorted(unexpected)),
            "skipped": sorted(k for k in skipped if k in state)}


MAX_LISTED_PROBLEMS = 20
"""A state dict that does not fit lists this many of its problems (all are counted): a
checkpoint of another network would list hundreds."""


def check_state(path: pathlib.Path | str, targets: dict, state: dict, skipped: set = frozenset(), strict: bool = True,
                what: str = "the model", checks: dict | None = None) -> list[str]:
    """Check a state dict against a model's targets, then assign all of it or nothing.

    Args:
        path: the file the state came from (named in the error).
        targets: `{key: (expected shape, assign(array))}`.
        state: `{key: array}` read from the file.
        skipped: keys the file may hold that have no place in the model (not assigned).
        strict: refuse keys that are neither targets nor skipped.
        what: the model's description for the error message.
        checks: `{key: check(array) -> error message or None}`, run on present keys.

    Returns:
        The keys of `state` that were not assigned (unexpected, when not strict).

    Raises:
        PretrainedWeightsError: naming the file and each missing, unexpected, wrongly
            shaped or non-finite tensor; nothing is assigned then.
    """
    missing = [k for k in targets if k not in state]
    unexpected = [k for k in state if k not in targets and k not in skipped]
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {targets[k][0]}" for k in targets
             if k in state and tuple(state[k].shape) != targets[k][0]]
    problems = [f"missing: {k}" for k in missing] + [f"wrong shape: {w}" for w in wrong]
    problems += [f"unexpected: {k}" for k in unexpected] if strict else []
    problems += [f"{k}: {check(state[k])}" for k, check in (checks or {}).items()
                 if k in state and check(state[k])]
    problems += [f"not finite (NaN or Inf): {k}" for k in targets
                 if k in state and state[k].dtype.kind == "f" and not np.all(np.isfinite(state[k]))]
    if problems:
        counts = {"missing": len(missing), "wrong shape": len(wrong), "unexpected": len(unexpected) if strict else 0}
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise PretrainedWeightsError(
            f"{path}: the state dict does not fit {what} ({len(problems)} problem(s){': ' + summary if summary else ''})"
            f":\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
    for key, (_, assign) in targets.items():
        assign(np.asarray(state[key], np.float32))
    return sorted(unexpected)


def _encoder_and_stem(model_or_encoder):
    if isinstance(model_or_encoder, SharedEncoder):
        encoder, stem = model_or_encoder, None
    else:
        parts = model_parts(model_or_encoder)
        encoder = parts["encoder"]
        stem = min(parts["stems"].values(), key=lambda s: s.stage)
    if family_of(encoder).name != "vit":
        raise PretrainedWeightsError("load_pretrained reads ViT weights; this model's encoder is not a 'vit' one.")
    if stem is not None and stem.kind != "patch":
        raise PretrainedWeightsError(f"Stem '{stem.name}' is not a patch embedding (kind '{stem.kind}').")
    return encoder, stem


def _targets(encoder, stem, state):
    """`{key: (shape in the file, assign(array))}`, the keys skipped, `{key: check(array) -> error}`."""
    layers = {layer.name: layer for layer in encoder.backbone.layers}
    targets, checks = {}, {}

    def add(key, shape, variables, convert=lambda a: a):
        def assign(array):
            values = convert(array)
            for variable, value in zip(variables, values if len(variables) > 1 else [values]):
                variable.assign(value.astype(np.float32))

        targets[key] = (tuple(int(d) for d in shape), assign)

    def dense(key, layer):
        kernel = layer._kernel
        add(f"{key}.weight", kernel.shape[::-1], [kernel], np.transpose)
        if layer.bias is not None:
            add(f"{key}.bias", layer.bias.shape, [layer.bias])

    def norm(key, layer):
        add(f"{key}.weight", layer.gamma.shape, [layer.gamma])
        add(f"{key}.bias", layer.beta.shape, [layer.beta])

    patch_keys = ["patch_embedding.patch_embeddings.weight", "patch_embedding.patch_embeddings.bias"]
    skipped = set()
    if stem is None:
        skipped.update(patch_keys)
    else:
        kernel = stem.conv._kernel
        add(patch_keys[0], (kernel.shape[4], kernel.shape[3], *kernel.shape[:3]), [kernel],
            lambda a: np.transpose(a, (2, 3, 4, 1, 0)))
        add(patch_keys[1], stem.conv.bias.shape, [stem.conv.bias])
    position = layers["position_embedding"]
    channels = encoder.input_channels
    if position.kind == "learned":
        add("patch_embedding.position_embeddings", (1,) + tuple(position.embedding.shape), [position.embedding],
            lambda a: a[0])
    else:  # a fixed table: the file's must be the one this layer computes
        expected = np.asarray(position.table(position.grid, channels)).reshape(1, -1, channels)
        targets["patch_embedding.position_embeddings"] = (expected.shape, lambda a: None)
        checks["patch_embedding.position_embeddings"] = lambda a: None if np.allclose(a, expected, atol=1e-5) else \
            "the file's sin-cos table differs from the encoder's (another temperature or grid?)"
    num_layers = sum(1 for name in layers if name.startswith("block") and name.endswith("_attention"))
    combined = any(k.endswith("attn.qkv.weight") for k in state)
    for i in range(num_layers):
        block = f"blocks.{i}"
        # MONAI creates this LayerNorm in every block but uses it only with cross-attention.
        skipped.update({f"{block}.norm_cross_attn.weight", f"{block}.norm_cross_attn.bias"})
        norm(f"{block}.norm1", layers[f"block{i}_norm1"])
        norm(f"{block}.norm2", layers[f"block{i}_norm2"])
        q, k, v = (layers[f"block{i}_{role}"] for role in ("query", "key", "value"))
        if combined:
            add(f"{block}.attn.qkv.weight", (3 * channels, channels), [q._kernel, k._kernel, v._kernel],
                lambda a: [part.T for part in np.split(a, 3, axis=0)])
            if q.bias is not None:
                add(f"{block}.attn.qkv.bias", (3 * channels,), [q.bias, k.bias, v.bias],
                    lambda a: np.split(a, 3))
        else:
            for name, layer in (("to_q", q), ("to_k", k), ("to_v", v)):
                dense(f"{block}.attn.{name}", layer)
        dense(f"{block}.attn.out_proj", layers[f"block{i}_out"])
        dense(f"{block}.mlp.linear1", layers[f"block{i}_mlp1"])
        dense(f"{block}.mlp.linear2", layers[f"block{i}_mlp2"])
    norm("norm", layers["norm"])
    return targets, skipped, checks
