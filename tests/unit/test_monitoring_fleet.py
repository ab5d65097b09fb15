"""Merging the workers' metrics into one scrape: counters and histograms add up, gauges follow
what they mean."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.monitoring.fleet import FleetCollector, announce, merge

WORKER = """\
# HELP gateway_requests Requests
# TYPE gateway_requests counter
gateway_requests_total{{model="m",version="1",code="OK"}} {ok}
# HELP gateway_request_duration_seconds Seconds
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{{model="m",version="1",le="0.1"}} {ok}
gateway_request_duration_seconds_bucket{{model="m",version="1",le="+Inf"}} {ok}
gateway_request_duration_seconds_sum{{model="m",version="1"}} 0.5
gateway_request_duration_seconds_count{{model="m",version="1"}} {ok}
# HELP gateway_inflight_requests In flight
# TYPE gateway_inflight_requests gauge
gateway_inflight_requests {inflight}
# HELP gateway_model_ready Ready
# TYPE gateway_model_ready gauge
gateway_model_ready{{model="m",version="1"}} {ready}
# HELP gateway_traffic_weight_ratio Weight
# TYPE gateway_traffic_weight_ratio gauge
gateway_traffic_weight_ratio{{model="m",version="1"}} 0.9
# EOF
"""


def values(families) -> dict:
    text = "".join(f"{s.name}{sorted(s.labels.items())} {s.value}\n"
                   for f in families for s in f.samples)
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()}


def test_counters_and_histograms_add_up_gauges_by_meaning():
    merged = values(merge([WORKER.format(ok=10, inflight=3, ready=1),
                           WORKER.format(ok=5, inflight=4, ready=0)]))
    labels = "[('code', 'OK'), ('model', 'm'), ('version', '1')]"
    assert merged[f"gateway_requests_total{labels}"] == 15
    assert merged["gateway_request_duration_seconds_count[('model', 'm'), ('version', '1')]"] == 15
    assert merged["gateway_request_duration_seconds_sum[('model', 'm'), ('version', '1')]"] == 1.0
    assert merged["gateway_inflight_requests[]"] == 7  # amounts add up
    assert merged["gateway_model_ready[('model', 'm'), ('version', '1')]"] == 0  # one not ready
    assert merged["gateway_traffic_weight_ratio[('model', 'm'), ('version', '1')]"] == 0.9


def test_the_collector_reads_announced_workers_and_says_how_many_answered(tmp_path):
    import threading
    from wsgiref.simple_server import make_server

    def app(environ, start_response):
        assert "openmetrics" in environ.get("HTTP_ACCEPT", "")
        start_response("200 OK", [("Content-Type", "application/openmetrics-text")])
        return [WORKER.format(ok=2, inflight=1, ready=1).encode()]

    server = make_server("127.0.0.1", 0, app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        announce(tmp_path, 0, server.server_address[1])  # worker 1 never announced
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(tmp_path, 2))
        text = generate_latest(registry).decode()
    finally:
        server.shutdown()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    workers = {s.labels["state"]: s.value for s in families["gateway_workers"].samples}
    assert workers == {"answering": 1, "configured": 2}
    assert families["gateway_requests"].samples[0].value == 2
