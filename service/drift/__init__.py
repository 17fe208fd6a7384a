"""Online drift detection in the scorer: detectors, their calibration, and the monitor."""

from service.drift.calibrate import Simulation, calibrate, threshold_for_ert
from service.drift.detectors import (
    ClassMixDrift,
    Detector,
    EmbeddingMMD,
    EntropyCusum,
    Rows,
    build_detectors,
)

__all__ = [
    "ClassMixDrift",
    "Detector",
    "EmbeddingMMD",
    "EntropyCusum",
    "Rows",
    "Simulation",
    "build_detectors",
    "calibrate",
    "threshold_for_ert",
]
