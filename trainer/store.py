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

The merged label of every joined frame, and whether it still needs training,
are kept in the ``frames`` table, refreshed in the transaction of each write
that touches the frame (from that frame's answers alone). So counting and
listing what a round trains on costs the untrained frames, not the store; the
table is rebuilt only when the store is opened with another merge policy (or
by a version that did not keep it).

The store is safe to share between the event loop's threads: one connection,
guarded by a lock.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from trainer.label_merge import ANSWERS, MergePolicy, merged
from trainer.store_records import (
    LabelOutcome,
    Outcome,
    StoreCounts,
    StoredLabel,
    TrainItem,
    stored_label,
)

__all__ = [
    "LabelOutcome",
    "MergePolicy",
    "Outcome",
    "SampleStore",
    "StoreCounts",
    "StoredLabel",
    "TrainItem",
]

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
CREATE INDEX IF NOT EXISTS trained_unreleased ON trained (frame_id) WHERE version = '';
CREATE TABLE IF NOT EXISTS frames (
    frame_id TEXT PRIMARY KEY,
    resolved TEXT,
    seq INTEGER NOT NULL,
    last_unlabelable INTEGER NOT NULL,
    untrained INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_by_seq ON frames (seq);
CREATE INDEX IF NOT EXISTS frames_untrained ON frames (seq) WHERE untrained = 1;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_UNRELEASED = ""
"""The ``trained.version`` of frames a refused candidate trained on, until a release."""


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
        self._untrained_added = 0
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.commit()
        built_for = self._db.execute("SELECT value FROM meta WHERE key = 'label_merge'").fetchone()
        if built_for != (label_merge,):
            with self._write() as db:
                self._rebuild(db)

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

    @property
    def untrained_added(self) -> int:
        """How many times a frame became untrained through this object's writes, in all.

        A running total: two readings around some writes tell whether they
        brought something new to train on, without counting the store.
        """
        return self._untrained_added

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
            if cursor.rowcount == 1:  # answers that came first join now
                self._refresh(db, request.frame_id)
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
            self._refresh(db, label.frame_id)
        return LabelOutcome.UPDATED if old else LabelOutcome.NEW

    def drop_labels(self, seqs: Iterable[int]) -> int:
        """Deletes stored answers by ``seq``; returns how many were deleted."""
        deleted = 0
        with self._write() as db:
            for seq in seqs:
                row = db.execute("SELECT frame_id FROM labels WHERE seq = ?", (seq,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM labels WHERE seq = ?", (seq,))
                    self._refresh(db, row[0])
                    deleted += 1
        return deleted

    def drop_orphan(self, frame_id: str) -> int:
        """Deletes the answers of a frame that has no request; returns how many."""
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM labels WHERE frame_id = ?"
                " AND NOT EXISTS (SELECT 1 FROM requests WHERE frame_id = ?)",
                (frame_id, frame_id),
            )
        return cursor.rowcount

    def mark_trained(self, items: Iterable[TrainItem | str], version: str | None) -> None:
        """Records that frames were trained on.

        A frame counts as untrained again when its resolved label changes later.

        Args:
            items: the :class:`TrainItem` s trained on (exact: their labels are
                recorded), or frame ids (their current resolved labels are).
            version: the model version released with them; None when the
                round's candidate was refused. A release also takes over the
                frames refused candidates trained on since the last one (see
                :meth:`trained_unreleased`).
        """
        with self._write() as db:
            for item in items:
                frame_id = item.frame_id if isinstance(item, TrainItem) else item
                label = item.label if isinstance(item, TrainItem) else self._resolved(db, item)
                if label is None:
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO trained VALUES (?, ?, ?, ?)",
                    (frame_id, label, version or _UNRELEASED, time.time()),
                )
                db.execute(
                    "UPDATE frames SET untrained = (resolved IS NOT NULL AND resolved IS NOT ?)"
                    " WHERE frame_id = ?",
                    (label, frame_id),
                )
            if version:
                db.execute(
                    "UPDATE trained SET version = ? WHERE version = ?", (version, _UNRELEASED)
                )

    # -- reads -----------------------------------------------------------------------------

    def resolved_label(self, frame_id: str) -> str | None:
        """The label a frame trains with, or None.

        ``"last"``: the most recently received answer across annotators.
        ``"majority"``: the most common answer, ties going to the most recent.
        Either way, None when that answer is ``unlabelable``, when the frame has
        no request yet, or when no answer is in the request's classes.
        """
        with self._lock:
            return self._resolved(self._db, frame_id)

    def trainable(self, only_untrained: bool = False) -> list[TrainItem]:
        """Frames with a request and a resolved label, in received order of their last answer.

        Args:
            only_untrained: leave out frames already trained with the same label
                (this costs the untrained frames only).
        """
        where = "untrained = 1" if only_untrained else "resolved IS NOT NULL"
        rows = self._read(
            f"SELECT frame_id, resolved, seq, untrained FROM frames WHERE {where} ORDER BY seq"
        )
        return [TrainItem(f, label, seq, bool(untrained)) for f, label, seq, untrained in rows]

    def images(self, frame_ids: Iterable[str]) -> dict[str, bytes]:
        """The encoded images of the requests of ``frame_ids`` (those stored)."""
        frame_ids = list(frame_ids)
        out: dict[str, bytes] = {}
        for start in range(0, len(frame_ids), 500):
            chunk = frame_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT frame_id, image FROM requests WHERE frame_id IN ({marks})", *chunk
            )
            out.update(rows)
        return out

    def untrained_count(self) -> int:
        """How many frames :meth:`trainable` with ``only_untrained=True`` would return.

        Counts an index of the untrained frames alone, however large the store.
        """
        return self._read("SELECT COUNT(*) FROM frames WHERE untrained = 1")[0][0]

    def trained_unreleased(self) -> list[str]:
        """Frames refused candidates trained on since the last release, which counts them."""
        rows = self._read("SELECT frame_id FROM trained WHERE version = ?", _UNRELEASED)
        return [frame_id for (frame_id,) in rows]

    def pending(self) -> list[TrainItem]:
        """Frames with a label no released model learned from, in received order.

        The untrained frames, and those only a refused candidate trained on:
        what the serving full release has not learned (before the holdout and a
        head-only release's labels are taken out). Costs those frames alone.
        """
        rows = self._read(
            "SELECT frame_id, resolved, seq, untrained FROM frames WHERE untrained = 1"
            " UNION ALL SELECT f.frame_id, f.resolved, f.seq, f.untrained FROM trained t"
            " JOIN frames f USING (frame_id) WHERE t.version = ? AND f.untrained = 0"
            " AND f.resolved IS NOT NULL ORDER BY 3",
            _UNRELEASED,
        )
        return [TrainItem(f, label, seq, bool(untrained)) for f, label, seq, untrained in rows]

    def counts(self) -> StoreCounts:
        """Sizes of the store."""
        row = self._read(
            "SELECT (SELECT COUNT(*) FROM requests), (SELECT COUNT(*) FROM labels),"
            " (SELECT COUNT(*) FROM frames WHERE resolved IS NOT NULL),"
            " (SELECT COUNT(*) FROM labels WHERE status = 'unlabelable'),"
            " (SELECT COUNT(*) FROM labels l WHERE NOT EXISTS"
            "  (SELECT 1 FROM requests r WHERE r.frame_id = l.frame_id)),"
            " (SELECT COUNT(*) FROM trained)"
        )[0]
        return StoreCounts(*row)

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
        return [stored_label(row) for row in rows]

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
        rows = self._read(
            "SELECT f.frame_id, r.predicted, f.resolved, f.last_unlabelable"
            " FROM frames f JOIN requests r USING (frame_id) ORDER BY f.seq DESC LIMIT ?",
            max(n, 0),
        )
        outcomes = [
            Outcome(f, predicted, resolved, bool(last)) for f, predicted, resolved, last in rows
        ]
        return outcomes[::-1]

    # -- the frames table ------------------------------------------------------------------

    def _refresh(self, db: sqlite3.Connection, frame_id: str) -> None:
        """Merges one frame's answers again, inside the caller's write."""
        was = db.execute("SELECT untrained FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
        answers = db.execute(ANSWERS + " WHERE l.frame_id = ? ORDER BY l.seq", (frame_id,))
        row = next(merged(answers, self.label_merge), None)
        db.execute("DELETE FROM frames WHERE frame_id = ?", (frame_id,))
        if row is not None:
            db.execute("INSERT INTO frames VALUES (?, ?, ?, ?, ?)", row)
            if row[4] and not (was and was[0]):
                self._untrained_added += 1

    def _rebuild(self, db: sqlite3.Connection) -> None:
        """Merges every frame again: on the first open, or under another merge policy."""
        answers = db.execute(ANSWERS + " ORDER BY l.frame_id, l.seq")
        rows = list(merged(answers, self.label_merge))
        db.execute("DELETE FROM frames")
        db.executemany("INSERT INTO frames VALUES (?, ?, ?, ?, ?)", rows)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('label_merge', ?)", (self.label_merge,))

    @staticmethod
    def _resolved(db: sqlite3.Connection, frame_id: str) -> str | None:
        row = db.execute("SELECT resolved FROM frames WHERE frame_id = ?", (frame_id,)).fetchone()
        return row[0] if row else None
