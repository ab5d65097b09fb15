"""What a person sees: a progress display while steps run, then the table and the ratios.

Uses ``rich`` when it is installed (``pip install .[bench]``) and writes plain aligned text
otherwise (or with ``--plain``); both say the same things.
"""

from __future__ import annotations

import sys

try:
    import rich  # noqa: F401

    HAVE_RICH = True
except ImportError:  # pragma: no cover - depends on the extra
    HAVE_RICH = False

COLUMNS = ("target", "load", "req/s", "infer/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
           "max ms", "errors", "queue us", "compute us", "batch", "versions", "client cpu", "rule")


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def row_cells(row: dict) -> list[str]:
    lat = row["latency_ms"] or {}
    server = row.get("server") or {}
    errors = ", ".join(f"{code} {n}" for code, n in row["errors"].items()) or "0"
    versions = " ".join(f"{v or '?'}:{n}" for v, n in row["versions"].items()) or "-"
    load = row["point"]
    if row["mode"] == "open":
        load += f" ({row['arrivals']}, sent {_num(row['sent_rps'], 1)}/s)"
    rule = {"stable": "stable", "unstable": "UNSTABLE"}.get(row["outcome"], row["outcome"])
    if row.get("rounds", 1) > 1:
        rule += f", median of {row['rounds']}"
    client = row["client"]
    return [row["target"], load, _num(row["throughput_rps"], 1), _num(row["inferences_per_s"], 1),
            *(_num(lat.get(p), 3) for p in ("p50", "p90", "p95", "p99", "max")), errors,
            _num(server.get("queue_us"), 1), _num(server.get("compute_us"), 1),
            _num(server.get("batch_mean"), 2), versions,
            f"{client['cores']:.2f} cores", rule]


class Progress:
    """Live step display: one bar per step, filled window by window."""

    def __init__(self, plain: bool = False, quiet: bool = False):
        self.quiet, self.rich = quiet, HAVE_RICH and not plain
        self._progress = None
        self._tasks: dict[str, int] = {}
        if self.rich and not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                          TextColumn("{task.fields[live]}"), TimeElapsedColumn(),
                                          console=Console(stderr=True))

    def __enter__(self):
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def step(self, label: str, windows: int):
        """Returns the per-window callback of one step."""
        if self.quiet:
            return lambda finished: None
        if self._progress is not None:
            task = self._progress.add_task(label, total=windows, live="warming up")
            self._tasks[label] = task

            def update(finished):
                w = finished[-1].brief()
                self._progress.update(task, completed=len(finished), live=(
                    f"{w['throughput_rps']:,.0f} req/s  p99 {_num(w['p99_ms'], 3)} ms"
                    + (f"  errors {w['errors']}" if w["errors"] else "")))
            return update

        print(f"{label}: warming up", file=sys.stderr, flush=True)

        def plain(finished):
            w = finished[-1].brief()
            print(f"  window {w['index'] + 1}: {w['throughput_rps']:.1f} req/s  p99 "
                  f"{_num(w['p99_ms'], 3)} ms  errors {w['errors']}", file=sys.stderr, flush=True)
        return plain

    def done(self, label: str, step: dict) -> None:
        task = self._tasks.get(label)
        if task is not None:
            n = len(step["windows"]) or 1
            self._progress.update(task, total=n, completed=n,
                                  live=f"{step['throughput_rps']:,.0f} req/s, {step['outcome']}")


def render(doc: dict, plain: bool = False, out=None) -> None:
    """Print the result table, ratios and limit of a run document (see ``bench.cli``)."""
    out = out or sys.stdout
    rows = doc["rows"]
    http = doc.get("http")
    over = (f" over REST ({http['data']} tensors, {http['client']} client)" if http else "")
    title = (f"{doc['model']} batch {doc['batch_size']}{over}, {doc['plan']['rule']}, "
             f"{doc['plan']['clients']} client process(es)")
    cells = [row_cells(r) for r in rows]
    ratio_rows = [[r["point"], f"{r['of']} / {r['over']}", _num(r["throughput"], 3),
                   _num(r["p50"], 3), _num(r["p99"], 3), _spread(r.get("throughput_rounds"))]
                  for r in doc["ratios"] if r["over"] != "limit"]  # the limit gets a line
    ratio_columns = ["load", "ratio", "throughput", "p50", "p99", "throughput by round"]
    if not any(r[-1] for r in ratio_rows):
        ratio_columns.pop()
        ratio_rows = [r[:-1] for r in ratio_rows]
    notes = _notes(doc)
    if HAVE_RICH and not plain:
        from rich.console import Console
        from rich.table import Table

        console = Console(file=out)
        if not console.is_terminal:  # a file or a pipe: do not squeeze the table into 80
            console = Console(file=out, width=200)
        table = Table(title=title, title_justify="left")
        for name in COLUMNS:
            table.add_column(name, justify="right" if name not in ("target", "load", "errors",
                                                                    "versions", "rule") else "left")
        for c in cells:
            table.add_row(*c)
        console.print(table)
        if ratio_rows:
            ratios = Table(title="ratios, first / second", title_justify="left")
            for name in ratio_columns:
                ratios.add_column(name, justify="left" if name in ("load", "ratio") else "right")
            for r in ratio_rows:
                ratios.add_row(*r)
            console.print(ratios)
        for note in notes:
            console.print(note, markup=False)
        return
    print(title, file=out)
    _plain_table([list(COLUMNS), *cells], out)
    if ratio_rows:
        print("\nratios, first / second", file=out)
        _plain_table([ratio_columns, *ratio_rows], out)
    for note in notes:
        print(note, file=out)


def _spread(values: list | None) -> str:
    """Per-round ratios as 'median (min-max)'; empty for one round."""
    values = sorted(v for v in values or () if v is not None)
    if len(values) < 2:
        return ""
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return f"{median:.2f} ({values[0]:.2f}-{values[-1]:.2f})"


def _plain_table(rows: list[list[str]], out) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def _notes(doc: dict) -> list[str]:
    notes = []
    limit = doc.get("limit")
    if limit:
        lat = limit["latency_ms"]
        notes.append(f"limit: onnxruntime in-process, batch {limit['batch_size']}, "
                     f"{limit['threads']} thread(s): {limit['throughput_rps']:,.0f} runs/s "
                     f"({limit['inferences_per_s']:,.0f} infer/s), run p50 {lat['p50']:.3f} ms "
                     f"p99 {lat['p99']:.3f} ms")
        best: dict[str, float] = {}
        for r in doc["ratios"]:
            if r["over"] == "limit" and r["throughput"] is not None:
                best[r["of"]] = max(best.get(r["of"], 0.0), r["throughput"])
        if best:
            notes.append("       best throughput as a share of it: " + ", ".join(
                f"{name} {share:.1%}" for name, share in best.items()))
    unstable = []
    for row in doc["rows"]:
        if row["client"]["busiest_process"] > 0.9:
            notes.append(f"note: {row['target']} {row['point']}: a client process was "
                         f"{row['client']['busiest_process']:.0%} busy; the client may be the "
                         "bottleneck (raise --clients)")
        lag = row.get("send_lag_ms")
        if row["mode"] == "open" and lag and lag["p99"] > 1.0:
            notes.append(f"note: {row['target']} {row['point']}: sends left up to "
                         f"{lag['p99']:.2f} ms late (p99); latency still counts from the schedule")
        if row.get("outcome") == "unstable":
            unstable.append(f"{row['target']} {row['point']}")
    if unstable:
        notes.append(f"note: not stable within {doc['plan']['max_windows']} windows (figures "
                     f"from the last three; try a longer --window): {', '.join(unstable)}")
    return notes
