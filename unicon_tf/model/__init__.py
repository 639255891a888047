"""The UNICON model: modality stems, a shared 3D encoder with adapters, and task heads."""

from unicon_tf.model.adapters import AdaptableConv3D, adapter_scope
from unicon_tf.model.encoder import SharedEncoder, residual_backbone
from unicon_tf.model.foundation import describe, expand, foundation, model_parts, non_finite_weights
from unicon_tf.model.heads import HEADS, ClassificationHead, Head, PrognosisHead, SegmentationHead
from unicon_tf.model.stems import ModalityFusion, ModalityStem

__all__ = [
    "AdaptableConv3D",
    "ClassificationHead",
    "HEADS",
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
