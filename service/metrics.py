"""Prometheus metrics of the scorer, in a registry per instance (tests build their own)."""

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:  # the metrics need neither the API schemas nor the policy at run time
    from schemas.api import LabelingStatus, PolicyState

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ScorerMetrics:
    """The scorer's metrics; names are part of the operators' contract."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames = Counter(
            "winnow_frames", "Frames handled, by outcome", ["outcome"], registry=r
        )
        self.label_requests = Counter(
            "winnow_label_requests", "Label requests sent, by reason", ["reason"], registry=r
        )
        self.dead_letters = Counter(
            "winnow_dead_letters", "Records sent to the dead-letter topic", ["reason"], registry=r
        )
        self.inference_seconds = Histogram(
            "winnow_inference_seconds",
            "ONNX Runtime time per batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "winnow_decode_seconds",
            "Decode and preprocess time per batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "winnow_batch_size", "Frames per scored batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.decision_latency = Histogram(
            "winnow_decision_latency_seconds",
            "From capture time (or broker timestamp) to the decision being acknowledged",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.query_threshold = Gauge(
            "winnow_query_threshold", "Current threshold of the query policy", registry=r
        )
        self.budget_used = Gauge(
            "winnow_budget_used_ratio", "Selected fraction over the budget window", registry=r
        )
        self.budget = Gauge(
            "winnow_budget_ratio",
            "Labeling budget in force: fraction of frames per window (raised after drift)",
            registry=r,
        )
        self.budget_left = Gauge(
            "winnow_budget_left_in_window",
            "Selections the budget still allows in the current window",
            registry=r,
        )
        self.labels_last_hour = Gauge(
            "winnow_labels_last_hour",
            "Frames selected for labeling in the last 3600 s (what the hourly cap counts)",
            registry=r,
        )
        self.labels_per_hour_cap = Gauge(
            "winnow_labels_per_hour_cap", "The labels-per-hour cap (0: no cap)", registry=r
        )
        self.labels_per_hour_share = Gauge(
            "winnow_labels_per_hour_share",
            "This scorer's share of the group's labels-per-hour cap: the slots of the frames "
            "partitions it owns (0: no cap or no partition)",
            registry=r,
        )
        self.cap_partition_share = Gauge(
            "winnow_cap_partition_share",
            "This scorer's fraction of the frames topic's partitions (its share of the cap)",
            registry=r,
        )
        self.labeling_stop = Gauge(
            "winnow_labeling_stop",
            "1 when the stopping rules say labeling can stop (or must stop and be looked at)",
            registry=r,
        )
        self.labeling_verdict = Gauge(
            "winnow_labeling_verdict",
            "The stopping rules' verdict (value 1), as a short code",
            ["verdict"],
            registry=r,
        )
        self.inference_provider = Gauge(
            "winnow_inference_provider",
            "The ONNX Runtime execution provider running the served model (value 1)",
            ["provider"],
            registry=r,
        )
        self.gpu_requested = Gauge(
            "winnow_gpu_requested",
            "1 when this scorer was asked to score on a GPU (WINNOW_DEVICE=cuda or "
            "WINNOW_GPU_REQUESTED)",
            registry=r,
        )
        self.model_info = Gauge(
            "winnow_model_info",
            "The model version being served (value 1)",
            ["version"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "winnow_consumer_lag",
            "Records behind the end of each partition",
            ["topic", "partition"],
            registry=r,
        )
        self.commits = Counter(
            "winnow_offset_commits", "Offset commits, by result", ["result"], registry=r
        )
        self.labels_unlearned = Gauge(
            "winnow_labels_unlearned",
            "Answered labels (holdout excluded) the serving model had not learned from when the "
            "trainer released it (NaN: the release does not say)",
            registry=r,
        )
        self.model_swaps = Counter(
            "winnow_model_swaps",
            "Model releases handled, by result (ok, pinned, rejected_<reason>, load_failed)",
            ["result"],
            registry=r,
        )

        self.labels_received = Counter(
            "winnow_labels_received",
            "Labels received for this scorer's requests, by status",
            ["status"],
            registry=r,
        )
        self.request_accuracy = Gauge(
            "winnow_request_accuracy",
            "Share of recent label requests whose prediction the label confirmed (prequential)",
            registry=r,
        )
        self.unlabelable_ratio = Gauge(
            "winnow_unlabelable_ratio",
            "Share of recent answers that were 'unlabelable'",
            registry=r,
        )
        self.request_recall = Gauge(
            "winnow_request_recall",
            "Per true class: share of recent label requests the model had predicted right",
            ["label"],
            registry=r,
        )
        self.request_balanced_accuracy = Gauge(
            "winnow_request_balanced_accuracy",
            "Mean over classes of winnow_request_recall (imbalance-proof accuracy)",
            registry=r,
        )
        self.uncertainty_blend = Gauge(
            "winnow_uncertainty_blend",
            "Weight of uncertainty against coverage in the embedding strategies (0: coverage)",
            registry=r,
        )
        self.requests_waiting = Gauge(
            "winnow_requests_waiting",
            "Label requests sent and not answered yet (backpressure)",
            registry=r,
        )
        self.backpressure_factor = Gauge(
            "winnow_backpressure_budget_factor",
            "Share of the budget in force under backpressure (1: not throttled)",
            registry=r,
        )
        self.backpressure_held = Counter(
            "winnow_backpressure_held_back",
            "Selections the labeling queue's backpressure refused",
            registry=r,
        )

        self.drift_score = Gauge(
            "winnow_drift_score",
            "Latest drift statistic of each detector, all sources together",
            ["detector"],
            registry=r,
        )
        self.drift_threshold = Gauge(
            "winnow_drift_threshold",
            "Alarm threshold of each detector, calibrated to the expected run time",
            ["detector"],
            registry=r,
        )
        self.drift_alarms = Counter(
            "winnow_drift_alarms",
            "Drift alarms, by detector (any source)",
            ["detector"],
            registry=r,
        )

    def drift_alarms_total(self) -> dict[str, int]:
        """Alarms so far, by detector."""
        return {
            sample.labels["detector"]: int(sample.value)
            for metric in self.drift_alarms.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }

    def set_model(self, version: str, provider: str) -> None:
        """The model now serving and the ONNX Runtime provider that runs it."""
        self.model_info.clear()
        self.model_info.labels(version=version).set(1)
        self.inference_provider.clear()
        self.inference_provider.labels(provider=provider).set(1)

    def set_drift_threshold(self, detector: str, threshold: float) -> None:
        """A detector's calibrated threshold; its alarm counter is exposed from 0 on (the
        monitor also does so at startup), so that ``increase()`` sees the first alarm."""
        self.drift_threshold.labels(detector=detector).set(threshold)
        self.drift_alarms.labels(detector=detector)

    def set_policy(self, policy: "PolicyState") -> None:
        """The budget and the hourly cap as they stand (refreshed on each scrape)."""
        budget = policy.effective_budget
        self.budget.set(policy.budget if budget is None else budget)
        self.labels_last_hour.set(policy.labels_last_hour)
        self.labels_per_hour_cap.set(policy.labels_per_hour or 0)
        self.labels_per_hour_share.set(policy.labels_per_hour_share or 0)
        self.cap_partition_share.set(policy.cap_share)

    def set_labeling(self, status: "LabelingStatus", verdict: str) -> None:
        """The stopping rules' figures and verdict code (refreshed on each scrape)."""
        self.budget_left.set(status.budget_left_in_window)
        self.labeling_stop.set(1 if status.stop else 0)
        self.labeling_verdict.clear()
        self.labeling_verdict.labels(verdict=verdict).set(1)
