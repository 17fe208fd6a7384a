"""What the soak concludes from its samples: warm-up, growth after it, and the verdict.

Pure functions over plain numbers, so a seeded leak can be checked on synthetic samples.
"""

from collections.abc import Callable, Sequence
from statistics import median

GOAL_RSS_GROWTH = 0.05
"""RSS may grow by less than 5 % after warm-up (the goal is stated over 60 minutes)."""
GOAL_MINUTES = 60.0
WARMUP_FRACTION = 0.10
WARMUP_MIN_S = 120.0
EDGE_SAMPLES = 3
"""Start and end are each the median of at least this many samples, so one noisy reading
does not make or hide a leak."""
EDGE_FRACTION = 0.10
"""...and of the first and last 10 % of the samples after warm-up in a long run: a role
whose live memory swings with its work (the scorer's drift calibration) is compared by its
typical level at each end, not by where the swing happened to be."""

FLOOR_NOTE = (
    "floor: the lowest reading of each edge, what a role holds between bursts of work; "
    "a leak raises it as much as the median, memory that a batch, a round or a model swap "
    "holds for a moment does not"
)


def warmup_seconds(duration_s: float) -> float:
    """The warm-up: the first 10 % of the run, at least 2 minutes, at most half of it."""
    return min(max(WARMUP_FRACTION * duration_s, WARMUP_MIN_S), duration_s / 2)


def after_warmup(times: Sequence[float], values: Sequence[float], warmup_s: float) -> list[float]:
    """The values sampled at or after ``warmup_s`` (times in seconds since the load began)."""
    return [v for t, v in zip(times, values, strict=True) if t >= warmup_s]


def edges(
    values: Sequence[float],
    count: int = EDGE_SAMPLES,
    level: Callable[[Sequence[float]], float] = median,
) -> tuple[float, float] | None:
    """(start, end): ``level`` (the median) of the first and last ``count`` values; None
    if there are fewer than two values (nothing to compare)."""
    if len(values) < 2:
        return None
    n = max(1, min(count, len(values) // 2))
    return float(level(values[:n])), float(level(values[-n:]))


def growth(
    values: Sequence[float],
    count: int = EDGE_SAMPLES,
    level: Callable[[Sequence[float]], float] = median,
) -> float | None:
    """Relative growth from start to end (0.05: 5 % more at the end) of ``level`` (the
    median) of each edge; None when unknown."""
    ends = edges(values, count, level)
    if ends is None or ends[0] <= 0:
        return None
    return (ends[1] - ends[0]) / ends[0]


def slope_per_hour(times: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``values`` against time, per hour; None under two samples."""
    if len(times) < 2:
        return None
    mean_t = sum(times) / len(times)
    mean_v = sum(values) / len(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        return None
    covariance = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True))
    return covariance / spread * 3600.0


def edge_count(samples: int) -> int:
    """Samples in each edge median of a run's ``samples`` after warm-up (see EDGE_FRACTION)."""
    return max(EDGE_SAMPLES, int(EDGE_FRACTION * samples))


def role_growth(
    times: Sequence[float], rss_mb: Sequence[float], warmup_s: float, measure: str = "rss"
) -> dict[str, float | bool | None]:
    """Memory growth of one role after warm-up: relative growth, slope, and whether under
    goal, as ``{measure}_growth_after_warmup``, ``{measure}_slope_mb_per_hour`` and
    ``{measure}_goal_met`` (``rss``: the process's own; ``tree_anon``: the anonymous
    memory of it and its children); and ``{measure}_floor_growth_after_warmup``, the
    growth of the lowest reading in each edge (see :data:`FLOOR_NOTE`), which the goal
    does not use."""
    kept_t = [t for t in times if t >= warmup_s]
    kept = after_warmup(times, rss_mb, warmup_s)
    rel = growth(kept, edge_count(len(kept)))
    floor = growth(kept, edge_count(len(kept)), min)
    slope = slope_per_hour(kept_t, kept)
    return {
        f"{measure}_growth_after_warmup": None if rel is None else round(rel, 4),
        f"{measure}_floor_growth_after_warmup": None if floor is None else round(floor, 4),
        f"{measure}_slope_mb_per_hour": None if slope is None else round(slope, 2),
        f"{measure}_goal_met": None if rel is None else rel < GOAL_RSS_GROWTH,
    }


def kb_per_label(
    times: Sequence[float],
    rss_mb: Sequence[float],
    labels: Sequence[float],
    warmup_s: float,
) -> float | None:
    """RSS grown after warm-up per label answered meanwhile, in KB, from the same edges as
    the growth (medians of the first and last 10 % of the samples): what a role keeps for
    each label, where its memory follows the labels rather than the time (the trainer
    keeps every labeled frame). None without two samples or without a new label."""
    rss_kept = after_warmup(times, rss_mb, warmup_s)
    count = edge_count(len(rss_kept))
    rss = edges(rss_kept, count)
    answered = edges(after_warmup(times, labels, warmup_s), count)
    if rss is None or answered is None or answered[1] <= answered[0]:
        return None
    return (rss[1] - rss[0]) * 1024 / (answered[1] - answered[0])


def verdict(
    growths: dict[str, float | None], frames_lost: int, duration_s: float
) -> dict[str, object]:
    """The run's verdict: no frame lost, and every role's memory growth under the goal
    (``growths``: each role's larger of its own RSS growth and that of the anonymous
    memory of it and its children, so that nothing a role moves into a child process goes
    uncounted)."""
    grown = sorted(role for role, g in growths.items() if g is not None and g >= GOAL_RSS_GROWTH)
    unknown = sorted(role for role, g in growths.items() if g is None)
    problems = []
    if frames_lost != 0:
        problems.append(f"{frames_lost} frames lost")
    if grown:
        problems.append(
            f"memory grew {GOAL_RSS_GROWTH:.0%} or more after warm-up: {', '.join(grown)}"
        )
    if unknown:
        problems.append(f"too few samples after warm-up: {', '.join(unknown)}")
    minutes = duration_s / 60
    note = (
        f"{minutes:.1f}-minute run; the RSS goal is stated over {GOAL_MINUTES:.0f} minutes"
        if minutes < GOAL_MINUTES
        else f"{minutes:.1f}-minute run"
    )
    return {
        "result": "pass" if not problems else "fail",
        "frames_lost_zero": frames_lost == 0,
        "rss_growth_under_goal": not grown and not unknown,
        "goal_rss_growth": GOAL_RSS_GROWTH,
        "goal_minutes": GOAL_MINUTES,
        "problems": problems,
        "note": note,
    }
