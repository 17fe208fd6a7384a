"""The labels-per-hour cap shared by the consumer group, partition by partition."""

import itertools

import numpy as np
import pytest

from service.selection.group_cap import GroupCap, partition_slots
from service.selection.policy import QueryPolicy


def test_partition_slots_add_up_to_the_cap() -> None:
    for cap, total in itertools.product(range(0, 40), range(1, 13)):
        slots = [partition_slots(cap, total, p) for p in range(total)]
        assert sum(slots) == cap
        assert max(slots) - min(slots) <= 1


def test_outside_a_group_the_replica_holds_the_whole_cap() -> None:
    now = [0.0]
    cap = GroupCap(5, clock=lambda: now[0])
    for _ in range(5):
        assert cap.allows()
        assert cap.record() is None
    assert not cap.allows()
    assert cap.limit == 5 and cap.share == 1.0
    now[0] = 3600.1
    assert cap.allows()


def test_a_replica_pools_the_slots_of_its_partitions_and_no_more() -> None:
    cap = GroupCap(12, clock=lambda: 0.0)
    cap.assign([0, 3], total=6)
    assert cap.limit == 4 and cap.share == pytest.approx(1 / 3)
    charged = []
    while cap.allows():
        charged.append(cap.record())
    assert sorted(charged) == [0, 0, 3, 3]


def test_a_moved_partition_keeps_its_charges_so_the_group_never_exceeds_the_cap() -> None:
    """The failure it catches: replicas that forget, on a rebalance, what the previous owner of a
    partition asked for in the last hour, and ask for it again (N replicas, N times the cap)."""
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    a, b = GroupCap(6, clock), GroupCap(6, clock)
    a.assign(range(6), total=6)  # a alone: the whole cap
    requests: list[tuple[float, int]] = []  # (time, charged partition), as on the topic
    while a.allows():
        requests.append((now[0], a.record()))
    assert len(requests) == 6
    now[0] += 60
    # b joins and takes half: it reads the history of its new partitions from the topic
    a.suspend()
    b_parts, a_parts = [0, 1, 2], [3, 4, 5]
    history = {p: [now[0] - t for t, q in requests if q == p] for p in b_parts}
    b.assign(b_parts, total=6, ages=history)
    a.assign(a_parts, total=6)
    assert not a.allows() and not b.allows()
    # an hour after the first requests, the slots come back, and only as many as the cap
    now[0] = 100.0 + 3600.5
    while a.allows():
        requests.append((now[0], a.record()))
    while b.allows():
        requests.append((now[0], b.record()))
    last_hour = [t for t, _ in requests if t > now[0] - 3600]
    assert len(last_hour) == 6


def test_an_unknown_history_counts_as_full_for_an_hour() -> None:
    now = [0.0]
    cap = GroupCap(6, clock=lambda: now[0])
    cap.assign([0, 1], total=6, unknown=[1])
    assert cap.limit == 2 and cap.allows()
    cap.record()
    assert not cap.allows()
    now[0] = 3600.5
    assert cap.allows()


def test_suspended_between_revocation_and_assignment() -> None:
    cap = GroupCap(6, clock=lambda: 0.0)
    cap.assign([0], total=6)
    cap.suspend()
    assert not cap.allows() and cap.limit == 0 and cap.share == 0.0
    cap.assign([0, 1], total=6)
    assert cap.allows() and cap.limit == 2


def test_the_policy_reports_its_share_and_tags_selections_with_the_partition_charged() -> None:
    policy = QueryPolicy("random", budget=1.0, window=10, labels_per_hour=12, seed=0)
    policy.on_model(10)
    policy.assign_partitions([1, 4], total=6)
    state = policy.state()
    assert state.cap_share == pytest.approx(1 / 3)
    assert state.labels_per_hour_share == 4 and state.cap_partitions == [1, 4]
    rows = policy.decide({"entropy": np.ones(40)})
    selected = [row for row in rows if row["selected"]]
    assert len(selected) == 4
    assert sorted(row["cap_partition"] for row in selected) == [1, 1, 4, 4]
    assert all("cap_partition" not in row for row in rows if not row["selected"])
    assert policy.state().cap_charged_last_hour == 4


def test_joining_a_group_allows_nothing_until_the_first_assignment() -> None:
    """The failure it catches: frames fetched while the first assignment's history is still
    being read, decided with the whole cap (every replica would then ask for the whole cap)."""
    cap = GroupCap(6, clock=lambda: 0.0)
    cap.suspend()
    assert not cap.allows() and cap.limit == 0 and cap.share == 0.0
    cap.assign([2], total=6)
    assert cap.allows() and cap.limit == 1
