"""The trainer's counters the alert rules count from 0."""

from trainer.metrics import TrainerMetrics


def test_counters_of_known_results_start_at_zero() -> None:
    registry = TrainerMetrics().registry
    for name, labels in (
        ("winnow_trainer_rounds_total", {"result": "released"}),
        ("winnow_trainer_rounds_total", {"result": "rejected"}),
        ("winnow_trainer_releases_total", {"result": "rejected"}),
        ("winnow_trainer_head_refits_total", {"result": "released"}),
        ("winnow_trainer_rounds_triggered_total", {"trigger": "drift"}),
        ("winnow_trainer_round_workers_started_total", {"reason": "died"}),
    ):
        assert registry.get_sample_value(name, labels) == 0, (name, labels)
