"""``winnow bench soak`` end to end in its short form: 30 s of load on the suite's broker."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.kafka.broker import EmbeddedBroker
from winnow.bench.soak.probe import descendants
from winnow.bench.soak.report import format_table
from winnow.cli import build_parser, main

READINGS = ("rss_mb", "fds", "threads", "asyncio_tasks")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_short_soak_samples_every_role_and_loses_no_frame(
    kafka_broker: EmbeddedBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Would catch a soak that reads the wrong processes or none (a role's RSS, fds, threads,
    asyncio tasks or processor time missing: the three roles run as processes of their
    own), a trainer left at torch's thread per core beside the scorer, a frame that was
    acknowledged and never decided, a run without samples after
    warm-up (so no growth figure), and a JSON missing what the note reads."""
    monkeypatch.setenv("WINNOW_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    monkeypatch.setenv("WINNOW_KAFKA_SESSION_TIMEOUT_MS", "2000")  # Tansu joins in half of it
    monkeypatch.setenv("WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS", "500")
    out = tmp_path / "soak.json"

    code = main(
        ["bench", "soak", "--minutes", "0.5", "--rate", "100", "--sample-seconds", "3",
         "--device", "cpu", "--json", str(out),
         # the round worker on, so that a role's child process is read as well
         "--role-env", "WINNOW_TRAINER_ROUND_WORKER_ROUNDS=20"]
    )  # fmt: skip

    result = json.loads(out.read_text())
    assert code == 0, result["verdict"]
    assert {"config", "machine", "roles", "samples", "lag", "frames", "releases", "drift",
            "labels", "verdict"} <= set(result)  # fmt: skip
    config = result["config"]
    assert config["rate_fps"] == 100 and config["rate_source"] == "given (--rate)"
    assert config["capacity"] is None and config["warmup_s"] == 15
    # The trainer shares the cores: one torch thread unless --role-env says otherwise.
    assert config["role_env"] == {
        "WINNOW_TRAINER_TORCH_THREADS": "1", "WINNOW_TRAINER_ROUND_WORKER_ROUNDS": "20"
    }  # fmt: skip
    trainer_log = (Path(result["logs"]) / "trainer.log").read_text()
    assert "torch runs 1 thread(s) per operation" in trainer_log

    frames = result["frames"]
    assert frames["produced"] > 1000 and frames["send_failures"] == 0
    assert frames["lost"] == 0 and frames["decided"] == frames["produced"]
    assert frames["read_to_end"]

    assert len(result["samples"]) >= 8
    assert {s["phase"] for s in result["samples"]} == {"warmup", "measured"}
    pids = set(result["pids"].values())
    assert len(pids) == 3  # three processes, none of them this one
    for name in ("scorer", "trainer", "label-app"):
        role = result["roles"][name]
        for key in ("start", "end"):
            read = {r: role[key][r] for r in READINGS if r != "children_rss_mb"}
            assert all(value > 0 for value in read.values()), (name, key, role[key])
        assert role["samples_after_warmup"] >= 4
        assert isinstance(role["rss_growth_after_warmup"], float)
        assert isinstance(role["tree_anon_floor_growth_after_warmup"], float)
        assert role["exit_code"] == 0, name
    # A round trained in the trainer's round worker, and the worker was read with its role.
    assert max(s["rounds"] for s in result["samples"]) >= 1
    assert result["roles"]["trainer"]["children_rss_mb_max"] > 100
    assert result["roles"]["scorer"]["children_rss_mb_max"] == 0
    for name in ("scorer", "trainer"):  # the processor time of each role is read
        assert result["roles"][name]["cpu_cores_after_warmup"] > 0.01, name
    assert result["releases"]["scorer_swaps_ok"] >= 1
    assert result["labels"]["answered"] >= 1
    assert result["drift"]["shift_t"] == pytest.approx(15, abs=4)
    assert result["lag"]["final"] is not None
    assert result["verdict"]["frames_lost_zero"] and result["verdict"]["result"] in ("pass", "fail")

    printed = capsys.readouterr()
    assert printed.out.rstrip("\n") == format_table(result)
    assert "verdict:" in printed.out and "measured] produced" in printed.err


def test_role_settings_are_winnow_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    """Would catch a --role-env that splits a value at its own '=' or passes any variable."""
    args = build_parser().parse_args(
        ["bench", "soak", "--role-env", "WINNOW_POLICY_BACKPRESSURE_WAITING=0",
         "--role-env", "WINNOW_X=a=b"]
    )  # fmt: skip
    assert args.role_env == [("WINNOW_POLICY_BACKPRESSURE_WAITING", "0"), ("WINNOW_X", "a=b")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "soak", "--role-env", "PATH=/tmp"])
    assert "expected WINNOW_NAME=VALUE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_soak_stopped_by_sigterm_stops_its_roles(
    kafka_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Catches: a soak killed with SIGTERM (``kill``, a CI timeout) leaving its trainer,
    scorer and label app running, orphaned, on the CPU and ports of the next run."""
    env = {
        **os.environ,
        "WINNOW_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "WINNOW_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "WINNOW_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    }
    soak = subprocess.Popen(
        [sys.executable, "-m", "winnow.cli", "bench", "soak", "--minutes", "5", "--rate", "50",
         "--device", "cpu", "--json", str(tmp_path / "soak.json")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        roles: list[int] = []
        everything: list[int] = []
        while len(roles) < 3:
            assert soak.poll() is None and time.monotonic() < deadline, "the roles did not start"
            roles = [pid for pid in descendants(soak.pid) if _is_role(pid)]
            time.sleep(0.5)
        everything = descendants(soak.pid)  # the roles, and a round worker if one runs
        soak.send_signal(signal.SIGTERM)
        _, err = soak.communicate(timeout=120)
        assert soak.returncode == 143, err[-2000:]
        assert "stopped by SIGTERM" in err
        assert not [pid for pid in everything if _alive(pid)]
        assert not (tmp_path / "soak.json").exists()
    finally:
        left = descendants(soak.pid) if soak.poll() is None else []
        for pid in left + everything:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if soak.poll() is None:
            soak.kill()
            soak.wait()


def _is_role(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"winnow.cli" in command and b"bench" not in command


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
