"""Token buckets of HTTP ingest, on a clock the test moves."""

import pytest

from service.http.rate_limit import TokenBuckets


def test_token_bucket_refills_and_charges_multipart_frames() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2, burst=4, clock=lambda: now[0])
    assert buckets.admit("t") == 0
    buckets.charge("t", 4)  # a 5-frame request: one admitted, four charged: level -1
    assert buckets.admit("t") == pytest.approx(1.0)  # (1 - (-1)) / 2 frames per second
    now[0] = 1.0
    assert buckets.admit("t") == 0
    assert TokenBuckets(rate=0, burst=1).admit("t") == 0  # 0: no limit


def test_each_token_has_its_own_bucket_and_a_full_bucket_holds_only_the_burst() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=1, burst=2, clock=lambda: now[0])
    assert [buckets.admit("a") for _ in range(2)] == [0, 0]
    assert buckets.admit("a") == pytest.approx(1.0)
    assert buckets.admit("b") == 0
    now[0] = 100.0  # a long quiet spell refills up to the burst, not beyond
    assert [buckets.admit("a") for _ in range(2)] == [0, 0]
    assert buckets.admit("a") > 0
