"""BALD, vote entropy and average KL against hand-computed values; MC dropout over the head."""

import math

import numpy as np
import pytest

from service.scoring.committee import (
    ReleaseCommittee,
    average_kl,
    bald,
    mc_dropout_probabilities,
    vote_entropy,
)

LN2 = math.log(2)


def test_total_disagreement_is_one_and_agreement_zero() -> None:
    split = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # T=2, N=1, C=2
    same = np.array([[[0.7, 0.3]], [[0.7, 0.3]]])
    for utility in (bald, vote_entropy, average_kl):
        assert utility(split)[0] == pytest.approx(1.0)
        assert utility(same)[0] == pytest.approx(0.0, abs=1e-12)


def test_bald_by_hand() -> None:
    samples = np.array([[[0.8, 0.2]], [[0.4, 0.6]]])
    # p̄ = (0.6, 0.4); H(p̄) = 0.673012; H(p1) = 0.500402; H(p2) = 0.673012
    mutual = 0.673012 - (0.500402 + 0.673012) / 2
    assert bald(samples)[0] == pytest.approx(mutual / LN2, abs=1e-5)
    # with equal weights the mean KL to the consensus is the same quantity
    assert average_kl(samples)[0] == pytest.approx(mutual / LN2, abs=1e-5)


def test_vote_entropy_by_hand() -> None:
    # three members, three classes: votes 0, 0, 2 → V/T = (2/3, 0, 1/3)
    samples = np.array([[[0.5, 0.2, 0.3]], [[0.6, 0.3, 0.1]], [[0.2, 0.3, 0.5]]])
    expected = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(3)
    assert vote_entropy(samples)[0] == pytest.approx(expected)


def test_average_kl_by_hand_three_classes() -> None:
    samples = np.array([[[0.5, 0.5, 0.0]], [[0.0, 0.5, 0.5]]])
    # p̄ = (0.25, 0.5, 0.25); KL(p1||p̄) = 0.5 ln 2 + 0.5 ln 1 = 0.5 ln 2, the same for p2
    assert average_kl(samples)[0] == pytest.approx(0.5 * LN2 / LN2)


def test_mc_dropout_on_the_head() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(5, 8))
    weight, bias = rng.normal(size=(3, 8)), np.zeros(3)
    samples = mc_dropout_probabilities(embeddings, weight, bias, 0.5, 32, rng)
    assert samples.shape == (32, 5, 3)
    np.testing.assert_allclose(samples.sum(axis=2), 1.0)
    assert bald(samples).min() > 0  # dropout makes the passes disagree
    none = mc_dropout_probabilities(embeddings, weight, bias, 1e-9, 4, rng)
    assert bald(none).max() == pytest.approx(0.0, abs=1e-9)


class _Fixed:
    def __init__(self, p: np.ndarray) -> None:
        self.p = p

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.repeat(self.p[None], len(inputs), 0), np.zeros((len(inputs), 2))


def test_release_committee_runs_the_earlier_models() -> None:
    committee = ReleaseCommittee(k=3)
    for p in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.9, 0.1]):
        committee.add(_Fixed(np.array(p)))
    current = np.array([[0.9, 0.1]])
    samples = committee.samples(np.zeros((1, 1, 2, 2)), current)
    # the serving model plus the two before it; the oldest dropped out
    np.testing.assert_allclose(samples[:, 0], [[0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
