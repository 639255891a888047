"""Serving: SavedModel versions for TensorFlow Serving, and NIfTI inference against them."""

from unicon_tf.serving.export import (
    ExportError,
    check_parity,
    export_model,
    export_stage,
    next_version,
    push_stage,
    signatures,
    update_models_config,
    write_warmup,
)
from unicon_tf.serving.inference import check_request, gaussian_weights, predict_nifti, sliding_window

__all__ = [
    "ExportError", "check_parity", "check_request", "export_model", "export_stage", "gaussian_weights",
    "next_version", "predict_nifti", "push_stage", "signatures", "sliding_window", "update_models_config", "write_warmup",
]
