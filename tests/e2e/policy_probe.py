"""Run inside a pod: the clients of the policy end-to-end tests (tests/e2e/test_policy.py).

Targets are `HOST,PORT` (IPv6 hosts unbracketed).  Every command prints JSON on stdout.

    tcp TARGET...          one connection each: send "ping", expect the echo; prints a list of
                           "ok" | "reset" | "eof" | "refused" | "timeout" | "error: ..."
    hold TARGET...         keep one connection to each echo server open; prints "ready" once all
                           echo, then, until stdin ends, notes when (time.time()) and how each
                           one is closed by the other side; at stdin's end pings the ones still
                           open and prints {target: {"closed_at", "how", "echo_after"}}
    watch TARGET...        connect to each target in turn, over and over (a new connection
                           every time); prints "ready" after a round where all echo, then
                           {target: time.time() of its first refused connection} once every
                           target refused one (or 10 s passed: null for those that never did)
    load URL...            GET the URLs in turn until stdin ends, alternating a fresh connection
                           and one kept alive; prints {"ok": n, "failed": [why, ...]} (a
                           failure: anything but 200)
    burst HOST PORT PATH N open N connections at once; prints "open"; on a line on stdin sends
                           one request (`Connection: close`) on each, all before reading any;
                           prints [[status, {header: value}], ...] in connection order
    grpc-server ADDR       a gRPC server (grpcio, bytes in and out, no protobuf) with the
                           methods /shop.Api/Get and /shop.Api/Delete answering b"ok:" + request
    grpc ADDR METHOD...    call each method of shop.Api once; prints ["Get ok:x",
                           "Delete PERMISSION_DENIED <details>", ...]
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import sys
import threading
import time
from typing import Any

TIMEOUT = 10.0  # generous: a loaded machine is slow, and a denial is a reset, not a wait


def target(text: str) -> tuple[str, int]:
    host, port = text.rsplit(",", 1)
    return host, int(port)


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    return f"error: {type(exc).__name__}: {exc}"


def ping(address: tuple[str, int]) -> str:
    try:
        with socket.create_connection(address, timeout=TIMEOUT) as sock:
            sock.sendall(b"ping")
            data = sock.recv(100)
    except OSError as exc:
        return classify(exc)
    return "ok" if data == b"ping" else "eof" if not data else f"error: got {data!r}"


def cmd_tcp(args: list[str]) -> Any:
    return [ping(target(a)) for a in args]


def cmd_hold(args: list[str]) -> Any:
    socks = {a: socket.create_connection(target(a), timeout=TIMEOUT) for a in args}
    for sock in socks.values():
        sock.sendall(b"hello")
        if sock.recv(100) != b"hello":
            raise SystemExit("no echo before the change")
        sock.setblocking(False)
    print("ready", flush=True)
    closed: dict[str, tuple[float, str]] = {}
    while True:
        watched = [s for a, s in socks.items() if a not in closed]
        readable, _, _ = select.select([sys.stdin, *watched], [], [])
        now = time.time()
        if sys.stdin in readable and not sys.stdin.readline():
            break
        for name, sock in socks.items():
            if sock in readable:
                try:
                    data = sock.recv(100)
                    how = "eof" if not data else f"unexpected {data!r}"
                except OSError as exc:
                    how = classify(exc)
                closed[name] = (now, how)
    result = {}
    for name, sock in socks.items():
        echo = False
        if name not in closed:
            sock.setblocking(True)
            sock.settimeout(TIMEOUT)
            try:
                sock.sendall(b"after")
                echo = sock.recv(100) == b"after"
            except OSError:
                pass
        at, how = closed.get(name, (None, ""))
        result[name] = {"closed_at": at, "how": how, "echo_after": echo}
        sock.close()
    return result


def cmd_watch(args: list[str]) -> Any:
    targets = [target(a) for a in args]
    while not all(ping(t) == "ok" for t in targets):
        time.sleep(0.01)
    print("ready", flush=True)
    first: dict[str, float | None] = dict.fromkeys(args)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and None in first.values():
        for name, address in zip(args, targets, strict=True):
            if first[name] is None and ping(address) != "ok":
                first[name] = time.time()
    return first


def cmd_load(urls: list[str]) -> Any:
    ok, failed = 0, []
    kept: dict[str, http.client.HTTPConnection] = {}
    stop = threading.Event()

    def wait_for_stdin_end() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin_end, daemon=True).start()
    print("started", flush=True)
    n = 0
    while not stop.is_set():
        url = urls[n % len(urls)]
        fresh = (n // len(urls)) % 2 == 0
        n += 1
        host_port, path = url.removeprefix("http://").split("/", 1)
        host, port = host_port.rsplit(":", 1)
        conn = kept.get(url) if not fresh else None
        if conn is None:
            conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=TIMEOUT)
        try:
            conn.request("GET", "/" + path)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                ok += 1
            else:
                failed.append(f"{url} ({'fresh' if fresh else 'kept'}): {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            failed.append(f"{url} ({'fresh' if fresh else 'kept'}): {classify(exc)}")
            conn.close()
            kept.pop(url, None)
            continue
        if fresh:
            conn.close()
        else:
            kept[url] = conn
    return {"ok": ok, "failed": failed}


def cmd_burst(args: list[str]) -> Any:
    host, port, path, n = args[0], int(args[1]), args[2], int(args[3])
    socks: list[socket.socket | str] = ["not connected"] * n

    def connect(i: int) -> None:
        try:
            socks[i] = socket.create_connection((host, port), timeout=TIMEOUT)
        except OSError as exc:
            socks[i] = f"connect: {classify(exc)}"

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("open", flush=True)
    sys.stdin.readline()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    for sock in socks:
        if not isinstance(sock, str):
            sock.sendall(request)
    answers: list[list[Any]] = []
    for sock in socks:
        if isinstance(sock, str):
            answers.append([sock, {}])
            continue
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            answers.append([classify(exc), {}])
            continue
        finally:
            sock.close()
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        fields = (line.split(": ", 1) for line in head[1:] if ": " in line)
        headers = {name.lower(): value for name, value in fields}
        answers.append([head[0].split(" ")[1] if " " in head[0] else head[0], headers])
    return answers


def cmd_grpc_server(args: list[str]) -> Any:
    from concurrent import futures

    import grpc  # type: ignore[import-untyped]

    def answer(request: bytes, context: Any) -> bytes:
        return b"ok:" + request

    handler = grpc.method_handlers_generic_handler(
        "shop.Api",
        {name: grpc.unary_unary_rpc_method_handler(answer) for name in ("Get", "Delete")},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(args[0])
    server.start()
    server.wait_for_termination()
    return None


def cmd_grpc(args: list[str]) -> Any:
    import grpc

    out = []
    with grpc.insecure_channel(args[0]) as channel:
        for method in args[1:]:
            call = channel.unary_unary(f"/shop.Api/{method}")
            try:
                out.append(f"{method} {call(b'x', timeout=5).decode()}")
            except grpc.RpcError as exc:
                out.append(f"{method} {exc.code().name} {exc.details()}")
    return out


COMMANDS = {
    "tcp": cmd_tcp,
    "hold": cmd_hold,
    "watch": cmd_watch,
    "load": cmd_load,
    "burst": cmd_burst,
    "grpc-server": cmd_grpc_server,
    "grpc": cmd_grpc,
}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]](sys.argv[2:])), flush=True)
