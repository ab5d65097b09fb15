"""Latency against throughput across the sweep, one line per target: where each one bends.

matplotlib is optional (``pip install .[bench]``); without it ``--plot`` says so and the run
goes on.
"""

from __future__ import annotations

from pathlib import Path


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    targets: dict[str, list[dict]] = {}
    for row in doc["rows"]:
        if row["latency_ms"]:
            targets.setdefault(row["target"], []).append(row)
    for i, (name, rows) in enumerate(targets.items()):  # in sweep order, not sorted by x
        x = [r["throughput_rps"] for r in rows]
        color = f"C{i}"
        ax.plot(x, [r["latency_ms"]["p99"] for r in rows], "o-", color=color,
                label=f"{name} p99")
        ax.plot(x, [r["latency_ms"]["p50"] for r in rows], "s--", color=color, alpha=0.6,
                label=f"{name} p50")
        for r in rows:
            ax.annotate(r["point"], (r["throughput_rps"], r["latency_ms"]["p99"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    limit = doc.get("limit")
    widest = max((r["throughput_rps"] for rows in targets.values() for r in rows), default=0)
    if limit:
        text = f"in-process onnxruntime: {limit['throughput_rps']:,.0f}/s"
        if limit["throughput_rps"] <= 3 * widest:
            ax.axvline(limit["throughput_rps"], color="grey", linestyle=":", label=text)
        else:  # a vertical line that far out would squash every curve against the axis
            ax.text(0.99, 0.02, text + " (off the chart)", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    # label minor ticks only when the axis spans less than a decade (else they crowd)
    ax.yaxis.set_minor_formatter(plain if high / max(low, 1e-9) < 10
                                 else matplotlib.ticker.NullFormatter())
    ax.set_xlim(left=0)
    ax.set_title(f"{doc['model']}, batch {doc['batch_size']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
