"""Serving: SavedModel versions for TensorFlow Serving, and NIfTI inference against them."""

from unicon_tf._quiet import import_tensorflow_quietly

import_tensorflow_quietly()  # before any module of this package imports TensorFlow or Keras

from unicon_tf.serving.export import (  # noqa: E402
    HIGHEST,
    ExportError,
    ServingWarning,
    check_exportable,
    check_parity,
    export_model,
    export_stage,
    highest_version,
    next_version,
    push_stage,
    remove_stale_exports,
    signatures,
    update_models_config,
    write_warmup,
)
from unicon_tf.serving.inference import check_request, gaussian_weights, predict_nifti, sliding_window  # noqa: E402

__all__ = [
    "HIGHEST", "ExportError", "ServingWarning", "check_exportable", "check_parity", "check_request", "export_model", "export_stage",
    "gaussian_weights", "highest_version", "next_version", "predict_nifti", "push_stage", "remove_stale_exports", "signatures",
    "sliding_window", "update_models_config", "write_warmup",
]
