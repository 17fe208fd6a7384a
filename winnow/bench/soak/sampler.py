"""One sample of the whole system: each role's process and metrics, the load's counters."""

import time
from collections.abc import Callable
from typing import Any

from winnow.bench.soak.probe import read_process, scrape, total
from winnow.bench.soak.roles import Role

SampleDict = dict[str, Any]


def sample_roles(roles: dict[str, Role], frames_topic: str) -> SampleDict:
    """Reads every role (blocking: call it in a thread). A role that does not answer its
    ``/metrics`` still gets its process figures; one whose process is gone gets None."""
    out: SampleDict = {"roles": {}}
    metrics: dict[str, dict[str, float]] = {}
    for name, role in roles.items():
        try:
            process = read_process(role.pid)
        except OSError:
            out["roles"][name] = None
            continue
        try:
            metrics[name] = scrape(role.url)
        except (OSError, ValueError):
            metrics[name] = {}
        tasks = metrics[name].get("winnow_asyncio_tasks")
        out["roles"][name] = {
            "rss_mb": process.rss_mb,
            "children_rss_mb": process.children_rss_mb,
            "tree_anon_mb": process.tree_anon_mb,
            "cpu_seconds": process.cpu_seconds,
            "fds": process.fds,
            "threads": process.threads,
            "asyncio_tasks": None if tasks is None else int(tasks),
        }
    scorer, trainer = metrics.get("scorer", {}), metrics.get("trainer", {})
    label_app = metrics.get("label-app", {})
    out["scored"] = int(total(scorer, "winnow_frames_total"))
    out["lag"] = int(total(scorer, "winnow_consumer_lag", topic=frames_topic))
    out["swaps_ok"] = int(total(scorer, "winnow_model_swaps_total", result="ok"))
    out["swaps_all"] = int(total(scorer, "winnow_model_swaps_total"))
    out["drift_alarms"] = int(total(scorer, "winnow_drift_alarms_total"))
    out["dead_letters"] = int(total(scorer, "winnow_dead_letters_total"))
    out["label_requests"] = int(total(scorer, "winnow_label_requests_total"))
    out["trainer_releases"] = int(
        total(trainer, "winnow_trainer_releases_total", result="published")
    )
    out["head_refits"] = int(total(trainer, "winnow_trainer_head_refits_total", result="released"))
    out["rounds"] = int(total(trainer, "winnow_trainer_rounds_total", result="released"))
    out["labels_acked"] = int(total(label_app, "winnow_label_app_labels_total"))
    out["label_queue_depth"] = int(total(label_app, "winnow_label_app_queue_depth"))
    out["scraped"] = sorted(metrics)
    return out


def alarms_by_detector(role: Role) -> dict[str, int]:
    """The scorer's drift alarms so far, by detector."""
    found: dict[str, int] = {}
    for key, value in scrape(role.url).items():
        if key.startswith("winnow_drift_alarms_total{"):
            detector = key.partition('detector="')[2].partition('"')[0]
            found[detector] = found.get(detector, 0) + int(value)
    return found


def progress_line(sample: SampleDict, say: Callable[[str], None]) -> None:
    """The line printed every 30 s."""
    parts = []
    for name, r in sample["roles"].items():
        if r is None:
            parts.append(f"{name} GONE")
            continue
        tasks = "?" if r["asyncio_tasks"] is None else r["asyncio_tasks"]
        children = r.get("children_rss_mb") or 0
        memory = f"{r['rss_mb']:.0f} MB" + (f" (+{children:.0f} children)" if children else "")
        parts.append(f"{name} {memory} {r['fds']} fds {r['threads']} thr {tasks} tasks")
    say(
        f"[{sample['t']:6.0f}s {sample['phase']}] produced {sample['produced']} decided "
        f"{sample['decided']} lag {sample['lag']} | releases {sample['swaps_ok']} | alarms "
        f"{sample['drift_alarms']} | labels {sample['labels_answered']} | " + " | ".join(parts)
    )


def now() -> float:
    return time.monotonic()
