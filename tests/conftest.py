"""Shared fixtures: small volumes (16^3) and small encoders keep the suite fast on CPU."""

import numpy as np
import pytest

import unicon_tf

SHAPE = (16, 16, 16)


@pytest.fixture
def volumes():
    """A fixed batch of two CT and two PET volumes, (2, 16, 16, 16, 1) float32 each."""
    rng = np.random.default_rng(0)
    return {m: rng.normal(size=(2,) + SHAPE + (1,)).astype("float32") for m in ("ct", "pet")}


@pytest.fixture
def small_foundation():
    """A stage-0 CT classification model with a 3-level, width-8 encoder."""
    return unicon_tf.foundation(SHAPE, modality="ct", task="classification", num_classes=2, width=8, depth=3)


def run(model, volumes):
    """Outputs of `model` on the modalities it takes, as NumPy arrays."""
    outputs = model({m: volumes[m] for m in model.input}, training=False)
    return {name: np.asarray(value) for name, value in outputs.items()}
