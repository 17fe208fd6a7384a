"""The scoring engine: a model and a batch of inputs in; probabilities, embeddings and scores out.

Each batch takes two steps: :meth:`ScoringEngine.forward` runs the model on a
scorer thread (it keeps nothing between calls, so several batches may run it at
once), then :meth:`ScoringEngine.finish`, one batch at a time in stream order,
computes exactly the scores the policy asks for (``QueryPolicy.needs``);
:meth:`ScoringEngine.score` is the two in one call:

- the probability utilities of :mod:`service.scoring.uncertainty`, always:
  every prediction record carries them;
- AIFT's view utilities (:mod:`service.scoring.aift`; Zhou et al., CVPR 2017)
  when one of them is needed: the ``m`` views of each frame go through the same
  ``run`` call as the frames, N·(1+m) rows at once;
- the committee utilities (:mod:`service.scoring.committee`; BALD after Gal,
  Islam and Ghahramani, ICML 2017) when one of them is needed: MC-dropout passes
  over the model's linear head, read from its metadata, or else the outputs of
  the last models served (the release committee).
"""

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from service.config import PolicySettings
from service.model.inference import Runnable
from service.scoring.aift import AIFT_UTILITIES, ViewMaker, ViewSpec, aift_utilities
from service.scoring.committee import (
    COMMITTEE_UTILITIES,
    Head,
    ReleaseCommittee,
    committee_utilities,
    head_from_metadata,
    mc_dropout_probabilities,
)
from service.scoring.uncertainty import score_batch


class ScoringModel(Runnable, Protocol):
    """What the engine needs of a model (``service.model.inference.OnnxModel``)."""

    @property
    def metadata(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class Forward:
    """One batch's model outputs, before the scores.

    Attributes:
        probabilities: (N, C) class probabilities of the frames.
        embeddings: (N, D) their embeddings.
        views: (N, m, C) probabilities of AIFT's views, or None where they were not run.
    """

    probabilities: np.ndarray
    embeddings: np.ndarray
    views: np.ndarray | None


@dataclass(slots=True)
class Scored:
    """The engine's answer for one batch.

    Attributes:
        probabilities: (N, C) class probabilities.
        embeddings: (N, D) embeddings.
        scores: utility name to an (N,) array in [0, 1].
    """

    probabilities: np.ndarray
    embeddings: np.ndarray
    scores: dict[str, np.ndarray]


class ScoringEngine:
    """Owns what scoring keeps between batches: AIFT's views, the committee, the MC-dropout RNG.

    Args:
        views: AIFT's augmented views.
        aift_alpha: share of views AIFT's majority selection keeps.
        aift_majority: apply majority selection.
        committee: members of ``vote_entropy`` and ``average_kl``: MC-dropout passes over
            the head, or the last models served (BALD always uses MC dropout when it can).
        committee_size: models in the release committee.
        mc_passes: MC-dropout passes T.
        seed: seeds the dropout masks.
    """

    def __init__(
        self,
        *,
        views: ViewSpec | None = None,
        aift_alpha: float = 0.25,
        aift_majority: bool = True,
        committee: Literal["mc_dropout", "releases"] = "mc_dropout",
        committee_size: int = 3,
        mc_passes: int = 16,
        seed: int | None = None,
    ) -> None:
        self._views = ViewMaker(views)
        self._aift_alpha, self._aift_majority = aift_alpha, aift_majority
        self._committee_kind = committee
        self.committee = ReleaseCommittee(committee_size)
        self._mc_passes = mc_passes
        self._mc_rng = np.random.default_rng(seed)
        self._head_model: object = None
        self._head: Head | None = None

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> "ScoringEngine":
        """The engine ``WINNOW_POLICY_*`` describes (AIFT views, committee, MC passes)."""
        return cls(
            views=ViewSpec(count=settings.aift_views, flips=settings.aift_flips),
            aift_alpha=settings.aift_alpha,
            aift_majority=settings.aift_majority,
            committee=settings.committee,
            committee_size=settings.committee_size,
            mc_passes=settings.mc_passes,
            seed=settings.seed,
        )

    def on_model(self, model: ScoringModel) -> None:
        """A model the scorer now serves: it joins the release committee.

        The models before it stay in the committee only while it is the committee that
        scores (``releases``, or a model without a head for MC dropout): each one kept
        holds its ONNX Runtime session, whose memory arena has grown to the largest batch
        it ran (the soak's 16 x 16 model: about 1.4 to 2.4 MB after runs of 32 frames, 3 to
        6 MB after 64). With MC dropout over the serving model's head they served no one.
        """
        if self._committee_kind == "mc_dropout" and self._head_of(model) is not None:
            self.committee.clear()
        self.committee.add(model)

    def score(self, model: ScoringModel, inputs: np.ndarray, needs: Collection[str]) -> Scored:
        """Runs ``model`` on ``inputs`` and computes the scores in ``needs`` (and the
        probability utilities, which are always computed): :meth:`forward`, then
        :meth:`finish`.

        Args:
            model: the model of the batch.
            inputs: (N, C, H, W) model input.
            needs: utility names the policy compares (``QueryPolicy.needs``).
        """
        return self.finish(model, inputs, self.forward(model, inputs, needs), needs)

    def forward(self, model: ScoringModel, inputs: np.ndarray, needs: Collection[str]) -> Forward:
        """The model's outputs on ``inputs``, with AIFT's views when ``needs`` has one of
        its utilities (N·(1+m) rows in one run). Safe on several threads at once: it
        changes nothing of the engine's."""
        if not any(name in AIFT_UTILITIES for name in needs):
            probabilities, embeddings = model.run(inputs)
            return Forward(probabilities, embeddings, None)
        n = len(inputs)
        rows = np.concatenate([inputs, self._views(inputs)])
        all_probabilities, all_embeddings = model.run(rows)
        views = all_probabilities[n:].reshape(n, self._views.count, -1)
        return Forward(all_probabilities[:n], all_embeddings[:n], views)

    def finish(
        self, model: ScoringModel, inputs: np.ndarray, forward: Forward, needs: Collection[str]
    ) -> Scored:
        """The scores of one batch from its :meth:`forward`. Batches must come in stream
        order, one at a time: the MC-dropout masks are drawn from the engine's generator.

        A score in ``needs`` that ``forward`` was not run for (AIFT's, when the views were
        not run) is missing from the answer; the caller scores the batch again.
        """
        scores = score_batch(forward.probabilities)
        if forward.views is not None:
            scores.update(aift_utilities(forward.views, self._aift_alpha, self._aift_majority))
        if any(name in COMMITTEE_UTILITIES for name in needs):
            samples = self._committee_samples(
                model, inputs, forward.probabilities, forward.embeddings, needs
            )
            scores.update(committee_utilities(samples))
        return Scored(forward.probabilities, forward.embeddings, scores)

    def _committee_samples(
        self,
        model: ScoringModel,
        inputs: np.ndarray,
        probabilities: np.ndarray,
        embeddings: np.ndarray,
        needs: Collection[str],
    ) -> np.ndarray:
        """(T, N, C): MC-dropout passes over the head, or the last models' outputs."""
        wants_dropout = self._committee_kind == "mc_dropout" or "bald" in needs
        head = self._head_of(model) if wants_dropout else None
        if head is None:
            return self.committee.samples(inputs, probabilities)
        weight, bias, rate = head
        return mc_dropout_probabilities(
            embeddings.astype(np.float64), weight, bias, rate, self._mc_passes, self._mc_rng
        )

    def _head_of(self, model: ScoringModel) -> Head | None:
        """The model's head, parsed once per model."""
        if model is not self._head_model:
            self._head_model, self._head = model, head_from_metadata(model.metadata)
        return self._head
