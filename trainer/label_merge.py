"""How several answers for one frame become one label, and the ``frames`` rows that keep it.

``"last"``: the most recently received answer across annotators.
``"majority"``: the most common answer, ties going to the most recent.
Either way an ``unlabelable`` answer that wins leaves the frame without a
label, and an answer outside its request's classes never counts.
"""

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import groupby
from operator import itemgetter
from typing import Literal

MergePolicy = Literal["last", "majority"]

ANSWERS = """
SELECT l.frame_id, l.seq, l.label, l.status, r.classes, t.label
FROM labels l JOIN requests r USING (frame_id) LEFT JOIN trained t USING (frame_id)
"""
"""Every answer with its request's classes and its frame's trained label, for :func:`merged`."""


def merged(answers: Iterable[tuple], policy: MergePolicy) -> Iterator[tuple]:
    """``frames`` rows from :data:`ANSWERS` rows sorted by frame id and seq."""
    for frame_id, group in groupby(answers, key=itemgetter(0)):
        rows = list(group)
        classes = set(json.loads(rows[0][4]))
        answered = [(seq, label, status) for _, seq, label, status, *_ in rows]
        counted = [a for a in answered if a[2] == "unlabelable" or a[1] in classes]
        resolved = merge(counted, policy)
        trained = rows[0][5]
        last_seq, _, last_status = answered[-1]
        untrained = resolved is not None and resolved != trained
        yield frame_id, resolved, last_seq, last_status == "unlabelable", untrained


def merge(answers: list[tuple[int, str | None, str]], policy: MergePolicy) -> str | None:
    """One label from ``(seq, label, status)`` answers sorted by seq; None if unlabelable."""
    if not answers:
        return None
    if policy == "last":
        return answers[-1][1] if answers[-1][2] == "labeled" else None
    votes = Counter(label if status == "labeled" else None for _, label, status in answers)
    latest = {label if status == "labeled" else None: seq for seq, label, status in answers}
    return max(votes, key=lambda choice: (votes[choice], latest[choice]))
