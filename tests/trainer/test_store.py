"""The sample store: durability, merge policies, joins, duplicates and orphans."""

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from tests.trainer.helpers import REQUEST_CLASSES, make_request
from trainer.store import LabelOutcome, SampleStore

CLASSES = REQUEST_CLASSES


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
        assert reopened.images(["f1", "f3"]) == {"f1": b"\x89PNG\r\n\x1a\n"}
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


def test_the_untrained_count_follows_every_write_and_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SampleStore(path, label_merge="majority")
    store.add_request(request("a"))
    store.add_label(label("a", "cat", "x"))
    store.add_label(label("b", "dog", "x"))  # waits for its request
    assert store.untrained_count() == 1
    store.add_request(request("b"))
    assert store.untrained_count() == 2
    store.mark_trained(store.trainable(only_untrained=True), "v1")
    assert store.untrained_count() == 0
    store.add_label(label("a", "dog", "y"))  # a tie: the later answer wins, dog
    assert [(i.frame_id, i.label) for i in store.trainable(only_untrained=True)] == [("a", "dog")]
    store.add_label(label("a", "cat", "z"))  # cat again, as trained
    assert store.untrained_count() == 0
    store.add_label(label("b", None, "y"))
    store.add_label(label("b", None, "z"))  # unlabelable now: nothing to train
    assert store.untrained_count() == 0
    store.add_label(label("c", "bird", "x"))
    store.add_request(request("c"))
    assert store.untrained_count() == 1
    (z,) = [s.seq for s in store.labels_of("a") if s.label.annotator == "z"]
    store.drop_labels([z])  # dog wins the tie again
    assert [i.frame_id for i in store.trainable(only_untrained=True)] == ["a", "c"]
    store.close()

    reopened = SampleStore(path, label_merge="majority")
    assert reopened.untrained_count() == 2
    reopened.close()
    last = SampleStore(path, label_merge="last")  # the last answers: a dog, b unlabelable, c bird
    assert [(i.frame_id, i.label) for i in last.trainable()] == [("a", "dog"), ("c", "bird")]
    assert last.untrained_count() == 2
    last.close()


def test_untrained_added_tells_a_writer_whether_anything_became_untrained(
    store: SampleStore,
) -> None:
    before = store.untrained_added
    store.add_label(label("f", "cat"))
    assert store.untrained_added == before  # no request yet
    store.add_request(request("f"))
    assert store.untrained_added == before + 1
    store.add_label(label("f", "dog"))  # still one untrained frame
    assert store.untrained_added == before + 1
    store.mark_trained(["f"], "v1")
    store.add_label(label("f", "dog", "b"))  # the same label: nothing new
    assert store.untrained_added == before + 1
    store.add_label(label("f", "bird", "c"))
    assert store.untrained_added == before + 2


def _instructions(store: SampleStore, read: Callable[[], object]) -> int:
    """SQLite virtual-machine steps ``read`` takes: the work, whatever the SQL."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._db.set_progress_handler(count, 1)
    try:
        read()
    finally:
        store._db.set_progress_handler(None, 1)
    return steps


def test_counting_and_listing_untrained_frames_does_not_read_the_trained_ones(
    store: SampleStore,
) -> None:
    def add(first: int, n: int) -> None:
        for i in range(first, first + n):
            store.add_request(request(f"f{i}"))
            store.add_label(label(f"f{i}", "cat", "a"))
            store.add_label(label(f"f{i}", "dog", "b"))

    add(0, 50)
    store.mark_trained(store.trainable(), "v1")
    add(1000, 3)
    count = _instructions(store, store.untrained_count)
    listing = _instructions(store, lambda: store.trainable(only_untrained=True))
    added = _instructions(store, lambda: store.add_label(label("f1000", "cat", "c")))
    add(2000, 1000)
    store.mark_trained(store.trainable(), "v2")
    add(3000, 3)
    assert store.untrained_count() == 3
    assert _instructions(store, store.untrained_count) <= count + 10
    assert _instructions(store, lambda: store.trainable(only_untrained=True)) <= listing + 10
    assert _instructions(store, lambda: store.add_label(label("f3000", "cat", "c"))) <= added + 10


def test_the_kept_merge_equals_a_merge_from_scratch(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "s.sqlite3"
    store = SampleStore(path, label_merge="majority")
    frames, annotators = [f"f{i}" for i in range(12)], ["a", "b", "c", None]
    for _ in range(400):
        frame, op = rng.choice(frames), rng.random()
        if op < 0.1:
            store.add_request(request(frame))
        elif op < 0.75:
            value = rng.choice([*CLASSES, None, "horse"])
            store.add_label(label(frame, value, rng.choice(annotators)))
        elif op < 0.85:
            store.drop_labels([s.seq for s in store.labels_of(frame)][:1])
        elif op < 0.95:
            store.mark_trained(rng.sample(store.trainable(), k=min(2, len(store.trainable()))), "v")
        else:
            store.mark_trained([frame], None)
    kept = (store.trainable(), store.recent_outcomes(20), store.trained_unreleased())
    store.close()
    SampleStore(path, label_merge="last").close()  # merges every frame again
    rebuilt = SampleStore(path, label_merge="majority")
    assert (rebuilt.trainable(), rebuilt.recent_outcomes(20), rebuilt.trained_unreleased()) == kept
    assert rebuilt.untrained_count() == sum(i.untrained for i in kept[0])
    rebuilt.close()


def test_a_release_takes_over_the_frames_refused_candidates_trained_on(
    store: SampleStore,
) -> None:
    for frame in ("a", "b", "c"):
        store.add_request(request(frame))
        store.add_label(label(frame, "cat"))
    store.mark_trained(store.trainable(only_untrained=True)[:2], None)  # a refused candidate
    assert sorted(store.trained_unreleased()) == ["a", "b"]
    assert [i.frame_id for i in store.trainable(only_untrained=True)] == ["c"]
    store.mark_trained(store.trainable(only_untrained=True), "v2")
    assert store.trained_unreleased() == []
    assert store.untrained_count() == 0
