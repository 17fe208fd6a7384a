"""One ``/metrics`` for all workers: theirs, merged, and the supervisor's own.

The supervisor scrapes each worker's ``/metrics`` and serves every series with
one more label, ``worker`` (its index, 0 to N-1). Each worker stays a series of
its own, as a scorer replica is: counters reset independently when a worker
restarts (``rate()`` handles that per series, where a sum taken here would look
like one counter going backwards), a gauge keeps its meaning (a worker's lag,
its share of the hourly cap, the model version it serves), and the alerting
rules, which sum ``by (namespace, job, instance)``, read N workers as they
read N replicas. Sum over ``worker`` for the pod's figures, e.g.
``sum without (worker) (rate(winnow_frames_total[5m]))``.

This rather than prometheus_client's multiprocess mode: the scorer's registries
are per instance (tests build their own), its info-style gauges are cleared
and set on each swap (stale files in multiprocess mode), and the task gauge
is a custom collector, none of which that mode carries.
"""

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.workers.pool import Worker


class PoolMetrics:
    """The supervisor's own metrics: how many workers, which run, their restarts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.workers = Gauge(
            "winnow_workers", "Scorer worker processes configured (WINNOW_WORKERS)", registry=r
        )
        self.worker_up = Gauge(
            "winnow_worker_up",
            "1 while the worker runs and answered this scrape, 0 while it is down or restarting",
            ["worker"],
            registry=r,
        )
        self.restarts = Counter(
            "winnow_worker_restarts",
            "Times the worker was started again after it exited",
            ["worker"],
            registry=r,
        )
        self._counted: dict[int, int] = {}

    def observe(self, workers: Iterable[Worker], answered: Iterable[int]) -> None:
        """Brings the gauges and the restart counters up to the pool as it stands."""
        answering = set(answered)
        workers = list(workers)
        self.workers.set(len(workers))
        for worker in workers:
            name = str(worker.index)
            self.worker_up.labels(worker=name).set(
                1 if worker.running and worker.index in answering else 0
            )
            new = worker.restarts - self._counted.get(worker.index, 0)
            self.restarts.labels(worker=name).inc(new)
            self._counted[worker.index] = worker.restarts


def merge(scrapes: Mapping[int, str]) -> list[Metric]:
    """The workers' metric families, each sample labelled with its ``worker``.

    Args:
        scrapes: each worker's ``/metrics`` text, by worker index.
    """
    families: dict[str, Metric] = {}
    for worker, text in sorted(scrapes.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples.extend(
                Sample(s.name, {**s.labels, "worker": str(worker)}, s.value, s.timestamp)
                for s in family.samples
            )
    return list(families.values())


class _Families:
    """A collector of families already collected (the merged scrape)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def exposition(families: list[Metric], own: CollectorRegistry) -> bytes:
    """The text a scrape of the supervisor gets: the workers' series, then its own."""
    merged = CollectorRegistry(auto_describe=False)
    merged.register(_Families(families))
    return generate_latest(merged) + generate_latest(own)
