"""The run's figures put together: rounds folded per target and load point, ratios between
targets, and the distance to the in-process limit. Pure data in, data out (the JSON report)."""

from __future__ import annotations


def combine(steps: list[dict]) -> list[dict]:
    """One row per (target, load point): the round with the median throughput stands for the
    point (its latencies and server split), error and version counts add up over rounds."""
    groups: dict[tuple, list[dict]] = {}
    for step in steps:
        groups.setdefault((step["target"], step["point"]), []).append(step)
    rows = []
    for group in groups.values():
        ranked = sorted(group, key=lambda s: s["throughput_rps"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row.pop("windows", None)
        row["rounds"] = len(group)
        row["throughput_rounds"] = [s["throughput_rps"] for s in group]
        errors: dict[str, int] = {}
        versions: dict[str, int] = {}
        for s in group:
            for code, n in s["errors"].items():
                errors[code] = errors.get(code, 0) + n
            for v, n in s["versions"].items():
                versions[v] = versions.get(v, 0) + n
        row["errors_all_rounds"] = dict(sorted(errors.items()))
        row["versions_all_rounds"] = dict(sorted(versions.items()))
        rows.append(row)
    return rows


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(rows: list[dict], primary: str, limit: dict | None = None) -> list[dict]:
    """For each load point: the primary target over each other target (throughput, p50, p99;
    with several rounds, also the throughput ratio within each round, where both targets met
    the same moment of the machine), and every target's throughput as a share of the in-process
    limit."""
    by_point: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_point.setdefault(row["point"], {})[row["target"]] = row
    out = []
    for point, targets in by_point.items():
        base = targets.get(primary)
        for name, other in targets.items():
            if name == primary or base is None:
                continue
            lat_a, lat_b = base["latency_ms"] or {}, other["latency_ms"] or {}
            entry = {"point": point, "of": primary, "over": name,
                     "throughput": _ratio(base["throughput_rps"], other["throughput_rps"]),
                     "p50": _ratio(lat_a.get("p50"), lat_b.get("p50")),
                     "p99": _ratio(lat_a.get("p99"), lat_b.get("p99"))}
            a, b = base.get("throughput_rounds") or [], other.get("throughput_rounds") or []
            if len(a) > 1 and len(a) == len(b):  # the targets ran side by side in each round
                entry["throughput_rounds"] = [_ratio(x, y) for x, y in zip(a, b)]
            out.append(entry)
        if limit:
            for name, row in targets.items():
                out.append({"point": point, "of": name, "over": "limit",
                            "throughput": _ratio(row["throughput_rps"], limit["throughput_rps"]),
                            "p50": None, "p99": None})
    return out


def best(rows: list[dict], target: str) -> float:
    """Highest throughput a target reached over the sweep."""
    return max((r["throughput_rps"] for r in rows if r["target"] == target), default=0.0)
