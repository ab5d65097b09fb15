"""The metrics HTTP endpoint: ``GET /metrics`` answers the Prometheus text format (OpenMetrics
when asked, gzip when accepted); every other path answers 404 with a line saying where the
metrics are, so an HTTP health probe aimed at this port by mistake fails instead of passing."""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

METRICS_PATH = "/metrics"


def metrics_app(registry):
    """A WSGI app serving ``registry`` at /metrics only."""
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path not in (METRICS_PATH, METRICS_PATH + "/"):
            return _text(start_response, "404 Not Found",
                         f"not found: {path[:200]}; metrics are at {METRICS_PATH}\n")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _text(start_response, "405 Method Not Allowed",
                         f"{METRICS_PATH} answers GET only\n", [("Allow", "GET, HEAD")])
        return metrics(environ, start_response)

    return app


def _text(start_response, status: str, text: str, headers=()):
    body = text.encode("utf-8", "replace")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass  # one line per scrape is noise


def start_metrics_server(host: str, port: int, registry) -> WSGIServer:
    """Serve ``registry`` on ``host:port`` from a daemon thread; return the server.

    RuntimeError naming the port when it cannot bind (taken, not allowed, bad address).
    """
    host = host.strip("[]")
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

        class Server(_Server):
            address_family = family

        server = make_server(sockaddr[0], port, metrics_app(registry), Server,
                             handler_class=_QuietHandler)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RuntimeError(
            f"metrics port {port} on {host}: {reason} (choose another with --metrics-port, "
            f"0 for any free port, or -1 to turn metrics off)") from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
