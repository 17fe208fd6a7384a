"""Prometheus metrics of the trainer, served on its own ``/metrics``."""

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:  # the reports' modules import torch; the metrics need not
    from trainer.refit import HeadReport
    from trainer.rounds import RoundReport


class TrainerMetrics:
    """The trainer's metrics; names are part of the operators' contract."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._decoded_again = 0
        r = self.registry
        self.labels_received = Counter(
            "winnow_trainer_labels_received", "Labels that joined a requested frame", registry=r
        )
        self.rounds = Counter(
            "winnow_trainer_rounds", "Fine-tuning rounds, by result", ["result"], registry=r
        )
        self.rounds_triggered = Counter(
            "winnow_trainer_rounds_triggered",
            "Fine-tuning rounds, by what started them (labels, timer, drift, manual)",
            ["trigger"],
            registry=r,
        )
        self.drift_alarms = Counter(
            "winnow_trainer_drift_alarms",
            "Drift alarms read from the drift topic, by detector",
            ["detector"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "winnow_trainer_round_seconds",
            "Duration of a fine-tuning round",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.holdout_accuracy = Gauge(
            "winnow_trainer_holdout_accuracy",
            "Accuracy of the serving model on the holdout",
            registry=r,
        )
        self.prequential_accuracy = Gauge(
            "winnow_trainer_prequential_accuracy",
            "Accuracy of the current model on new labels before training on them",
            registry=r,
        )
        self.releases = Counter(
            "winnow_trainer_releases",
            "Model releases, by result (published, rejected)",
            ["result"],
            registry=r,
        )
        self.labels_trained = Gauge(
            "winnow_trainer_labels_trained",
            "Labels the serving model has learned from",
            registry=r,
        )
        self.labels_unlearned = Gauge(
            "winnow_trainer_labels_unlearned",
            "Answered labels (holdout excluded) the serving release has not learned from",
            registry=r,
        )
        self.head_refits = Counter(
            "winnow_trainer_head_refits",
            "Head refits on frozen embeddings, by result (released, rejected, stale)",
            ["result"],
            registry=r,
        )
        self.head_refit_seconds = Histogram(
            "winnow_trainer_head_refit_seconds",
            "From the start of a head refit to its release being acknowledged",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.round_workers = Counter(
            "winnow_trainer_round_workers_started",
            "Round worker processes started, by reason: first, recycled (after "
            "WINNOW_TRAINER_ROUND_WORKER_ROUNDS rounds), died (one exited mid-round)",
            ["reason"],
            registry=r,
        )
        self.sample_cache_bytes = Gauge(
            "winnow_trainer_sample_cache_bytes",
            "Decoded labeled frames held in memory, at most WINNOW_TRAINER_SAMPLE_CACHE_MB",
            registry=r,
        )
        self.frames_decoded_again = Counter(
            "winnow_trainer_frames_decoded_again",
            "Labeled frames read from the store and decoded again because the sample "
            "cache's budget did not hold them",
            registry=r,
        )
        # Every known label value from 0 on: a series born at 1 hides its first event from
        # increase(), and the alert rules count these events.
        for counter, values in (
            (self.rounds, ("released", "rejected")),
            (self.rounds_triggered, ("labels", "timer", "drift", "manual")),
            (self.releases, ("published", "rejected")),
            (self.head_refits, ("released", "rejected", "stale")),
            (self.round_workers, ("first", "recycled", "died")),
        ):
            for value in values:
                counter.labels(value)

    def sample_cache(self, held_bytes: int, decoded_again: int) -> None:
        """The sample cache's bytes now and its frames decoded again in all."""
        self.sample_cache_bytes.set(held_bytes)
        self.frames_decoded_again.inc(decoded_again - self._decoded_again)  # a running total
        self._decoded_again = decoded_again

    def round_done(self, report: "RoundReport", holdout_accuracy: float | None) -> None:
        """Counts a backbone round; ``holdout_accuracy``: the serving model's after it."""
        self.rounds.labels(result="released" if report.released else "rejected").inc()
        self.rounds_triggered.labels(trigger=report.trigger).inc()
        if not report.released:
            self.releases.labels(result="rejected").inc()
        self.round_seconds.observe(report.seconds)
        self.labels_received.inc(report.new_labels)
        self.prequential_accuracy.set(report.prequential_accuracy)
        if holdout_accuracy is not None:
            self.holdout_accuracy.set(holdout_accuracy)

    def head_refit_done(self, report: "HeadReport", seconds: float) -> None:
        """Counts a head refit; ``seconds`` from its start to its release (when released)."""
        self.head_refits.labels(result="released" if report.released else "rejected").inc()
        if report.released:
            self.head_refit_seconds.observe(seconds)
