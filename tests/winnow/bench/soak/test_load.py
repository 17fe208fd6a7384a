"""The soak's bookkeeping of frames: what counts as lost and as duplicated."""

from winnow.bench.soak.load import Bitmap, frame_id, parse_frame_id


def test_a_frame_acknowledged_and_never_decided_is_lost() -> None:
    """Would catch a lost count that compares totals only (a duplicate hiding a loss)."""
    acked, decided = Bitmap(), Bitmap()
    for seq in range(100_000):
        acked.set(seq)
    for seq in range(100_000):
        if seq != 70_001:
            decided.set(seq)
    assert decided.set(5) is True  # seen before: a duplicate decision
    assert decided.set(70_002) is True and decided.set(100_001) is False
    assert decided.missing_from(acked) == 1
    assert acked.missing_from(decided) == 1  # 100_001: decided, never acknowledged


def test_frame_ids_round_trip_and_foreign_ids_are_recognised() -> None:
    assert parse_frame_id(frame_id(1234, 56)) == (1234, 56)
    assert parse_frame_id("train-12") is None
    assert parse_frame_id("s12-x") is None
