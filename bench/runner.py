"""One step: a load point against one target, from orders to the step's figures.

Splits the load over the client processes, starts them together, collects their windows as
they close, stops when the rule says so (stability, time or count), and reads the server's
statistics as measuring starts and after each window, for the queue/compute split of the very
windows the figures come from.
"""

from __future__ import annotations

import time

from bench.measure import Window, stable, summarise
from bench.plan import ClientOrder, LoadPoint, Plan, split
from bench.target import Target, server_split
from bench.workers import BenchError, ClientPool


def orders(plan: Plan, point: LoadPoint, target: Target, key: str,
           processes: int) -> list[ClientOrder]:
    """This step's share for each client process (fewer processes than users: some sit out)."""
    window, _ = plan.windows()
    keys = tuple(f"key-{k}" for k in range(plan.routing_keys))
    if point.rate is None:
        shares = [s for s in split(point.concurrency, min(processes, point.concurrency)) if s]
        total = point.concurrency
    else:
        shares = split(float(point.rate), processes)
        total = point.rate
    out = []
    for i, share in enumerate(shares):
        quota = max(1, round(plan.requests * share / total)) if plan.requests else None
        out.append(ClientOrder(
            url=target.url, requests_key=key, arrivals=plan.arrivals,
            concurrency=share if point.rate is None else 0,
            rate=share if point.rate is not None else 0.0,
            phase_s=i / point.rate if point.rate else 0.0,  # interleave constant arrivals
            warmup_s=plan.warmup_s, window_s=window, duration_s=plan.duration_s, quota=quota,
            timeout_s=plan.timeout_s, max_inflight=plan.max_inflight, routing_keys=keys,
            offset=i * 7919, seed=plan.seed, token=target.token, tls=target.tls,
            protocol=target.protocol, http_client=plan.http_client))
    return out


def run_step(pool: ClientPool, target: Target, plan: Plan, point: LoadPoint, key: str,
             batch_size: int, on_window=None) -> dict:
    """Measure ``point`` on ``target``; ``on_window(windows_so_far)`` after each full window."""
    step_orders = orders(plan, point, target, key, pool.size)
    count = len(step_orders)
    window_s, max_windows = plan.windows()
    self_ending = bool(plan.duration_s or plan.requests)
    t_start = pool.start(step_orders)
    t_measure = t_start + plan.warmup_s
    time.sleep(max(0.0, t_measure - time.monotonic()))
    # Server statistics at the start of measuring and after each window, so the queue/compute
    # split covers the same windows as the client-side figures.
    snapshots = [target.statistics()]

    partial: dict[int, Window] = {}
    finished: list[Window] = []
    done: dict[int, dict] = {}
    stop_sent = False
    outcome = "time bound" if plan.duration_s else "count bound" if plan.requests else "unstable"
    bound = t_measure + (plan.duration_s or window_s * max_windows) + plan.timeout_s + 30
    while len(done) < count:
        if time.monotonic() > bound:
            raise BenchError(f"{target.label} {point.label}: step did not end")
        for i, msg in pool.receive(range(count), 1.0):
            if msg[0] == "window":
                w = partial.setdefault(msg[1], Window(msg[1]))
                w.add(msg, i)
            elif msg[0] == "done":
                done[i] = msg[1]
            elif msg[0] == "error":
                raise BenchError(f"{target.label}: {msg[1]}")
        # A window is whole once every process has reported it or has ended before it.
        while not stop_sent:
            w = partial.get(len(finished))
            if w is None or not all(i in w.cpu_s or i in done for i in range(count)):
                break
            finished.append(partial.pop(w.index))
            if on_window:
                on_window(finished)
            if self_ending:
                continue
            if snapshots[0] is not None:
                snapshots.append(target.statistics())
            if stable(finished, plan.stable_windows, plan.stability):
                outcome = "stable"
            if outcome == "stable" or len(finished) >= max_windows:
                pool.stop(count)
                stop_sent = True
    if not self_ending:
        used = finished[-plan.stable_windows:]
        before = snapshots[-1 - len(used)] if len(snapshots) > len(used) else snapshots[0]
        after = snapshots[-1]
    else:
        used = finished + [partial[k] for k in sorted(partial)]
        before, after = snapshots[0], target.statistics()
    figures = summarise(used, batch_size)
    figures.update(
        target=target.label, url=target.url, point=point.label, mode=point.mode,
        concurrency=point.concurrency, rate=point.rate,
        arrivals=plan.arrivals if point.rate else None, batch_size=batch_size,
        outcome=outcome, stable=outcome == "stable" if not self_ending else None,
        windows=[w.brief() for w in finished], used_windows=len(used),
        server=server_split(before, after),
        cancelled=sum(d.get("cancelled", 0) for d in done.values()),
        unsent=sum(d.get("unsent", 0) for d in done.values()))
    return figures
