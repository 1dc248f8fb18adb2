"""A load client that notices every failed connection: the counterpart of `echo_server.py`.

Run inside a pod netns as a script; it needs nothing but the standard library:

    python3 sim/load.py requests HOST PORT [--concurrency 4] [--path /1k.bin]
    python3 sim/load.py streams HOST PORT [--connections 3] [--seconds S] [--interval 0.1]

`requests` keeps `--concurrency` clients busy, each making one HTTP/1.1 request per new TCP
connection (`Connection: close`: every request is a connect, which is what a proxy upgrade could
drop), until its stdin closes.  A request counts as served when the response is a complete
`200` (the whole `Content-Length` body, then the server's close); anything else (refused, reset,
a 5 s stall, a short body) is a failure, with when and why.

`streams` opens `--connections` long-lived connections to a TCP echo server at once and sends one
line every `--interval` seconds, checking each echo, for `--seconds` or (without it) until its
stdin closes, then closes them: connections that must survive whatever happens to the proxy
meanwhile.

Both print one JSON document on stdout when done (times are `time.time()`, so a caller on the
same machine can line them up with its own):

    requests: {"served": N, "failed": K, "errors": [[t, "why"], ...first 20], "ends": [t, ...]}
    streams:  {"streams": [{"ok": bool, "error": str, "started": t, "ended": t, "lines": n}]}
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

TIMEOUT = 5.0


def _request(host: str, port: int, path: str) -> None:
    """One request on its own connection; raises with the reason when it was not served."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200"):
        raise ValueError(f"response {lines[0][:60]!r} ({len(data)} bytes)")
    length = next((int(line.split(b":")[1]) for line in lines[1:]
                   if line.lower().startswith(b"content-length:")), None)  # fmt: skip
    if length is None or len(body) != length:
        raise ValueError(f"body of {len(body)} bytes, Content-Length {length}")


def run_requests(host: str, port: int, concurrency: int, path: str) -> dict[str, object]:
    stop = threading.Event()
    lock = threading.Lock()
    ends: list[float] = []
    errors: list[tuple[float, str]] = []

    def client() -> None:
        while not stop.is_set():
            try:
                _request(host, port, path)
            except (OSError, ValueError) as exc:
                with lock:
                    errors.append((time.time(), f"{type(exc).__name__}: {exc}"))
                continue
            with lock:
                ends.append(time.time())

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    sys.stdin.read()  # until the caller closes our stdin
    stop.set()
    for thread in threads:
        thread.join(TIMEOUT + 1)
    with lock:
        return {"served": len(ends), "failed": len(errors), "errors": errors[:20], "ends": ends}


def _stream(host: str, port: int, stop: threading.Event, interval: float) -> dict[str, object]:
    started = time.time()
    lines = 0
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            reader = sock.makefile("rb")
            while not stop.is_set():
                line = f"line {lines} of a long-lived connection\n".encode()
                sock.sendall(line)
                echoed = reader.readline()
                if echoed != line:
                    raise ValueError(f"echo {echoed[:60]!r} for line {lines}")
                lines += 1
                time.sleep(interval)
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "started": started,
                "ended": time.time(), "lines": lines}  # fmt: skip
    return {"ok": True, "error": "", "started": started, "ended": time.time(), "lines": lines}


def run_streams(host: str, port: int, connections: int, seconds: float | None,
                interval: float) -> dict[str, object]:  # fmt: skip
    results: list[dict[str, object]] = [{} for _ in range(connections)]
    stop = threading.Event()

    def one(i: int) -> None:
        results[i] = _stream(host, port, stop, interval)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    if seconds is None:
        sys.stdin.read()  # until the caller closes our stdin
    else:
        time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {"streams": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    req = sub.add_parser("requests")
    req.add_argument("host")
    req.add_argument("port", type=int)
    req.add_argument("--concurrency", type=int, default=4)
    req.add_argument("--path", default="/1k.bin")
    streams = sub.add_parser("streams")
    streams.add_argument("host")
    streams.add_argument("port", type=int)
    streams.add_argument("--connections", type=int, default=3)
    streams.add_argument("--seconds", type=float, default=None)
    streams.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    if args.mode == "requests":
        result = run_requests(args.host, args.port, args.concurrency, args.path)
    else:
        result = run_streams(args.host, args.port, args.connections, args.seconds, args.interval)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
