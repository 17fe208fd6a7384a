"""How competent the model is, measured on the answers to its own requests: the blend weight.

Coverage wins with few labels and uncertainty with many (Hacohen et al., ICML
2022); DCoM (Mishal and Weinshall, "DCoM: active learning for all learners",
2024) moves from one to the other as the model's measured competence grows, and
uncertainty herding (Bae et al., ICLR 2025) does so through the uncertainty
weights. Here the measure is prequential: for the last ``window`` answered
requests, was the model's prediction at request time right? The weight of
uncertainty against coverage is that accuracy above the majority-class rate of
the same answers (a model that always says "normal" on a screening stream is not
competent),

    λ = clip((acc - p_maj) / (1 - p_maj), 0, 1),

0 until ``min_answers`` answers have come back. O(1) per answer, O(window) memory.
"""

from collections import Counter, deque


class Competence:
    """The moving, chance-corrected accuracy of the model on the frames it asked about.

    Args:
        window: answers remembered.
        min_answers: answers needed before the accuracy counts.
    """

    def __init__(self, window: int = 50, min_answers: int = 10) -> None:
        if window < 1 or min_answers < 1:
            raise ValueError("the competence window and its minimum need at least one answer")
        self.min_answers = int(min_answers)
        self._answers: deque[tuple[str, bool]] = deque(maxlen=int(window))

    def answered(self, predicted: str, label: str) -> None:
        """One labeled answer: the true ``label`` and what the model had predicted."""
        self._answers.append((label, predicted == label))

    @property
    def count(self) -> int:
        return len(self._answers)

    @property
    def accuracy(self) -> float | None:
        """The plain accuracy on the remembered answers, None with none."""
        if not self._answers:
            return None
        return sum(correct for _, correct in self._answers) / len(self._answers)

    @property
    def value(self) -> float | None:
        """``(acc - p_maj) / (1 - p_maj)`` in [0, 1], None below ``min_answers``."""
        accuracy = self.accuracy
        if accuracy is None or len(self._answers) < self.min_answers:
            return None
        majority = Counter(label for label, _ in self._answers).most_common(1)[0][1]
        share = majority / len(self._answers)
        if share >= 1.0:
            return 1.0 if accuracy >= 1.0 else 0.0
        return min(1.0, max(0.0, (accuracy - share) / (1.0 - share)))

    @property
    def blend(self) -> float:
        """The weight of uncertainty against coverage: :attr:`value`, or 0 without it."""
        value = self.value
        return 0.0 if value is None else value
