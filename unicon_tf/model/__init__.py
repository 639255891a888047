"""The UNICON model: modality stems, a shared 3D encoder (residual CNN or ViT) with adapters, and task heads."""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.model.adapters import (AdaptableConv3D, AdaptableDense, LowRankAdapters, PathGroupNormalization,  # noqa: E402
                                      PathParameters, adapter_scope)
from unicon_tf.model.encoder import SharedEncoder, residual_backbone  # noqa: E402
from unicon_tf.model.foundation import describe, expand, foundation, model_parts, non_finite_weights  # noqa: E402
from unicon_tf.model.group_norm import GroupNormalization  # noqa: E402
from unicon_tf.model.heads import ClassificationHead, Head, PrognosisHead, SegmentationHead  # noqa: E402
from unicon_tf.model.pretrained import PretrainedWeightsError, load_pretrained, read_state_dict  # noqa: E402
from unicon_tf.model.stems import ModalityFusion, ModalityStem  # noqa: E402
from unicon_tf.model.unetr import UNETRHead  # noqa: E402
from unicon_tf.model.vit import PositionEmbedding, SelfAttention, vit_backbone  # noqa: E402

__all__ = [
    "AdaptableConv3D",
    "AdaptableDense",
    "GroupNormalization",
    "LowRankAdapters",
    "PathGroupNormalization",
    "PathParameters",
    "PositionEmbedding",
    "PretrainedWeightsError",
    "SelfAttention",
    "UNETRHead",
    "load_pretrained",
    "read_state_dict",
    "vit_backbone",
    "ClassificationHead",
    "Head",
    "ModalityFusion",
    "ModalityStem",
    "PrognosisHead",
    "SegmentationHead",
    "SharedEncoder",
    "adapter_scope",
    "describe",
    "expand",
    "foundation",
    "model_parts",
    "non_finite_weights",
    "residual_backbone",
]
