"""Utility scores against hand-computed values."""

import numpy as np
import pytest

from service.scoring.uncertainty import UTILITIES, entropy, least_confidence, margin, score_batch

# p = [0.7, 0.2, 0.1], C = 3:
#   least confidence: (1 - 0.7) / (1 - 1/3) = 0.3 / 0.6667 = 0.45
#   margin:           1 - (0.7 - 0.2) = 0.5
#   entropy:          -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) / ln 3
#                     = (0.249672 + 0.321888 + 0.230259) / 1.098612 = 0.801819 / 1.098612 = 0.729847
# p = [0.5, 0.5, 0, 0], C = 4 (zeros must not give NaN):
#   least confidence: 0.5 / 0.75 = 0.666667
#   margin:           1 - 0 = 1
#   entropy:          ln 2 / ln 4 = 0.5
P = np.array([[0.7, 0.2, 0.1]])
Q = np.array([[0.5, 0.5, 0.0, 0.0]])


def test_least_confidence_by_hand() -> None:
    assert least_confidence(P) == pytest.approx([0.45])
    assert least_confidence(Q) == pytest.approx([0.666667], abs=1e-6)


def test_margin_by_hand() -> None:
    assert margin(P) == pytest.approx([0.5])
    assert margin(Q) == pytest.approx([1.0])
    # the top two are found wherever they sit in the row
    assert margin(np.array([[0.1, 0.2, 0.7]])) == pytest.approx([0.5])


def test_entropy_by_hand_and_safe_for_zeros() -> None:
    assert entropy(P) == pytest.approx([0.729847], abs=1e-6)
    assert entropy(Q) == pytest.approx([0.5])
    assert not np.isnan(entropy(np.array([[1.0, 0.0, 0.0]]))).any()


@pytest.mark.parametrize("name", sorted(UTILITIES))
def test_certain_is_zero_uniform_is_one(name: str) -> None:
    utility = UTILITIES[name]
    one_hot = np.eye(5)
    uniform = np.full((2, 5), 0.2)
    assert utility(one_hot) == pytest.approx(np.zeros(5))
    assert utility(uniform) == pytest.approx(np.ones(2))


@pytest.mark.parametrize("name", sorted(UTILITIES))
def test_values_stay_in_unit_interval_despite_float_error(name: str) -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(10, 0.3), size=1000).astype(np.float32)
    p[:10] = np.float32(0.1) * np.float32(1.0000001)  # uniform rows that sum a hair over 1
    p[10, :] = 0.0
    p[10, 3] = 1.0000001  # a softmax that overshoots
    out = UTILITIES[name](p)
    assert out.dtype == np.float64 and out.shape == (1000,)
    assert (out >= 0).all() and (out <= 1).all()


def test_score_batch_gives_all_three_in_order_of_rows() -> None:
    p = np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    scores = score_batch(p)
    assert set(scores) == {"least_confidence", "margin", "entropy"}
    assert scores["least_confidence"] == pytest.approx([0.45, 0.0])
    assert scores["margin"] == pytest.approx([0.5, 0.0])
    assert scores["entropy"] == pytest.approx([0.729847, 0.0], abs=1e-6)


def test_more_uncertain_rows_score_higher() -> None:
    p = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    for name, values in score_batch(p).items():
        assert values[0] < values[1] < values[2], name


def test_rejects_a_flat_vector() -> None:
    with pytest.raises(ValueError, match="shape"):
        score_batch(np.array([0.7, 0.2, 0.1]))
