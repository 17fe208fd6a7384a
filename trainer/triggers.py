"""When a backbone round starts: enough new labels, the timer, or a drift alarm from the scorer.

A round starts after ``round_min_labels`` untrained labels, or after
``round_max_seconds`` with at least one, or as soon as a drift alarm (read by
:class:`~trainer.drift_watch.DriftWatch`) finds ``drift_round_min_labels``;
an alarm that comes with fewer stays pending until they are there.
"""

import asyncio
import logging

from schemas.drift import DriftEvent
from trainer.config import TrainerSettings
from trainer.drift_watch import DriftWatch
from trainer.rounds import RoundTrigger

log = logging.getLogger(__name__)


class RoundTriggers:
    """Decides whether a round starts now, and waits for what could start one.

    Args:
        settings: the round thresholds.
        drift_watch: where drift alarms come from; None when drift rounds are off.
    """

    def __init__(self, settings: TrainerSettings, drift_watch: DriftWatch | None) -> None:
        self._settings = settings
        self._watch = drift_watch
        self._pending: DriftEvent | None = None
        self._fresh = False  # the pending alarm came since the last trigger()

    def take_alarm(self) -> DriftEvent | None:
        """A drift alarm that came since the last look; it stays pending until a round runs."""
        watch = self._watch
        if watch is None or not watch.alarm.is_set():
            return None
        watch.alarm.clear()
        self._pending, self._fresh = watch.last_alarm, True
        return watch.last_alarm

    def trigger(self, untrained: int, waited: float) -> RoundTrigger | None:
        """Why a round starts now, if one does: labels, then the timer, then a drift alarm.

        Args:
            untrained: labels no model trained on yet.
            waited: seconds since the last round.
        """
        settings, alarm, fresh = self._settings, self._pending, self._fresh
        self._fresh = False
        if untrained >= settings.round_min_labels:
            found: RoundTrigger | None = "labels"
        elif untrained and waited >= settings.round_max_seconds:
            found = "timer"
        elif alarm is None or untrained < settings.drift_round_min_labels:
            if alarm is not None and fresh:
                log.info(
                    "drift alarm waits for labels: detector=%s untrained=%d needed=%d",
                    alarm.detector,
                    untrained,
                    settings.drift_round_min_labels,
                )
            return None
        else:
            log.info(
                "round triggered by a drift alarm: detector=%s source=%s model=%s untrained=%d",
                alarm.detector,
                alarm.source_id,
                alarm.model_version,
                untrained,
            )
            found = "drift"
        self._pending = None  # whatever starts it, the round answers the alarm
        return found

    async def wait(self, labels: asyncio.Event, seconds: float | None) -> None:
        """Returns when ``labels`` is set, an alarm comes, or ``seconds`` pass (None: no limit)."""
        events = [labels]
        if self._watch is not None:
            events.append(self._watch.alarm)
        waiters = [asyncio.create_task(event.wait()) for event in events]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
