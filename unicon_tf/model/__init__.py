"""The UNICON model: modality stems, a shared 3D encoder (residual CNN or ViT) with adapters, and task heads."""

from unicon_tf.model.adapters import AdaptableConv3D, AdaptableDense, LowRankAdapters, adapter_scope
from unicon_tf.model.encoder import SharedEncoder, residual_backbone
from unicon_tf.model.foundation import describe, expand, foundation, model_parts
from unicon_tf.model.heads import HEADS, ClassificationHead, Head, PrognosisHead, SegmentationHead
from unicon_tf.model.pretrained import PretrainedWeightsError, load_pretrained, read_state_dict
from unicon_tf.model.stems import ModalityFusion, ModalityStem
from unicon_tf.model.unetr import UNETRHead
from unicon_tf.model.vit import PositionEmbedding, SelfAttention, vit_backbone

__all__ = [
    "AdaptableConv3D",
    "AdaptableDense",
    "LowRankAdapters",
    "PositionEmbedding",
    "PretrainedWeightsError",
    "SelfAttention",
    "UNETRHead",
    "load_pretrained",
    "read_state_dict",
    "vit_backbone",
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
    "residual_backbone",
]
