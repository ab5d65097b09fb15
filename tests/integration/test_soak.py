"""A short soak: mixed load while versions are published and the split moves; nothing lost."""

from __future__ import annotations

from bench import soak


def test_short_soak_loses_no_accepted_request():
    summary = soak.run(minutes=0.3, clients=2, interval=3.0, bad_every=7)
    assert summary["requests"] > 0
    assert summary["lost"] == 0, summary["intervals"]
    assert summary["misjudged"] == 0, summary["intervals"]
    assert summary["changes"] >= 3
    assert summary["gateway_exit_code"] == 0
