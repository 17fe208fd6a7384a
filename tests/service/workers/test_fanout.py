"""Admin writes under ``--workers N`` reach every worker or none, and a restarted worker
is given them again (real processes: the stand-in worker, ``fake_worker.py``)."""

import json
import signal
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.workers.fanout import AdminFanOut, FanOutRefused, Write
from service.workers.pool import WorkerPool
from tests.service.workers.test_pool import fake, until

POLICY = Write("PUT", "/v1/policy", b'{"budget": 0.2}')


def requests(log: Path) -> list[tuple[int, str, str, str]]:
    """(pid, method, path, body) of each request the stand-ins took, in order."""
    if not log.exists():
        return []
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]  # type: ignore[misc]


def pool_of(behaviours: list[str], log: Path, fanout: AdminFanOut, **kwargs: object) -> WorkerPool:
    return WorkerPool(
        len(behaviours),
        fake(lambda index, _attempt: behaviours[index], log),
        on_ready=fanout.replay,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_a_write_reaches_every_worker_with_the_admin_token(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fanout = AdminFanOut(SecretStr("t0ken"))
    async with pool_of(["serve", "serve", "serve"], log, fanout) as pool:
        await until(lambda: pool.all_running, 20, "workers running")
        answers = await fanout.apply(pool.workers, POLICY)
        pids = {worker.pid for worker in pool.workers}
    assert sorted(answers) == [0, 1, 2]
    assert {pid for pid, *_ in requests(log)} == pids
    assert all(r[1:] == ("PUT", "/v1/policy", '{"budget": 0.2}') for r in requests(log))


async def test_a_write_the_first_worker_refuses_changes_no_worker(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fanout = AdminFanOut(None)
    async with pool_of(["serve:422", "serve:422"], log, fanout) as pool:
        await until(lambda: pool.all_running, 20, "workers running")
        with pytest.raises(FanOutRefused) as refused:
            await fanout.apply(pool.workers, POLICY)
        first = pool.workers[0].pid
    assert refused.value.status == 422  # as the worker answered
    assert [pid for pid, *_ in requests(log)] == [first]  # the second was never asked


async def test_a_write_only_some_workers_take_is_a_502_that_names_them(tmp_path: Path) -> None:
    fanout = AdminFanOut(None)
    async with pool_of(["serve", "serve:409"], tmp_path / "log", fanout) as pool:
        await until(lambda: pool.all_running, 20, "workers running")
        with pytest.raises(FanOutRefused) as refused:
            await fanout.apply(pool.workers, POLICY)
    assert refused.value.status == 502
    assert "workers [0] took the change and workers [1] did not" in refused.value.detail


async def test_a_write_while_a_worker_is_down_is_refused_and_sent_to_none(tmp_path: Path) -> None:
    log = tmp_path / "log"
    fanout = AdminFanOut(None)
    async with pool_of(["serve", "crash-later"], log, fanout, backoff_s=(30.0, 30.0)) as pool:
        await until(lambda: pool.workers[0].running, 20, "worker 0 running")
        await until(lambda: pool.workers[1].phase == "restarting", 20, "worker 1 restarting")
        with pytest.raises(FanOutRefused) as refused:
            await fanout.apply(pool.workers, POLICY)
    assert refused.value.status == 503
    assert "worker 1 (restarting) is not running" in refused.value.detail
    assert requests(log) == []


async def test_a_restarted_worker_is_given_the_writes_in_force_before_it_runs(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    fanout = AdminFanOut(None)
    writes = [
        POLICY,
        Write("POST", "/v1/model/pin", b'{"version": "v1"}'),
        Write("PUT", "/v1/policy", b'{"window": 50}'),
        Write("POST", "/v1/model/pin", b'{"version": "v2"}'),
    ]
    async with pool_of(["serve", "serve"], log, fanout, backoff_s=(0.1, 0.1)) as pool:
        await until(lambda: pool.all_running, 20, "workers running")
        for write in writes:
            await fanout.apply(pool.workers, write)
        worker = pool.workers[1]
        assert worker.process is not None
        worker.process.send_signal(signal.SIGKILL)
        old = worker.pid
        await until(lambda: worker.pid != old and worker.running, 20, "worker 1 back")
        new = worker.pid
    replayed = [(method, path, body) for pid, method, path, body in requests(log) if pid == new]
    assert replayed == [  # the policy changes in order, then the last pin only
        ("PUT", "/v1/policy", '{"budget": 0.2}'),
        ("PUT", "/v1/policy", '{"window": 50}'),
        ("POST", "/v1/model/pin", '{"version": "v2"}'),
    ]


async def test_a_restarted_worker_that_refuses_the_writes_in_force_does_not_run(
    tmp_path: Path,
) -> None:
    fanout = AdminFanOut(None)
    behaviours = {(0, 0): "serve", (1, 0): "serve"}  # later starts of worker 1 refuse

    pool = WorkerPool(
        2,
        fake(lambda index, attempt: behaviours.get((index, attempt), "serve:409"), tmp_path / "l"),
        on_ready=fanout.replay,
        backoff_s=(0.1, 0.1),
        max_restarts=2,
        on_give_up=lambda: None,
    )
    async with pool:
        await until(lambda: pool.all_running, 20, "workers running")
        await fanout.apply(pool.workers, POLICY)
        assert pool.workers[1].process is not None
        pool.workers[1].process.send_signal(signal.SIGKILL)
        await until(lambda: pool.gave_up, 30, "the pool giving up on worker 1")
    assert "cannot take the admin change" in (pool.workers[1].problem or "")
