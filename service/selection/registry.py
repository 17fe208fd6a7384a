"""Every query strategy by its ``PolicyName`` (``tests/service/selection/test_names.py``
checks that the two agree)."""

from typing import get_args

from schemas.api import ColdStartName
from service.selection.base import BaseStrategy, EmbeddingStrategy
from service.selection.herding import KernelHerding
from service.selection.probcover import StreamProbCover
from service.selection.strategies import THRESHOLD_STRATEGIES
from service.selection.typiclust import StreamTypiClust
from service.selection.vessal import VeSSAL

STRATEGIES: dict[str, type[BaseStrategy]] = {
    **THRESHOLD_STRATEGIES,
    **{cls.name: cls for cls in (KernelHerding, StreamProbCover, StreamTypiClust, VeSSAL)},
}
"""Threshold strategies (``service.selection.strategies``) and embedding strategies."""

COLD_STARTS: tuple[ColdStartName, ...] = get_args(ColdStartName)
"""What may run while the model has learned from no label: a coverage strategy, ``random``
or ``none`` (the configured strategy from the first frame)."""


def is_embedding_strategy(name: str) -> bool:
    """Whether the strategy called ``name`` decides from embeddings (and keeps a memory)."""
    cls = STRATEGIES.get(name)
    return cls is not None and issubclass(cls, EmbeddingStrategy)
