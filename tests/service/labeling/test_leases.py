"""The lease pool, without a broker (its offsets: ``tests/infra/kafka/test_offsets.py``)."""

from aiokafka import TopicPartition

from service.labeling.leases import LeasePool, needs_second_opinion
from tests.service.labeling.conftest import label_request

TP = TopicPartition("winnow.label-requests", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pool(n: int, **kwargs: float) -> tuple[LeasePool, Clock]:
    clock = Clock()
    pool = LeasePool(lease_s=10, clock=clock, **kwargs)
    for i in range(n):
        pool.add(label_request(f"f{i}", i), (TP, i))
    return pool, clock


def test_leases_are_exclusive_and_expire_back_to_the_front() -> None:
    pool, clock = _pool(2)
    a, b = pool.next("a"), pool.next("b")
    assert a and b and a.frame.frame_id == "f0" and b.frame.frame_id == "f1"
    assert pool.next("c") is None and pool.waiting == 0
    clock.now = 9
    assert pool.next("a") is a  # asking again extends the lease to 19
    clock.now = 11  # b's lease ran out at 10
    c = pool.next("c")
    assert c and c.frame.frame_id == "f1" and pool.expired_total == 1


def test_skip_goes_to_the_back_and_duplicates_share_a_frame() -> None:
    pool, _ = _pool(3)
    pool.add(label_request("f0", 0), (TP, 3))  # the scorer redelivered f0
    assert len(pool) == 3
    lease = pool.next("a")
    assert lease and lease.frame.frame_id == "f0"
    pool.release(lease.id, "a")
    assert [pool.next(x).frame.frame_id for x in ("b", "c", "a")] == ["f1", "f2", "f0"]  # type: ignore[union-attr]
    done = pool.complete(pool.next("a"), "1")  # type: ignore[arg-type]
    assert done.done and done.positions == [(TP, 0), (TP, 3)]


def test_second_opinion_is_stable_and_needs_two_labelers() -> None:
    assert needs_second_opinion("x", 1.0) and not needs_second_opinion("x", 0.0)
    picked = sum(needs_second_opinion(f"f{i}", 0.25) for i in range(4000))
    assert 850 < picked < 1150
    pool, _ = _pool(1, second_opinion=1.0)
    first = pool.complete(pool.next("a"), "1")  # type: ignore[arg-type]
    assert not first.done and pool.next("a") is None
    second = pool.complete(pool.next("b"), "2")  # type: ignore[arg-type]
    assert second.done and second.disagreement == {"a": "1", "b": "2"}
