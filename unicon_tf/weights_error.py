"""The error every pretrained-weights reader raises (kept apart so readers share it without importing Keras)."""


class PretrainedWeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the
    file and every bad tensor or record."""
