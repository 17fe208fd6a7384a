"""Fixtures of the drift tests: a reference built from synthetic model outputs."""

import numpy as np
import pytest

from schemas.drift import DriftReference
from tests.service.drift.synthetic import outputs


@pytest.fixture(scope="session")
def reference() -> DriftReference:
    embeddings, probabilities = outputs(3000, np.random.default_rng(0))
    return DriftReference.build(embeddings, probabilities, seed=0)
