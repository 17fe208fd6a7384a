"""One BLAS thread while a scorer runs, and the earlier limit back after the last one."""

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from infra import blas


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads() -> object:
    if not _blas_threads():
        pytest.skip("numpy has no BLAS that threadpoolctl can see")
    with threadpool_limits(limits=2, user_api="blas") as limits:
        yield limits


@pytest.mark.usefixtures("two_blas_threads")
def test_blas_is_single_threaded_until_the_last_release() -> None:
    blas.acquire()
    blas.acquire()  # a second scorer in the same process
    assert set(_blas_threads()) == {1}
    blas.release()
    assert set(_blas_threads()) == {1}, "one scorer still runs"
    blas.release()
    assert set(_blas_threads()) == {2}
    blas.release()  # one too many does nothing
    assert set(_blas_threads()) == {2}
