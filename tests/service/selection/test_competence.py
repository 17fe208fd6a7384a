"""The blend weight: the model's accuracy on its own requests above the majority-class rate."""

import pytest

from service.selection.competence import Competence


def test_nothing_counts_before_enough_answers() -> None:
    competence = Competence(window=50, min_answers=10)
    for _ in range(9):
        competence.answered("cat", "cat")
    assert competence.value is None and competence.blend == 0.0
    competence.answered("cat", "cat")
    assert competence.accuracy == 1.0 and competence.blend == 1.0


def test_always_predicting_the_common_class_is_not_competence() -> None:
    competence = Competence(window=40, min_answers=10)
    for i in range(40):  # three normal frames in four, the model says normal every time
        competence.answered("normal", "pneumonia" if i % 4 == 0 else "normal")
    assert competence.accuracy == pytest.approx(0.75)
    assert competence.blend == 0.0


def test_the_weight_grows_with_accuracy_over_the_recent_window() -> None:
    competence = Competence(window=20, min_answers=10)
    for i in range(20):  # ten classes, half of them right: (0.5 - 0.1) / (1 - 0.1)
        label = str(i % 10)
        competence.answered(label if i % 2 else "wrong", label)
    assert competence.blend == pytest.approx(0.4 / 0.9)
    for i in range(20):  # the window moves on: now all right
        competence.answered(str(i % 10), str(i % 10))
    assert competence.blend == 1.0
