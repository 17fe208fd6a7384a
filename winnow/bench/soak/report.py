"""The soak's JSON per role and overall, and the short table it prints."""

from typing import Any

from winnow.bench.soak.growth import (
    EDGE_FRACTION,
    FLOOR_NOTE,
    edge_count,
    kb_per_label,
    role_growth,
    verdict,
)
from winnow.bench.soak.roles import ROLES


def role_summary(samples: list[dict[str, Any]], name: str, warmup_s: float) -> dict[str, Any]:
    """One role: its readings at the first sample, after warm-up and at the end; growth."""
    rows = [(s["t"], s["roles"].get(name)) for s in samples]
    live = [(t, r) for t, r in rows if r is not None]
    after = [(t, r) for t, r in live if t >= warmup_s]
    out: dict[str, Any] = {
        "first": live[0][1] if live else None,
        "start": after[0][1] if after else None,
        "start_t": after[0][0] if after else None,
        "end": live[-1][1] if live else None,
        "end_t": live[-1][0] if live else None,
        "rss_mb_max": max((r["rss_mb"] for _, r in live), default=None),
        "samples": len(live),
        "samples_after_warmup": len(after),
    }
    out.update(role_growth([t for t, _ in live], [r["rss_mb"] for _, r in live], warmup_s))
    out["rss_kb_per_label_after_warmup"] = _per_label(samples, name, warmup_s, "rss_mb")
    # Its anonymous memory with its children's (the trainer's round worker): what a leak grows.
    tree = [(t, r["tree_anon_mb"]) for t, r in live if r.get("tree_anon_mb") is not None]
    out.update(role_growth([t for t, _ in tree], [v for _, v in tree], warmup_s, "tree_anon"))
    out["tree_anon_kb_per_label_after_warmup"] = _per_label(samples, name, warmup_s, "tree_anon_mb")
    out["children_rss_mb_max"] = max((r.get("children_rss_mb", 0.0) for _, r in live), default=None)
    cpu = [(t, r["cpu_seconds"]) for t, r in after if r.get("cpu_seconds") is not None]
    out["cpu_cores_after_warmup"] = _cores(cpu)
    out["cpu_cores_at_end"] = _cores(cpu[-edge_count(len(cpu)) :])
    for key in ("fds", "threads", "asyncio_tasks"):
        start, end = out["start"], out["end"]
        known = start and end and start.get(key) is not None and end.get(key) is not None
        out[f"{key}_delta_after_warmup"] = end[key] - start[key] if known else None
        values = [r[key] for _, r in after if r.get(key) is not None]
        out[f"{key}_max_after_warmup"] = max(values) if values else None
    return out


def _cores(readings: list[tuple[float, float]]) -> float | None:
    """The cores kept busy between the first and last (time, CPU seconds) readings."""
    if len(readings) < 2 or readings[-1][0] <= readings[0][0]:
        return None
    (t0, cpu0), (t1, cpu1) = readings[0], readings[-1]
    return round((cpu1 - cpu0) / (t1 - t0), 3)


def _per_label(
    samples: list[dict[str, Any]], name: str, warmup_s: float, reading: str
) -> float | None:
    rows = [
        s
        for s in samples
        if s["roles"].get(name) is not None
        and s["roles"][name].get(reading) is not None
        and "labels_answered" in s
    ]
    found = kb_per_label(
        [s["t"] for s in rows],
        [s["roles"][name][reading] for s in rows],
        [s["labels_answered"] for s in rows],
        warmup_s,
    )
    return None if found is None else round(found, 2)


def lag_summary(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    lags = [s["lag"] for s in samples]
    after = sorted(s["lag"] for s in samples if s["t"] >= warmup_s)
    return {
        "max": max(lags, default=None),
        "mean": round(sum(lags) / len(lags), 1) if lags else None,
        "max_after_warmup": after[-1] if after else None,
        "p95_after_warmup": after[int(0.95 * (len(after) - 1))] if after else None,
        "final": lags[-1] if lags else None,
        "unit": "records of the frames topic behind the scorer's position, all partitions",
    }


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Adds ``roles``, ``lag`` and ``verdict`` to what the run gathered."""
    samples, warmup_s = run["samples"], run["config"]["warmup_s"]
    roles = {name: role_summary(samples, name, warmup_s) for name in ROLES}
    for name, code in run.get("exit_codes", {}).items():
        roles[name]["exit_code"] = code
    growths = {name: _worse_growth(r) for name, r in roles.items()}
    run["roles"] = roles
    run["lag"] = lag_summary(samples, warmup_s)
    run["verdict"] = verdict(growths, run["frames"]["lost"], run["config"]["duration_s"])
    for name, entries in run.get("restarts", {}).items():
        # its RSS samples span two processes: its growth says nothing
        roles[name]["restarts"] = len(entries)
        run["verdict"]["result"] = "fail"
        run["verdict"]["problems"].append(
            f"{name} restarted {len(entries)}x (last exit {entries[-1]['exit_code']}: "
            f"{entries[-1]['last_line']})"
        )
    if run.get("failure"):
        run["verdict"]["result"] = "fail"
        run["verdict"]["problems"].append(run["failure"])
    return run


def _worse_growth(role: dict[str, Any]) -> float | None:
    """The larger of a role's own RSS growth and the growth of the anonymous memory of it
    and its children (None: unknown)."""
    own, tree = role["rss_growth_after_warmup"], role.get("tree_anon_growth_after_warmup")
    if own is None:
        return None
    return own if tree is None else max(own, tree)


def _cell(reading: dict[str, Any] | None, key: str) -> str:
    if reading is None or reading.get(key) is None:
        return "-"
    value = reading[key]
    return f"{value:.0f}" if key.endswith("_mb") else str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def _cores_cell(mean: float | None, end: float | None) -> str:
    """Cores busy after warm-up, and at the end: ``0.45 (end 0.80)``."""
    if mean is None:
        return "-"
    return f"{mean:.2f}" + ("" if end is None else f" (end {end:.2f})")


def format_table(result: dict[str, Any]) -> str:
    head = ["role", "RSS MB start", "end", "growth", "floor", "MB/h", "KB/label"]
    head += ["anon+children MB", "growth", "floor", "MB/h", "CPU cores", "fds", "threads", "tasks"]
    rows = [head]
    for name, r in result["roles"].items():
        growth = r["rss_growth_after_warmup"]
        slope = r["rss_slope_mb_per_hour"]
        per_label = r.get("rss_kb_per_label_after_warmup")
        rows.append(
            [
                name,
                _cell(r["start"], "rss_mb"),
                _cell(r["end"], "rss_mb"),
                _percent(growth),
                _percent(r.get("rss_floor_growth_after_warmup")),
                _signed(slope),
                "-" if per_label is None else f"{per_label:+.1f}",
                f"{_cell(r['start'], 'tree_anon_mb')}->{_cell(r['end'], 'tree_anon_mb')}",
                _percent(r.get("tree_anon_growth_after_warmup")),
                _percent(r.get("tree_anon_floor_growth_after_warmup")),
                _signed(r.get("tree_anon_slope_mb_per_hour")),
                _cores_cell(r.get("cpu_cores_after_warmup"), r.get("cpu_cores_at_end")),
                *(
                    f"{_cell(r['start'], key)}->{_cell(r['end'], key)}"
                    for key in ("fds", "threads", "asyncio_tasks")
                ),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c, f, lag, v = result["config"], result["frames"], result["lag"], result["verdict"]
    capacity = c["capacity_fps"]
    lines += [
        "",
        f"load {c['rate_fps']:.0f} fps ({c['rate_source']}"
        + (f", {c['load_fraction']:.0%} of {capacity:.0f} fps measured" if capacity else "")
        + f") for {c['duration_s'] / 60:.1f} min, warm-up {c['warmup_s']:.0f} s, "
        f"{c['shift'] or 'no'} shift at {c['shift_at_s']:.0f} s",
        f"frames produced {f['produced']}, decided {f['decided']}, lost {f['lost']} "
        f"(duplicates {f['duplicates']}); lag max {lag['max']}, p95 after warm-up "
        f"{lag['p95_after_warmup']}, final {lag['final']}",
        f"releases served {result['releases']['scorer_swaps_ok']} (trainer published "
        f"{result['releases']['trainer_published']}, head refits "
        f"{result['releases']['head_refits_released']}); drift alarms "
        f"{result['drift']['alarms_before_shift']} before the shift, "
        f"{result['drift']['alarms_after_shift']} after; labels answered "
        f"{result['labels']['answered']}",
        f"verdict: {v['result']}"
        + (f" ({'; '.join(v['problems'])})" if v["problems"] else "")
        + f"; {v['note']}",
        f"growth compares the median of the first and last {EDGE_FRACTION:.0%} of the "
        f"readings after warm-up; {FLOOR_NOTE}",
    ]
    return "\n".join(lines)
