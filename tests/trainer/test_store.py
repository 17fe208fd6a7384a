"""The sample store: durability, merge policies, joins, duplicates and orphans."""

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from trainer.store import LabelOutcome, SampleStore

CLASSES = ["cat", "dog", "bird"]


def make_request(frame_id: str, *, predicted: str = "cat", classes: list[str] = CLASSES) -> dict:
    """A valid label request as its JSON dict (image as base64)."""
    return {
        "frame_id": frame_id,
        "source_id": "cam-1",
        "origin": {"topic": "winnow.frames", "partition": 0, "offset": 7},
        "requested_at": datetime(2024, 5, 1, tzinfo=UTC).isoformat(),
        "model_version": "v1",
        "classes": classes,
        "content_type": "image/png",
        "image": "iVBORw0KGgo=",  # the PNG signature
        "label": predicted,
        "confidence": 0.5,
        "probabilities": {c: 1 / len(classes) for c in classes},
        "scores": {"least_confidence": 0.5, "margin": 0.5, "entropy": 0.9},
        "decision": {"selected": True, "reason": "uncertainty", "policy": "fixed", "utility": 0.9},
    }


def request(frame_id: str, **kwargs: object) -> LabelRequest:
    return LabelRequest.model_validate(make_request(frame_id, **kwargs))  # type: ignore[arg-type]


def label(frame_id: str, value: str | None, annotator: str | None = None) -> Label:
    if value is None:
        return Label(frame_id=frame_id, status="unlabelable", annotator=annotator)
    return Label(frame_id=frame_id, label=value, annotator=annotator)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SampleStore]:
    s = SampleStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "store.sqlite3"
    store = SampleStore(path)
    store.add_request(request("f1"))
    store.add_request(request("f2"))
    store.add_label(label("f1", "dog", "ann"))
    store.add_label(label("f2", "bird"))
    store.add_label(label("f3", "cat"))  # still waiting for its request
    store.mark_trained(store.trainable()[:1], "v2")
    store.close()

    reopened = SampleStore(path)
    try:
        items = reopened.trainable()
        assert [(i.frame_id, i.label) for i in items] == [("f1", "dog"), ("f2", "bird")]
        assert items[0].image == b"\x89PNG\r\n\x1a\n"
        assert items[0].content_type == "image/png"
        assert [i.frame_id for i in reopened.trainable(only_untrained=True)] == ["f2"]
        counts = reopened.counts()
        assert (counts.requests, counts.labels, counts.pending_labels, counts.trained) == (
            2,
            3,
            1,
            1,
        )
        assert reopened.add_label(label("f1", "dog", "ann")) is LabelOutcome.DUPLICATE
    finally:
        reopened.close()


@pytest.mark.parametrize(("policy", "expected"), [("last", "dog"), ("majority", "cat")])
def test_merge_policy(tmp_path: Path, policy: str, expected: str) -> None:
    store = SampleStore(tmp_path / "s.sqlite3", label_merge=policy)  # type: ignore[arg-type]
    store.add_request(request("f"))
    for annotator, value in (("a", "cat"), ("b", "cat"), ("c", "dog")):
        store.add_label(label("f", value, annotator))
    assert store.resolved_label("f") == expected
    assert [i.label for i in store.trainable()] == [expected]
    store.close()


def test_majority_tie_goes_to_most_recent(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.sqlite3", label_merge="majority")
    store.add_request(request("f"))
    store.add_label(label("f", "cat", "a"))
    store.add_label(label("f", "dog", "b"))
    assert store.resolved_label("f") == "dog"
    store.add_label(label("f", "cat", "b"))  # b changes its mind: cat 2, dog 0
    assert store.resolved_label("f") == "cat"
    store.close()


def test_last_write_per_annotator_wins(store: SampleStore) -> None:
    store.add_request(request("f"))
    assert store.add_label(label("f", "cat", "a")) is LabelOutcome.NEW
    assert store.add_label(label("f", "dog", "b")) is LabelOutcome.NEW
    assert store.add_label(label("f", "cat", "b")) is LabelOutcome.UPDATED
    assert store.resolved_label("f") == "cat"
    assert store.counts().labels == 2


def test_unlabelable_answers_never_train(tmp_path: Path) -> None:
    last = SampleStore(tmp_path / "last.sqlite3")
    majority = SampleStore(tmp_path / "majority.sqlite3", label_merge="majority")
    for s in (last, majority):
        s.add_request(request("only"))
        s.add_label(label("only", None, "a"))
        s.add_request(request("mixed"))
        s.add_label(label("mixed", "cat", "a"))
        s.add_label(label("mixed", "cat", "b"))
        s.add_label(label("mixed", None, "c"))
    assert last.trainable() == []  # the latest answer says unlabelable
    assert [(i.frame_id, i.label) for i in majority.trainable()] == [("mixed", "cat")]
    assert majority.resolved_label("only") is None
    assert last.counts().unlabelable_answers == 2
    assert last.counts().labeled_frames == 0
    assert [o.unlabelable for o in last.recent_outcomes(5)] == [True, True]
    last.close()
    majority.close()


def test_label_before_request_joins_when_the_request_arrives(store: SampleStore) -> None:
    assert store.add_label(label("f", "dog")) is LabelOutcome.NEW
    assert store.trainable() == []
    assert store.resolved_label("f") is None
    assert store.counts().pending_labels == 1
    assert store.add_request(request("f", predicted="cat"))
    assert [(i.frame_id, i.label) for i in store.trainable()] == [("f", "dog")]
    assert store.counts().pending_labels == 0
    assert store.untrained_count() == 1
    outcome = store.recent_outcomes(1)[0]
    assert (outcome.predicted, outcome.resolved, outcome.unlabelable) == ("cat", "dog", False)


def test_duplicates_change_nothing(store: SampleStore) -> None:
    assert store.add_request(request("f")) is True
    assert store.add_request(request("f", predicted="dog")) is False
    assert store.add_label(label("f", "bird")) is LabelOutcome.NEW
    seq = store.trainable()[0].seq
    assert store.add_label(label("f", "bird")) is LabelOutcome.DUPLICATE
    assert store.trainable()[0].seq == seq
    assert store.counts().labels == 1
    assert store.recent_outcomes(1)[0].predicted == "cat"


def test_unknown_classes_never_count(store: SampleStore) -> None:
    origin = FrameOrigin(topic="winnow.labels", partition=1, offset=4)
    store.add_label(label("early", "horse"), origin=origin, key=b"early")
    store.add_label(label("early", "dog", "b"))
    store.add_request(request("early"))
    outside = store.labels_outside_classes("early")
    assert [(s.label.label, s.origin, s.key) for s in outside] == [("horse", origin, b"early")]
    # Until the caller drops it, the unknown class still never resolves.
    assert store.resolved_label("early") == "dog"
    store.drop_labels([s.seq for s in outside])
    assert store.counts().labels == 1

    store.add_request(request("late"))
    assert store.add_label(label("late", "horse")) is LabelOutcome.UNKNOWN_CLASS
    assert store.resolved_label("late") is None


def test_orphans_are_listed_after_their_grace_and_dropped(store: SampleStore) -> None:
    store.add_label(label("orphan", "cat", "a"))
    store.add_label(label("orphan", "dog", "b"))
    store.add_request(request("joined"))
    store.add_label(label("joined", "cat"))
    assert store.pending_orphans(older_than_s=3600) == []
    orphans = store.pending_orphans(older_than_s=0)
    assert [frame_id for frame_id, _ in orphans] == ["orphan"]
    assert len(store.labels_of("orphan")) == 2
    assert store.drop_orphan("joined") == 0
    assert store.drop_orphan("orphan") == 2
    assert store.counts().pending_labels == 0
    assert store.pending_orphans(older_than_s=0) == []


def test_a_changed_label_needs_training_again(store: SampleStore) -> None:
    store.add_request(request("f"))
    store.add_label(label("f", "cat"))
    store.mark_trained(["f"], "v2")
    assert store.untrained_count() == 0
    store.add_label(label("f", "dog"))
    assert [i.label for i in store.trainable(only_untrained=True)] == ["dog"]
