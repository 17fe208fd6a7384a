"""A role that exits during a soak is started again, as an orchestrator would, and fails the run."""

import sys
import time
from pathlib import Path

import pytest

from infra.kafka.settings import KafkaSettings
from winnow.bench.soak.probe import read_process
from winnow.bench.soak.report import summarize
from winnow.bench.soak.roles import Role, RoleOptions, Roles
from winnow.bench.soak.run import continue_counters
from winnow.bench.soak.sampler import sample_roles

STALLS = (
    "import sys, time; print('INFO scorer started', flush=True); "
    "print('2026-12-03 ERROR service.runtime scorer stalled: no frame decided', flush=True); "
    "sys.exit(1)"
)


def _roles(tmp_path: Path) -> Roles:
    options = RoleOptions(classes=["0", "1"], input_size=8, channels=1)
    return Roles(KafkaSettings(), options, tmp_path, tmp_path)


def test_a_role_that_exited_is_started_again_with_its_command_and_log(tmp_path: Path) -> None:
    """Catches: a stalled scorer that stops the soak instead of being restarted (so the run
    cannot show that nothing is lost across the restart), a restart that loses the role's
    log or command, and a restart record without the reason the role gave."""
    roles = _roles(tmp_path)
    log_path = tmp_path / "scorer.log"
    command = [sys.executable, "-c", STALLS]
    role = Role("scorer", "http://x", "/readyz", roles._spawn(command, {}, log_path), log_path)
    role.command, role.env = command, {}
    roles.roles["scorer"] = role
    first = role.process
    first.wait(30)
    assert roles.dead() == ["scorer"]

    entry = roles.restart("scorer", 61.24)

    assert entry == {
        "at_s": 61.2,
        "exit_code": 1,
        "last_line": "2026-12-03 ERROR service.runtime scorer stalled: no frame decided",
    }
    assert role.process is not first and role.restarts == [entry]
    assert role.process.wait(30) == 1
    assert log_path.read_text().count("scorer stalled") == 2, "one log across the restart"
    with pytest.raises(RuntimeError, match="running"):
        role.process = roles._spawn(
            [sys.executable, "-c", "import time; time.sleep(30)"], {}, log_path
        )
        roles.restart("scorer", 62.0)
    role.process.kill()
    role.process.wait(30)
    roles.stop()


def test_a_restart_fails_the_verdict_and_names_the_reason() -> None:
    """Catches: a run whose scorer had to be restarted reported as a pass."""
    samples = [
        {
            "t": t,
            "lag": 0,
            "roles": {n: {"rss_mb": 100.0} for n in ("scorer", "trainer", "label-app")},
        }
        for t in range(0, 600, 10)
    ]
    run = {
        "samples": samples,
        "config": {"warmup_s": 60.0, "duration_s": 600.0},
        "frames": {"lost": 0},
        "restarts": {"scorer": [{"at_s": 300.0, "exit_code": 1, "last_line": "scorer stalled"}]},
    }
    verdict = summarize(run)["verdict"]
    assert verdict["result"] == "fail"
    assert "scorer restarted 1x (last exit 1: scorer stalled)" in verdict["problems"]
    assert run["roles"]["scorer"]["restarts"] == 1


def test_a_role_that_exited_but_is_not_reaped_reads_as_gone(tmp_path: Path) -> None:
    """Catches: the sampler crashing on a zombie (no VmRSS line), which ended the 60-minute
    soak with a KeyError right after its scorer's watchdog stopped the scorer."""
    roles = _roles(tmp_path)
    log_path = tmp_path / "scorer.log"
    command = [sys.executable, "-c", STALLS]
    role = Role(
        "scorer", "http://127.0.0.1:9", "/readyz", roles._spawn(command, {}, log_path), log_path
    )
    roles.roles["scorer"] = role
    deadline = time.monotonic() + 30
    while "Z" not in Path(f"/proc/{role.pid}/status").read_text().split("State:")[1][:4]:
        assert time.monotonic() < deadline, "the process did not exit"
        time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        read_process(role.pid)
    assert sample_roles(roles.roles, "frames")["roles"]["scorer"] is None
    role.process.wait(5)
    roles.stop()


def test_counters_of_a_restarted_role_continue() -> None:
    """Catches: the soak's report of -73 drift alarms after the shift, once its scorer had
    been restarted and its counters began again from 0."""
    samples = [{"drift_alarms": v} for v in (0, 5, 73, 2, None, 9, 0, 4)]
    continue_counters(samples, ("drift_alarms",))
    assert [s["drift_alarms"] for s in samples] == [0, 5, 73, 75, None, 82, 82, 86]
