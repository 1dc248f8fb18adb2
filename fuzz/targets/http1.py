"""The HTTP/1.1 inspector (`agent.proxy.http1`) between a client and a server.

Input: the reads, alternately from the client and from the server.  Every request is decided
as the proxy decides it (`agent.proxy.request_policy`): its path normalized (`normalize_path`;
a path that does not normalize is denied 400), denied 403 when the path holds "deny", else
allowed with a header set, one removed and the normalized path.  Contract: the inspector raises
nothing (malformed traffic is a ProtocolError event), nothing comes after a ProtocolError, and
what it sends upstream is what the client sent plus the few bytes each decision adds.
"""

from __future__ import annotations

from agent.policy.facts import normalize_path
from agent.proxy.http1 import (
    MAX_HELD,
    Event,
    Forward,
    Http1Inspector,
    LocalReply,
    Opaque,
    ProtocolError,
    RequestHead,
)
from agent.proxy.http1_framing import MAX_HEAD
from fuzz.harness import main
from fuzz.inputs import join, reads

_PER_REQUEST = 64  # what `allow` may add to a head: the header set and a longer path


class _Proxy:
    """The owner of the inspector, as `agent.proxy.inspected` handles its events."""

    def __init__(self) -> None:
        self.inspector = Http1Inspector()
        self.upstream = 0  # bytes sent to the server
        self.requests = 0
        self.done = False  # opaque, or the connection is closing

    def handle(self, events: list[Event]) -> None:
        for event in events:
            assert not self.done, f"{event!r} after the end"
            if isinstance(event, RequestHead):
                self.requests += 1
                if not self._decide(event):
                    return  # the rest of the events are void
            elif isinstance(event, Forward):
                self.upstream += len(event.data) if event.to_server else 0
            elif isinstance(event, Opaque):
                self.upstream += len(event.to_server)
                self.done = True
            else:
                assert isinstance(event, LocalReply | ProtocolError)
                self.done = True

    def _decide(self, head: RequestHead) -> bool:
        path = head.path or head.target
        normal = path if head.method == "CONNECT" or path == "*" else normalize_path(path)
        if normal is None or "deny" in path:
            self.inspector.deny(head.request_id, b"HTTP/1.1 403 Forbidden\r\n\r\n")
            self.done = True
            return False
        sent = self.inspector.allow(
            head.request_id, ("cookie",), (("x-ferry", "1"),), normal if normal != path else ""
        )
        self.upstream += len(sent)
        return True


def check(data: bytes) -> None:
    proxy = _Proxy()
    inspector = proxy.inspector
    client = 0
    for i, read in enumerate(reads(data)):
        if i % 2 == 0:
            client += len(read)
            proxy.handle(inspector.client_data(read))
        else:
            proxy.handle(inspector.server_data(read))
        if proxy.done:
            return
        assert len(inspector._req_head.buf) < MAX_HEAD and len(inspector._resp_head.buf) < MAX_HEAD
        assert len(inspector._held or b"") <= MAX_HELD
        assert proxy.upstream <= client + _PER_REQUEST * proxy.requests


def seeds() -> dict[str, bytes]:
    get = b"GET /a/./b%41?q=1 HTTP/1.1\r\nHost: web\r\nCookie: c=1\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    chunked_request = (
        b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"
    )
    chunked_response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    return {
        "get": join([get, ok]),
        "pipelined": join([get + b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n", ok + ok[:-2]]),
        "post-content-length": join([b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", ok]),
        "chunked": join([chunked_request[:70], b"", chunked_request[70:], chunked_response]),
        "split-head": join([get[:20], b"", get[20:], ok]),
        "close-delimited": join(
            [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\nx"]
        ),
        "upgrade": join(
            [
                b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\nearly",
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n",
            ]
        ),
        "upgrade-refused": join(
            [
                b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ]
        ),
        "connect": join([b"CONNECT web:443 HTTP/1.1\r\nHost: web:443\r\n\r\n", ok[:17] + b"\r\n"]),
        "options-star-absolute": join(
            [
                b"OPTIONS * HTTP/1.1\r\nHost: web\r\n\r\n"
                b"GET http://web/deny HTTP/1.1\r\nHost: web\r\n\r\n",
                ok,
            ]
        ),
        "continue": join([get, b"HTTP/1.1 100 Continue\r\n\r\n" + ok]),
        "smuggling": join(
            [
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
            ]
        ),
        "bare-lf": join([b"GET / HTTP/1.1\nHost: a\n\n"]),
        "bad-path": join([b"GET /%00/../x HTTP/1.1\r\nHost: a\r\n\r\n"]),
        "bad-chunk-size": join([chunked_request.replace(b"5;", b"x5;"), ok]),
    }


if __name__ == "__main__":
    main(check)
