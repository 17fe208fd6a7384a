"""The trainer's durable sample store: label requests, labels and training marks.

One SQLite file in WAL mode with ``synchronous=FULL``: every write is committed
before the method returns, so what the intake stored survives a crash, and the
intake commits Kafka offsets only after that.

Labels are kept one row per ``(frame, annotator)``: an annotator's later
answer replaces the earlier one and takes a new ``seq`` (received order). A
frame's answers become one label through a merge policy (see
:meth:`SampleStore.resolved_label`). Answers ``unlabelable`` are kept and
counted but never trained on, and an answer outside its request's classes
never counts.

The store is safe to share between the event loop's threads: one connection,
guarded by a lock.
"""

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from itertools import groupby
from pathlib import Path
from typing import Literal

from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.labels import Label

MergePolicy = Literal["last", "majority"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    frame_id TEXT PRIMARY KEY,
    image BLOB NOT NULL,
    content_type TEXT NOT NULL,
    classes TEXT NOT NULL,
    model_version TEXT NOT NULL,
    predicted TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    origin TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT,
    status TEXT NOT NULL,
    labeled_at TEXT,
    received_at REAL NOT NULL,
    origin TEXT,
    record_key BLOB,
    UNIQUE (frame_id, annotator)
);
CREATE TABLE IF NOT EXISTS trained (
    frame_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    version TEXT NOT NULL,
    trained_at REAL NOT NULL
);
"""

_ANSWERS = """
SELECT l.frame_id, l.seq, l.label, l.status, r.classes, r.predicted, t.label
FROM labels l JOIN requests r USING (frame_id) LEFT JOIN trained t USING (frame_id)
"""


class LabelOutcome(StrEnum):
    """What :meth:`SampleStore.add_label` did with a label."""

    NEW = "new"
    UPDATED = "updated"
    DUPLICATE = "duplicate"
    UNKNOWN_CLASS = "unknown_class"
    """Not stored: the frame's request does not list the label's class."""


@dataclass(frozen=True, slots=True)
class TrainItem:
    """One frame ready to train on; ``seq`` is its latest answer's received order."""

    frame_id: str
    image: bytes
    content_type: str
    label: str
    seq: int


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """Sizes of the store, for metrics and logs."""

    requests: int
    labels: int
    labeled_frames: int
    unlabelable_answers: int
    pending_labels: int
    trained: int


@dataclass(frozen=True, slots=True)
class StoredLabel:
    """A label as stored, with the Kafka record it came from (for dead letters)."""

    seq: int
    label: Label
    origin: FrameOrigin | None
    key: bytes | None
    received_at: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the model did on one answered frame, for stop rules."""

    frame_id: str
    predicted: str
    resolved: str | None
    unlabelable: bool


@dataclass(frozen=True, slots=True)
class _Frame:
    frame_id: str
    predicted: str
    resolved: str | None
    last_unlabelable: bool
    seq: int
    trained_label: str | None


class SampleStore:
    """Durable requests, labels and training marks in one SQLite file.

    Args:
        path: the database file; its folder is created.
        label_merge: ``"last"`` or ``"majority"`` (see :meth:`resolved_label`).
    """

    def __init__(self, path: Path, label_merge: MergePolicy = "last") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.label_merge = label_merge
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        """Closes the database; everything was already committed."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    def _read(self, sql: str, *params: object) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- writes ----------------------------------------------------------------------------

    def add_request(self, request: LabelRequest) -> bool:
        """Stores a label request; returns False if its frame id was already stored."""
        row = (
            request.frame_id,
            request.image,
            request.content_type,
            json.dumps(request.classes),
            request.model_version,
            request.label,
            request.requested_at.isoformat(),
            request.origin.model_dump_json(),
            time.time(),
        )
        with self._write() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row
            )
        return cursor.rowcount == 1

    def add_label(
        self, label: Label, *, origin: FrameOrigin | None = None, key: bytes | None = None
    ) -> LabelOutcome:
        """Stores an answer; an annotator's later answer replaces the earlier one.

        Args:
            label: the answer; a missing annotator counts as one anonymous annotator.
            origin: the Kafka record it came from, kept for dead letters.
            key: that record's key, kept for dead letters.

        Returns:
            ``NEW``, ``UPDATED`` (the annotator changed its answer), ``DUPLICATE``
            (the same answer again: nothing changed), or ``UNKNOWN_CLASS`` (not
            stored: the frame's request does not list the class).
        """
        value = label.label if label.status == "labeled" else None
        annotator = label.annotator or ""
        with self._write() as db:
            classes = db.execute(
                "SELECT classes FROM requests WHERE frame_id = ?", (label.frame_id,)
            ).fetchone()
            if value is not None and classes and value not in json.loads(classes[0]):
                return LabelOutcome.UNKNOWN_CLASS
            old = db.execute(
                "SELECT label, status FROM labels WHERE frame_id = ? AND annotator = ?",
                (label.frame_id, annotator),
            ).fetchone()
            if old == (value, label.status):
                return LabelOutcome.DUPLICATE
            # REPLACE deletes the old row and inserts a new one with a new seq.
            db.execute(
                "INSERT OR REPLACE INTO labels (frame_id, annotator, label, status, labeled_at,"
                " received_at, origin, record_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    label.frame_id,
                    annotator,
                    value,
                    label.status,
                    label.labeled_at.isoformat() if label.labeled_at else None,
                    time.time(),
                    origin.model_dump_json() if origin else None,
                    key,
                ),
            )
        return LabelOutcome.UPDATED if old else LabelOutcome.NEW

    def drop_labels(self, seqs: Iterable[int]) -> int:
        """Deletes stored answers by ``seq``; returns how many were deleted."""
        with self._write() as db:
            cursor = db.executemany("DELETE FROM labels WHERE seq = ?", [(s,) for s in seqs])
        return cursor.rowcount

    def drop_orphan(self, frame_id: str) -> int:
        """Deletes the answers of a frame that has no request; returns how many."""
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM labels WHERE frame_id = ?"
                " AND NOT EXISTS (SELECT 1 FROM requests WHERE frame_id = ?)",
                (frame_id, frame_id),
            )
        return cursor.rowcount

    def mark_trained(self, items: Iterable[TrainItem | str], version: str) -> None:
        """Records that frames were trained on, by a model version.

        A frame counts as untrained again when its resolved label changes later.

        Args:
            items: the :class:`TrainItem` s trained on (exact: their labels are
                recorded), or frame ids (their current resolved labels are).
            version: the model version trained.
        """
        rows = []
        for item in items:
            label = item.label if isinstance(item, TrainItem) else self.resolved_label(item)
            frame_id = item.frame_id if isinstance(item, TrainItem) else item
            if label is not None:
                rows.append((frame_id, label, version, time.time()))
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO trained VALUES (?, ?, ?, ?)", rows)

    # -- reads -----------------------------------------------------------------------------

    def resolved_label(self, frame_id: str) -> str | None:
        """The label a frame trains with, or None.

        ``"last"``: the most recently received answer across annotators.
        ``"majority"``: the most common answer, ties going to the most recent.
        Either way, None when that answer is ``unlabelable``, when the frame has
        no request yet, or when no answer is in the request's classes.
        """
        frames = self._frames(_ANSWERS + " WHERE l.frame_id = ? ORDER BY l.seq", frame_id)
        return frames[0].resolved if frames else None

    def trainable(self, only_untrained: bool = False) -> list[TrainItem]:
        """Frames with a request and a resolved label, in received order of their last answer.

        Args:
            only_untrained: leave out frames already trained with the same label.
        """
        frames = [f for f in self._all_frames() if f.resolved is not None]
        if only_untrained:
            frames = [f for f in frames if f.trained_label != f.resolved]
        images = self._images([f.frame_id for f in frames])
        items = [
            TrainItem(f.frame_id, *images[f.frame_id], label=f.resolved, seq=f.seq)
            for f in frames
            if f.resolved is not None
        ]
        return sorted(items, key=lambda item: item.seq)

    def untrained_count(self) -> int:
        """How many frames :meth:`trainable` with ``only_untrained=True`` would return."""
        frames = self._all_frames()
        return sum(1 for f in frames if f.resolved is not None and f.trained_label != f.resolved)

    def counts(self) -> StoreCounts:
        """Sizes of the store."""
        requests, labels, unlabelable, pending, trained = self._read(
            "SELECT (SELECT COUNT(*) FROM requests), (SELECT COUNT(*) FROM labels),"
            " (SELECT COUNT(*) FROM labels WHERE status = 'unlabelable'),"
            " (SELECT COUNT(*) FROM labels l WHERE NOT EXISTS"
            "  (SELECT 1 FROM requests r WHERE r.frame_id = l.frame_id)),"
            " (SELECT COUNT(*) FROM trained)"
        )[0]
        labeled = sum(1 for f in self._all_frames() if f.resolved is not None)
        return StoreCounts(requests, labels, labeled, unlabelable, pending, trained)

    def pending_orphans(self, older_than_s: float) -> list[tuple[str, float]]:
        """Frames with answers but no request, whose first answer came over ``older_than_s`` ago.

        Returns:
            ``(frame_id, received_at of its first stored answer)``, oldest first.
        """
        return self._read(
            "SELECT l.frame_id, MIN(l.received_at) FROM labels l"
            " WHERE NOT EXISTS (SELECT 1 FROM requests r WHERE r.frame_id = l.frame_id)"
            " GROUP BY l.frame_id HAVING MIN(l.received_at) <= ? ORDER BY 2",
            time.time() - older_than_s,
        )

    def labels_of(self, frame_id: str) -> list[StoredLabel]:
        """A frame's stored answers in received order."""
        rows = self._read(
            "SELECT seq, frame_id, annotator, label, status, labeled_at, origin, record_key,"
            " received_at FROM labels WHERE frame_id = ? ORDER BY seq",
            frame_id,
        )
        return [_stored_label(row) for row in rows]

    def labels_outside_classes(self, frame_id: str) -> list[StoredLabel]:
        """Stored ``labeled`` answers whose class the frame's request does not list.

        They arrive before their request; the caller dead-letters them and then
        calls :meth:`drop_labels`. Until then they never count.
        """
        classes = self._read("SELECT classes FROM requests WHERE frame_id = ?", frame_id)
        if not classes:
            return []
        allowed = set(json.loads(classes[0][0]))
        return [
            s
            for s in self.labels_of(frame_id)
            if s.label.status == "labeled" and s.label.label not in allowed
        ]

    def recent_outcomes(self, n: int) -> list[Outcome]:
        """The last ``n`` answered frames (by their latest answer), oldest first."""
        frames = sorted(self._all_frames(), key=lambda f: f.seq)[-n:] if n > 0 else []
        return [Outcome(f.frame_id, f.predicted, f.resolved, f.last_unlabelable) for f in frames]

    # -- merging ---------------------------------------------------------------------------

    def _all_frames(self) -> list[_Frame]:
        return self._frames(_ANSWERS + " ORDER BY l.frame_id, l.seq")

    def _frames(self, sql: str, *params: object) -> list[_Frame]:
        frames = []
        for frame_id, group in groupby(self._read(sql, *params), key=lambda row: row[0]):
            rows = list(group)
            classes = set(json.loads(rows[0][4]))
            answers = [(seq, label, status) for _, seq, label, status, *_ in rows]
            counted = [a for a in answers if a[2] == "unlabelable" or a[1] in classes]
            frames.append(
                _Frame(
                    frame_id=frame_id,
                    predicted=rows[0][5],
                    resolved=_merge(counted, self.label_merge),
                    last_unlabelable=answers[-1][2] == "unlabelable",
                    seq=answers[-1][0],
                    trained_label=rows[0][6],
                )
            )
        return frames

    def _images(self, frame_ids: list[str]) -> dict[str, tuple[bytes, str]]:
        out: dict[str, tuple[bytes, str]] = {}
        for start in range(0, len(frame_ids), 500):
            chunk = frame_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT frame_id, image, content_type FROM requests WHERE frame_id IN ({marks})",
                *chunk,
            )
            out.update({frame_id: (image, ctype) for frame_id, image, ctype in rows})
        return out


def _merge(answers: list[tuple[int, str | None, str]], policy: MergePolicy) -> str | None:
    """One label from ``(seq, label, status)`` answers sorted by seq; None if unlabelable."""
    if not answers:
        return None
    if policy == "last":
        return answers[-1][1] if answers[-1][2] == "labeled" else None
    votes = Counter(label if status == "labeled" else None for _, label, status in answers)
    latest = {label if status == "labeled" else None: seq for seq, label, status in answers}
    return max(votes, key=lambda choice: (votes[choice], latest[choice]))


def _stored_label(row: tuple) -> StoredLabel:
    seq, frame_id, annotator, label, status, labeled_at, origin, key, received_at = row
    return StoredLabel(
        seq=seq,
        label=Label(
            frame_id=frame_id,
            label=label,
            status=status,
            annotator=annotator or None,
            labeled_at=labeled_at,
        ),
        origin=FrameOrigin.model_validate_json(origin) if origin else None,
        key=key,
        received_at=received_at,
    )
