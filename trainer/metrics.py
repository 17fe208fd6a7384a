"""Prometheus metrics of the trainer, served on its own ``/metrics``."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TrainerMetrics:
    """The trainer's metrics; names are part of the operators' contract."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
