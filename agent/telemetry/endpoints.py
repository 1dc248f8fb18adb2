"""The HTTP endpoints of a Ferry process on its localhost metrics address.

    /metrics   Prometheus exposition of the process's registry
    /healthz   200 "ok" while the process serves (`alive()`), else 503 with why
    /readyz    200 "ready" once it can do its job (`ready()`), else 503 with why

`alive` and `ready` return "" when fine, else the reason, which is the body of the 503: a
probe's log then says what is wrong.  One thread per request (wsgiref, as prometheus_client's
own server), request lines not logged.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

Probe = Callable[[], str]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def application(registry: CollectorRegistry, alive: Probe, ready: Probe) -> Callable[..., Any]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        probe = {"/healthz": (alive, b"ok\n"), "/readyz": (ready, b"ready\n")}.get(path)
        if probe is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        why = probe[0]()
        status = "503 Service Unavailable" if why else "200 OK"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{why}\n".encode() if why else probe[1]]

    return app


def serve(
    host: str, port: int, registry: CollectorRegistry, alive: Probe, ready: Probe
) -> WSGIServer:
    """Bind and serve in a daemon thread; the caller shuts it down (`shutdown`,
    `server_close`)."""
    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, application(registry, alive, ready), server_class, _Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
