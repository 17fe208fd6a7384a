"""The soak's phases: start the roles, measure capacity, hold a steady load, drain, report."""

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.kafka.admin import ensure_winnow_topics
from infra.kafka.broker import EmbeddedBroker
from infra.kafka.settings import KafkaSettings
from winnow.bench.soak.growth import warmup_seconds
from winnow.bench.soak.labelers import AppLabelers
from winnow.bench.soak.load import Decisions, Frames, Producer, parse_frame_id
from winnow.bench.soak.report import format_table, summarize
from winnow.bench.soak.roles import MAX_RESTARTS, RoleOptions, Roles
from winnow.bench.soak.sampler import alarms_by_detector, progress_line, sample_roles
from winnow.datasets import ImageDataset, load_dataset

CAPACITY_SETTLE_S = 3.0
"""Flat-out production runs this long before the capacity clock starts (a backlog forms)."""
CAPACITY_BACKLOG = 4000
"""The flat-out producer pauses above this many undecided frames (the broker keeps all)."""
DRAIN_TIMEOUT_S = 300.0


@dataclass
class SoakConfig:
    minutes: float
    json_path: Path
    rate: float | None = None
    load_fraction: float = 0.8
    capacity_seconds: float = 30.0
    sample_seconds: float = 10.0
    progress_seconds: float = 30.0
    dataset: str = "digits"
    shift: str | None = "brightness"
    shift_at: float = 0.5
    label_rate: float = 2.0
    round_labels: int = 20
    round_seconds: float = 120.0
    device: str = "auto"
    role_env: tuple[tuple[str, str], ...] = ()
    log_dir: Path | None = None
    say: Callable[[str], None] = field(default=lambda message: None)


@dataclass
class _Run:
    """What the phases share."""

    config: SoakConfig
    roles: Roles
    producer: Producer
    decisions: Decisions
    labelers: AppLabelers
    result: dict[str, Any] = field(default_factory=dict)

    def decided(self) -> int:
        return self.decisions.decided.count()


async def run_soak(config: SoakConfig) -> dict[str, Any]:
    """Runs the soak; returns the JSON-ready result (``verdict`` says pass or fail)."""
    load_before = round(os.getloadavg()[0], 2)
    data = load_dataset(config.dataset)
    frames = await asyncio.to_thread(Frames.of, data, config.shift)
    base = KafkaSettings()
    broker = None
    if base.bootstrap is None:
        broker = EmbeddedBroker(0)
        await asyncio.to_thread(broker.start)
        base = base.model_copy(
            update={
                "bootstrap": broker.bootstrap,
                "session_timeout_ms": 2000,  # Tansu completes a join after half of it
                "heartbeat_interval_ms": 500,
            }
        )
    kafka = base.model_copy(update={"topic_prefix": f"soak-{secrets.token_hex(5)}."})
    log_dir = config.log_dir or config.json_path.with_suffix(".logs")
    try:
        await ensure_winnow_topics(kafka)
        with tempfile.TemporaryDirectory(prefix="winnow-soak-") as tmp:
            result = await _run_roles(config, data, frames, kafka, Path(tmp), log_dir)
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "load_average_1m_before": load_before,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    result["kafka"] = "embedded Tansu (memory only)" if broker is not None else base.bootstrap
    result["logs"] = str(log_dir)
    return summarize(result)


async def _run_roles(
    config: SoakConfig,
    data: ImageDataset,
    frames: Frames,
    kafka: KafkaSettings,
    work_dir: Path,
    log_dir: Path,
) -> dict[str, Any]:
    options = RoleOptions(
        classes=data.classes,
        input_size=16 if data.name == "digits" else 28,
        channels=data.channels,
        device=config.device,
        round_labels=config.round_labels,
        round_seconds=config.round_seconds,
        env=config.role_env,
    )
    roles = Roles(kafka, options, work_dir, log_dir)

    def truth(frame_id: str) -> str | None:
        parsed = parse_frame_id(frame_id)
        if parsed is None or parsed[1] >= len(data.train_labels):
            return None
        return data.classes[int(data.train_labels[parsed[1]])]

    run: _Run | None = None
    try:
        config.say("starting the trainer, the scorer and the label app")
        roles.start()
        await asyncio.to_thread(roles.wait_ready)
        label_url = roles.roles["label-app"].url
        run = _Run(
            config,
            roles,
            Producer(kafka, frames),
            Decisions(kafka),
            AppLabelers(label_url, roles.label_token, truth, config.label_rate),
        )
        await run.decisions.start()
        await run.labelers.start()
        await _phases(run)
    finally:
        exit_codes = await asyncio.to_thread(roles.stop)
        if run is not None:
            await run.labelers.stop()
            await run.decisions.stop()
    run.result["exit_codes"] = exit_codes
    run.result["pids"] = {name: role.pid for name, role in roles.roles.items()}
    return run.result


async def _phases(run: _Run) -> None:
    config = run.config
    duration = config.minutes * 60
    capacity = None if config.rate is not None else await _capacity(run)
    rate: float = config.load_fraction * capacity["fps"] if capacity else config.rate or 0.0
    await _until(lambda: run.decided() >= run.producer.produced, DRAIN_TIMEOUT_S)
    config.say(f"steady load at {rate:.0f} fps for {config.minutes:g} min")
    run.result["config"] = {
        "minutes": config.minutes,
        "duration_s": duration,
        "rate_fps": round(rate, 1),
        "rate_source": "given (--rate)" if config.rate is not None else "measured capacity",
        "load_fraction": None if config.rate is not None else config.load_fraction,
        "capacity_fps": None if capacity is None else capacity["fps"],
        "capacity": capacity,
        "warmup_s": warmup_seconds(duration),
        "warmup_rule": "the first 10 % of the steady phase, at least 120 s, at most half",
        "sample_s": config.sample_seconds,
        "shift": config.shift,
        "shift_at_s": config.shift_at * duration,
        "dataset": config.dataset,
        "label_rate": config.label_rate,
        "round_labels": config.round_labels,
        "round_seconds": config.round_seconds,
        "device": config.device,
        "role_env": run.roles.options.settings,
        "started_at": datetime.now(UTC).isoformat(),
    }
    failure = await _steady(run, rate, duration)
    config.say("load stopped; reading the decisions topic to the end")
    drained = await _drain(run)
    lost = run.decisions.decided.missing_from(run.producer.acked)
    run.result["frames"] = {
        "produced": run.producer.produced,
        "send_failures": run.producer.failed,
        "decided": run.decided(),
        "lost": lost,
        "duplicates": run.decisions.duplicates,
        "prediction_records": run.decisions.records,
        "read_to_end": drained,
        "note": "produced: frames the broker acknowledged (capacity phase included); decided: "
        "distinct frame ids on the predictions topic, read to its end offsets; lost: "
        "acknowledged and never decided",
    }
    if failure:
        run.result["failure"] = failure


async def _capacity(run: _Run) -> dict[str, Any]:
    """The scorer's rate while it always has a backlog, read from its own frame counter."""
    config, scorer = run.config, run.roles.roles["scorer"]
    config.say(f"measuring the scorer's capacity for {config.capacity_seconds:g} s")
    done = False
    backlog = lambda: run.producer.sent - run.decided() > CAPACITY_BACKLOG  # noqa: E731
    task = asyncio.create_task(run.producer.run(None, lambda: done, hold=backlog))
    await asyncio.sleep(CAPACITY_SETTLE_S)
    first = await asyncio.to_thread(
        sample_roles, {"scorer": scorer}, run.producer.kafka.topics.frames
    )
    t0 = time.monotonic()
    await asyncio.sleep(max(1.0, config.capacity_seconds - CAPACITY_SETTLE_S))
    last = await asyncio.to_thread(
        sample_roles, {"scorer": scorer}, run.producer.kafka.topics.frames
    )
    t1 = time.monotonic()
    done = True
    await task
    fps = (last["scored"] - first["scored"]) / (t1 - t0)
    config.say(f"capacity {fps:.0f} fps (backlog at the end: {last['lag']} frames)")
    return {
        "fps": round(fps, 1),
        "seconds": round(t1 - t0, 1),
        "frames_scored": last["scored"] - first["scored"],
        "backlog_at_end": last["lag"],
        "scorer_bound": last["lag"] > 0,
        "method": f"frames produced flat out (paused above {CAPACITY_BACKLOG} undecided), "
        f"trainer and label app running; the scorer's winnow_frames_total over "
        f"{t1 - t0:.0f} s after {CAPACITY_SETTLE_S:g} s of backlog forming",
    }


async def _steady(run: _Run, rate: float, duration: float) -> str | None:
    """Holds the load for ``duration`` seconds, sampling; returns a failure, if any."""
    config, result = run.config, run.result
    samples: list[dict[str, Any]] = []
    result["samples"] = samples
    result["drift"] = {"shift": config.shift, "alarms_at_shift": None}
    stop, failure = False, None
    started = time.monotonic()
    task = asyncio.create_task(run.producer.run(rate, lambda: stop))
    next_sample, next_progress = 0.0, 0.0
    shift_at = config.shift_at * duration if config.shift else None
    while True:
        t = time.monotonic() - started
        if shift_at is not None and not run.producer.shifted and t >= shift_at:
            run.producer.shifted = True
            result["drift"]["shift_t"] = round(t, 1)
            result["drift"]["alarms_at_shift"] = samples[-1]["drift_alarms"] if samples else 0
            config.say(f"[{t:6.0f}s] injecting a {config.shift} shift")
        if t >= next_sample or t >= duration:
            sample = await _sample(run, t, result["config"]["warmup_s"])
            samples.append(sample)
            next_sample += config.sample_seconds
            if t >= next_progress or t >= duration:
                progress_line(sample, config.say)
                next_progress += config.progress_seconds
            if dead := run.roles.dead():
                failure = _restart(run, dead, t)
                if failure:
                    break
            if t >= duration:
                break
        if task.done():  # the producer failed
            failure = f"the producer stopped: {task.exception()!r}"
            break
        await asyncio.sleep(min(0.5, max(0.0, next_sample - t)))
    stop = True
    await asyncio.gather(task, return_exceptions=True)
    _drift_summary(run, samples)
    return failure


def _restart(run: _Run, dead: list[str], t: float) -> str | None:
    """Restarts the roles that exited, as an orchestrator would, up to ``MAX_RESTARTS``
    each; returns a failure once a role has used them up."""
    for name in dead:
        role = run.roles.roles[name]
        if len(role.restarts) >= MAX_RESTARTS:
            code = role.process.poll()
            return f"{name} exited with {code} after {MAX_RESTARTS} restarts: {role.last_line()}"
        entry = run.roles.restart(name, t)
        run.result.setdefault("restarts", {}).setdefault(name, []).append(entry)
        run.config.say(
            f"[{t:6.0f}s] {name} exited with {entry['exit_code']} ({entry['last_line']}); "
            "started again, as an orchestrator would"
        )
    return None


async def _sample(run: _Run, t: float, warmup_s: float) -> dict[str, Any]:
    sample = await asyncio.to_thread(
        sample_roles, run.roles.roles, run.producer.kafka.topics.frames
    )
    return {
        "t": round(t, 1),
        "phase": "warmup" if t < warmup_s else "measured",
        "produced": run.producer.produced,
        "decided": run.decided(),
        "labels_answered": run.labelers.answered,
        **sample,
    }


def continue_counters(samples: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Makes counters that a restarted role began again from 0 continue, in place (a drop is
    a restart: what the old process had counted is carried on)."""
    for key in keys:
        carried, previous = 0, None
        for sample in samples:
            value = sample.get(key)
            if value is None:
                continue
            if previous is not None and value < previous:
                carried += previous
            previous = value
            sample[key] = value + carried


def _drift_summary(run: _Run, samples: list[dict[str, Any]]) -> None:
    if run.result.get("restarts", {}).get("scorer"):
        continue_counters(samples, ("drift_alarms", "swaps_ok", "swaps_all"))
    drift = run.result["drift"]
    final = samples[-1]["drift_alarms"] if samples else 0
    at_shift = drift.get("alarms_at_shift")
    drift["alarms_total"] = final
    drift["alarms_before_shift"] = final if at_shift is None else at_shift
    drift["alarms_after_shift"] = 0 if at_shift is None else final - at_shift
    after = [s for s in samples if at_shift is not None and s["t"] >= drift.get("shift_t", 0)]
    first = next((s for s in after if s["drift_alarms"] > at_shift), None)
    drift["first_alarm_after_shift_within_s"] = (
        None if first is None else round(first["t"] - drift["shift_t"], 1)
    )
    try:
        drift["by_detector"] = alarms_by_detector(run.roles.roles["scorer"])
    except (OSError, ValueError):
        drift["by_detector"] = None
    drift["note"] = "alarms: the scorer's winnow_drift_alarms_total (any source); resolution is "
    drift["note"] += "the sample interval"
    last = samples[-1] if samples else {}
    run.result["releases"] = {
        "scorer_swaps_ok": last.get("swaps_ok"),
        "scorer_swaps_refused": (last.get("swaps_all") or 0) - (last.get("swaps_ok") or 0),
        "trainer_published": last.get("trainer_releases"),
        "head_refits_released": last.get("head_refits"),
        "rounds_released": last.get("rounds"),
    }
    run.result["labels"] = {
        "requests": last.get("label_requests"),
        "answered": run.labelers.answered,
        "acknowledged_by_label_app": last.get("labels_acked"),
        "unlabelable": run.labelers.unlabelable,
        "labeler_errors": run.labelers.errors,
        "dead_letters": last.get("dead_letters"),
    }


async def _drain(run: _Run) -> bool:
    """Waits until every acknowledged frame is decided and the topic is read to its end."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if run.decided() >= run.producer.produced and await run.decisions.at_end():
            return True
        await asyncio.sleep(0.5)
    return await run.decisions.at_end()


async def _until(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls state
        await asyncio.sleep(0.2)


async def _stoppable(run: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """``run``, cancelled on SIGTERM so that its roles are stopped on the way out (killed
    with the soak, they ran on, orphaned, on the CPU and the ports of the next run)."""
    task = asyncio.ensure_future(run)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def run_soak_command(args: argparse.Namespace) -> int:
    """The ``winnow bench soak`` command."""

    def say(message: str) -> None:
        print(f"soak: {message}", file=sys.stderr, flush=True)

    config = SoakConfig(
        minutes=args.minutes,
        json_path=args.json,
        rate=args.rate,
        load_fraction=args.load_fraction,
        capacity_seconds=args.capacity_seconds,
        sample_seconds=args.sample_seconds,
        dataset=args.dataset,
        shift=None if args.shift == "none" else args.shift,
        label_rate=args.label_rate,
        round_labels=args.round_labels,
        device=args.device,
        role_env=tuple(args.role_env),
        say=say,
    )
    try:
        result = asyncio.run(_stoppable(run_soak(config)))
    except asyncio.CancelledError:
        say("stopped by SIGTERM: the roles are stopped; no result written")
        return 143
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {args.json}")
    # The RSS goal is a figure to read, as the other benchmarks' goals are; a lost frame or
    # a role that died (restarted or not) is a failure of the run.
    failed = result["frames"]["lost"] or result.get("failure") or result.get("restarts")
    return 1 if failed else 0
