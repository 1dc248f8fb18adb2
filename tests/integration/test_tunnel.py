"""The mTLS tunnel between two real worker processes, over a real veth, with Ferry's real rules.

    pod A netns (10.79.0.1/30)  <--veth-->  pod B netns (10.79.0.2/30)
    worker "node a" serves A             worker "node b" serves B

Both namespaces get the production iptables rules (`IptablesRedirection.apply`) when enrolled.
Credentials come from `agent.identity`: a root CA and one node signer per node in a tmp dir,
workload certificates minted from them and handed to the workers as `SetCertificate` messages; both
workers get the same `SetTrust` and directory (`agent.proxy.messages`). Namespaces
(`ferry-t<run>-<hex>-a|b`) and processes are removed at the end, also when a test fails. Traffic
only flows between these two namespaces.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hpack
import pytest

from agent.config import ProxyConfig, RedirectionConfig
from agent.directory import DirectoryEntry, plan_update
from agent.identity.ca import init_ca, issue_node
from agent.identity.certs import NodeSigner, WorkloadCertificate
from agent.netns import entered
from agent.proxy.messages import COUNTERS, SetCertificate, SetTrust, Stats, UpdateDirectory
from agent.tunnel.connection import EPOLLIN, EPOLLOUT, Buffers, TunnelConn
from agent.tunnel.events import ConnectionEnded, Data, StreamAccepted, TunnelProtocolError
from agent.tunnel.floods import DEFAULT
from agent.tunnel.frames import (
    CONTINUATION,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    HEADERS,
    PING,
    PREFACE,
    frame_header,
    settings_frame,
)
from agent.tunnel.hbone import HboneConnection
from agent.tunnel.stream import TunnelStream
from agent.tunnel.tls import client_context, server_context, worker_environment

from .netns_pair import (
    HTTP_PORT,
    REPO,
    NetnsPair,
    curl,
    needs_netns,
    request,
    send_policy,
    serve_digest,
    stats,
    wait_stats,
)

A_IP = "10.79.0.1"
B_IP = "10.79.0.2"
TD = "cluster.local"
ID_A = f"spiffe://{TD}/ns/front/sa/web"
ID_B = f"spiffe://{TD}/ns/back/sa/api"
ECHO_PORT = 7000

pytestmark = needs_netns


class Credentials:
    """A CA (trust domain TD) with one node signer per node, plus a foreign CA."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        init_ca(tmp / "ca", TD)
        self.signers: dict[str, NodeSigner] = {}
        for node in ("a", "b"):
            issue_node(tmp / "ca", f"node-{node}", tmp / f"node-{node}")
            self.signers[node] = NodeSigner.load(tmp / f"node-{node}", TD)
        init_ca(tmp / "other-ca", "other.local")
        issue_node(tmp / "other-ca", "node-x", tmp / "node-x")
        self.foreign = NodeSigner.load(tmp / "node-x", "other.local")

    @property
    def bundle(self) -> bytes:
        return self.signers["a"].bundle_pem

    def mint(self, node: str, ns: str, sa: str, **kw: Any) -> WorkloadCertificate:
        return self.signers[node].mint(ns, sa, kw.pop("ttl", 3600.0), **kw)


class Env(NetnsPair):
    """Pods A and B, enrolled with the production rules, and the processes started in them."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(
            tmp,
            ("a", "b"),
            (A_IP, B_IP),
            RedirectionConfig(ipv6=False),
            ProxyConfig(connect_timeout=3.0, idle_timeout=60.0),
        )
        self.a, self.b = self.names
        self.a_fd, self.b_fd = self.netns_fds
        with self.closed_on_error():
            self.creds = Credentials(tmp)

    def worker(self, uid: str, netns_fd: int, **add: Any) -> socket.socket:
        ours = self.start_worker(env=worker_environment())  # as the supervisor starts them
        self.add_workload(ours, uid, netns_fd, **add)
        bundle = self.trust_bundle()
        request(ours, lambda seq: SetTrust(seq, TD, bundle))
        send_directory(ours, 1, self.directory(), "passthrough")
        return ours

    def trust_bundle(self) -> str:
        # Two roots, as during a CA rotation: ours and the foreign trust domain's.
        return (self.creds.bundle + self.creds.foreign.bundle_pem).decode()

    def directory(self) -> list[DirectoryEntry]:
        return [DirectoryEntry(A_IP, ID_A, "node-a"), DirectoryEntry(B_IP, ID_B, "node-b")]


def send_directory(
    ctl: socket.socket, version: int, entries: list[DirectoryEntry], egress: str
) -> None:
    """A whole directory as the supervisor sends it: a reset to `version`, in chunks."""
    for chunk in plan_update(version, 0, egress, entries, (), reset=True):
        request(ctl, lambda seq, chunk=chunk: UpdateDirectory(seq, chunk))  # type: ignore[misc]


def send_cert(ctl: socket.socket, uid: str, cert: WorkloadCertificate) -> None:
    chain, key = cert.chain_pem.decode(), cert.key_pem.decode()
    not_after = cert.not_after.timestamp()
    request(ctl, lambda seq: SetCertificate(seq, uid, chain, key, not_after))


def flow(
    s: Stats, uid: str, direction: str, security: str, peer: str | None = None
) -> dict[str, int]:
    """The counters of (direction, security[, peer]), summed over peers if not given, with
    `denied` the denials of every reason; {} when there is no such flow."""
    found = [
        f
        for f in s.flows.get(uid, ())
        if f.direction == direction
        and f.security == security
        and (peer is None or f.peer_identity == peer)
    ]
    if not found:
        return {}
    merged: dict[str, int] = {}
    for f in found:
        for key in (*COUNTERS, "denied"):
            value = f.denied_total if key == "denied" else getattr(f, key)
            merged[key] = merged.get(key, 0) + value
    return merged


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Env(tmp_path) as e:
        yield e


def mesh(env: Env, b_mode: str = "permissive") -> tuple[socket.socket, socket.socket]:
    """Both pods enrolled, with certificates: worker for A, worker for B."""
    env.enroll(env.a)
    env.enroll(env.b)
    ctl_a = env.worker("a", env.a_fd, identity=ID_A, mode="permissive", ips=(A_IP,),
                       namespace="front")  # fmt: skip
    ctl_b = env.worker("b", env.b_fd, identity=ID_B, mode=b_mode, ips=(B_IP,), namespace="back")
    send_cert(ctl_a, "a", env.creds.mint("a", "front", "web"))
    send_cert(ctl_b, "b", env.creds.mint("b", "back", "api"))
    stats(ctl_a)
    stats(ctl_b)
    return ctl_a, ctl_b


def test_curl_goes_through_the_tunnel_encrypted(env: Env) -> None:
    assert shutil.which("tcpdump"), "tcpdump is missing (Debian package tcpdump, `make setup`)"
    ctl_a, ctl_b = mesh(env, b_mode="strict")
    env.http_server()
    pcap = env.tmp / "veth.pcap"
    dump = env.spawn(
        env.a,
        "tcpdump",
        "-i",
        "veth0",
        "-U",
        "--immediate-mode",
        "-n",
        "-s",
        "0",
        "-Z",
        "root",
        "-w",
        str(pcap),
        "tcp",
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # tcpdump attaches
    marker = "ferry-plaintext-marker-" + secrets.token_hex(8)
    out = curl(env.a, f"http://{B_IP}:{HTTP_PORT}/{marker}")
    time.sleep(0.5)
    dump.send_signal(signal.SIGINT)
    _, err = dump.communicate(timeout=10)
    assert out.returncode == 0, out.stderr
    assert b"packets captured" in err, err
    assert out.stdout == A_IP  # the app in B sees pod A's IP, through two proxies
    raw = pcap.read_bytes()
    assert marker.encode() not in raw
    assert b"\x16\x03\x01" in raw or b"\x16\x03\x03" in raw  # TLS handshake records
    assert (15008).to_bytes(2, "big") in raw
    s_a = wait_stats(
        ctl_a, lambda s: flow(s, "a", "outbound", "mtls").get("connections_closed") == 1
    )
    fa = flow(s_a, "a", "outbound", "mtls", ID_B)
    assert fa and fa["connect_failures"] == 0
    assert fa["bytes_received"] > len(marker) and fa["bytes_sent"] > len(A_IP)
    assert s_a.totals("a", "outbound")["connections_opened"] == 1
    assert s_a.tunnel.handshakes == 1 and s_a.tunnel.pooled_connections == 1
    s_b = wait_stats(
        ctl_b, lambda s: flow(s, "b", "inbound", "mtls").get("connections_closed") == 1
    )
    fb = flow(s_b, "b", "inbound", "mtls", ID_A)
    assert fb  # the identity node A's CA minted, from the handshake
    assert fb["bytes_received"] == fa["bytes_received"] and fb["bytes_sent"] == fa["bytes_sent"]
    assert not flow(s_b, "b", "inbound", "plaintext")


def _attempt(env: Env, cert: WorkloadCertificate | None) -> str:
    """From pod A's netns (unmarked, bypassing A's proxy): TLS to B:15008 and one CONNECT."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        (env.tmp / "c.crt").write_bytes(cert.chain_pem)
        (env.tmp / "c.key").write_bytes(cert.key_pem)
        ctx.load_cert_chain(env.tmp / "c.crt", env.tmp / "c.key")
    with entered(env.a_fd):
        raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, env.redirection.mark)  # not captured
    raw.settimeout(5)
    raw.connect((B_IP, env.redirection.tunnel_port))
    try:
        tls = ctx.wrap_socket(raw)
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return f"handshake failed: {exc}"
    with tls:
        core = HboneConnection(client=True)
        core.open_stream(f"{B_IP}:{ECHO_PORT}")
        try:
            tls.sendall(core.data_to_send())
            while True:
                data = tls.recv(65536)
                if not data:
                    return "closed"
                for ev in core.receive(data):
                    if isinstance(ev, StreamAccepted):
                        return "accepted"
                tls.sendall(core.data_to_send())
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc}"


def test_clients_without_a_valid_certificate_are_refused(env: Env) -> None:
    _ctl_a, ctl_b = mesh(env)
    with entered(env.b_fd):
        srv = socket.create_server((B_IP, ECHO_PORT))
    with srv:
        creds = env.creds
        # The control: a proper certificate from the mesh CA is accepted.
        assert _attempt(env, creds.mint("a", "front", "web")) == "accepted"
        self_signed = _self_signed(env.tmp)
        expired = creds.mint(
            "a", "front", "web", ttl=3600.0, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        )
        foreign = creds.foreign.mint("front", "web", 3600.0)  # trusted root, other trust domain
        cases = {"none": None, "self-signed": self_signed, "expired": expired, "foreign": foreign}
        for name, cert in cases.items():
            result = _attempt(env, cert)
            assert result != "accepted", name
        srv.settimeout(0.5)
        accepted = 0
        try:
            while True:
                conn, _ = srv.accept()
                conn.close()
                accepted += 1
        except TimeoutError:
            pass
        assert accepted == 1  # only the control reached the app
    s = wait_stats(ctl_b, lambda s: flow(s, "b", "inbound", "mtls", "").get("denied", 0) >= 4)
    assert s.tunnel.handshakes == 1


def _self_signed(tmp: Path) -> WorkloadCertificate:
    from agent.identity.ca import init_ca as make_root

    init_ca_dir = tmp / "rogue-ca"
    make_root(init_ca_dir, TD)
    issue_node(init_ca_dir, "rogue", tmp / "rogue")
    return NodeSigner.load(tmp / "rogue", TD).mint("front", "web", 3600.0)


def test_strict_mode_keeps_plaintext_away_from_the_app(env: Env) -> None:
    env.enroll(env.b)  # A is not in the mesh: no rules, no proxy
    ctl_b = env.worker("b", env.b_fd, identity=ID_B, mode="strict", ips=[B_IP])
    send_cert(ctl_b, "b", env.creds.mint("b", "back", "api"))
    with entered(env.b_fd):
        srv = socket.create_server((B_IP, ECHO_PORT))
    with srv:
        with entered(env.a_fd):
            cli = socket.socket()
        with cli:
            cli.settimeout(5)
            with pytest.raises(OSError):
                cli.connect((B_IP, ECHO_PORT))
                cli.sendall(b"plaintext")
                assert cli.recv(10) == b""
                cli.sendall(b"again")
                cli.recv(10)
        srv.settimeout(0.5)
        with pytest.raises(TimeoutError):
            srv.accept()
    s = wait_stats(ctl_b, lambda s: flow(s, "b", "inbound", "plaintext").get("denied") == 1)
    assert flow(s, "b", "inbound", "plaintext")["connections_opened"] == 0


def _echo_server(env: Env) -> tuple[socket.socket, list[str]]:
    with entered(env.b_fd):
        srv = socket.create_server((B_IP, ECHO_PORT))
    peers: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, peer = srv.accept()
            except OSError:
                return
            peers.append(peer[0])
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, peers


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _connect(env: Env) -> socket.socket:
    with entered(env.a_fd):
        cli = socket.socket()
    cli.settimeout(10)
    cli.connect((B_IP, ECHO_PORT))
    return cli


def _roundtrip(cli: socket.socket, data: bytes) -> bytes:
    cli.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = cli.recv(65536)
        assert chunk
        got += chunk
    return got


def test_long_lived_connection_survives_certificate_rotation(env: Env) -> None:
    ctl_a, ctl_b = mesh(env)
    srv, peers = _echo_server(env)
    with srv, _connect(env) as cli:
        assert _roundtrip(cli, b"before") == b"before"
        send_cert(ctl_a, "a", env.creds.mint("a", "front", "web"))
        send_cert(ctl_b, "b", env.creds.mint("b", "back", "api"))
        stats(ctl_a)
        assert _roundtrip(cli, b"after rotation") == b"after rotation"
        # New connections use the new certificate: a new tunnel connection.
        with _connect(env) as cli2:
            assert _roundtrip(cli2, b"new") == b"new"
        assert _roundtrip(cli, b"still") == b"still"
    assert peers == [A_IP, A_IP]
    s = stats(ctl_a)
    assert s.tunnel.handshakes == 2
    assert flow(s, "a", "outbound", "mtls")["connect_failures"] == 0


def test_sequential_connections_share_one_pooled_tunnel(env: Env) -> None:
    ctl_a, ctl_b = mesh(env)
    srv, peers = _echo_server(env)
    with srv:
        for i in range(20):
            with _connect(env) as cli:
                assert _roundtrip(cli, f"req {i}".encode()) == f"req {i}".encode()
    s = wait_stats(
        ctl_a, lambda s: flow(s, "a", "outbound", "mtls").get("connections_closed") == 20
    )
    assert s.tunnel.handshakes == 1
    assert s.tunnel.pooled_connections == 1
    assert stats(ctl_b).tunnel.handshakes == 1
    assert len(peers) == 20


def test_bulk_transfer_with_half_close_through_the_tunnel(env: Env) -> None:
    """32 MiB A -> B, a digest back after A's half-close (FIN crosses as END_STREAM)."""
    ctl_a, _ctl_b = mesh(env)
    with entered(env.b_fd):
        srv = socket.create_server((B_IP, ECHO_PORT))
    size = 32 << 20
    block = os.urandom(1 << 20)
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    thread, result = serve_digest(srv)
    try:
        with _connect(env) as cli:
            for _ in range(size // len(block)):
                cli.sendall(block)
            cli.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := cli.recv(1000):
                answer += chunk
    finally:
        thread.join(30)
        srv.close()
    assert answer.decode() == f"{size} {expected}"
    assert result["peer"] == A_IP
    s = wait_stats(ctl_a, lambda s: s.active == 0)
    fa = flow(s, "a", "outbound", "mtls")
    assert fa["bytes_received"] == size and fa["bytes_sent"] == len(answer)


def test_app_reset_crosses_the_tunnel(env: Env) -> None:
    ctl_a, _ctl_b = mesh(env)
    with entered(env.b_fd):
        srv = socket.create_server((B_IP, ECHO_PORT))
    with srv, _connect(env) as cli:
        srv.settimeout(5)
        conn, _ = srv.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST from the app in B
        with pytest.raises(ConnectionResetError):
            cli.recv(10)
    wait_stats(ctl_a, lambda s: s.tunnel.streams == 0)


def test_destination_outside_the_directory(env: Env) -> None:
    ctl_a, _ctl_b = mesh(env)
    env.http_server()
    entries = [DirectoryEntry(A_IP, ID_A, "node-a")]  # B is not in the mesh now
    send_directory(ctl_a, 2, entries, "passthrough")
    out = curl(env.a, f"http://{B_IP}:{HTTP_PORT}/")
    assert out.returncode == 0 and out.stdout == A_IP, out.stderr
    s = stats(ctl_a)
    assert flow(s, "a", "outbound", "plaintext")["connections_opened"] == 1
    send_directory(ctl_a, 3, entries, "refuse")
    out = curl(env.a, f"http://{B_IP}:{HTTP_PORT}/")
    assert out.returncode != 0
    s = wait_stats(ctl_a, lambda s: flow(s, "a", "outbound", "plaintext").get("denied") == 1)
    assert not flow(s, "a", "outbound", "mtls")


def test_stream_to_a_foreign_address_is_refused(env: Env) -> None:
    _ctl_a, ctl_b = mesh(env)
    ctx_cert = env.creds.mint("a", "front", "web")
    # A CONNECT for an address that is not pod B's own: 403, never connected.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    (env.tmp / "c.crt").write_bytes(ctx_cert.chain_pem)
    (env.tmp / "c.key").write_bytes(ctx_cert.key_pem)
    ctx.load_cert_chain(env.tmp / "c.crt", env.tmp / "c.key")
    with entered(env.a_fd):
        raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, env.redirection.mark)
    raw.settimeout(5)
    raw.connect((B_IP, env.redirection.tunnel_port))
    with ctx.wrap_socket(raw) as tls:
        core = HboneConnection(client=True)
        core.open_stream(f"127.0.0.1:{ECHO_PORT}")
        tls.sendall(core.data_to_send())
        status = None
        while status is None:
            data = tls.recv(65536)
            assert data
            for ev in core.receive(data):
                assert not isinstance(ev, StreamAccepted | Data)
                status = getattr(ev, "status", None) or status
            tls.sendall(core.data_to_send())
    assert status == 403
    wait_stats(ctl_b, lambda s: flow(s, "b", "inbound", "mtls").get("denied") == 1)


CIPHER_CHECK = """
import socket, ssl, sys, threading
from pathlib import Path
from agent.tunnel.tls import client_context, server_context
d = Path(sys.argv[1])
def read(name): return (d / name).read_bytes()
cli = client_context(read("a.chain"), read("a.key"), read("bundle"))
srv = server_context(read("b.chain"), read("b.key"), read("bundle"))
x, y = socket.socketpair()
t = threading.Thread(target=lambda: srv.wrap_socket(y, server_side=True).recv(1))
t.start()
c = cli.wrap_socket(x, server_hostname=None)
c.send(b"x")
t.join()
print(c.cipher()[0])
"""


def test_workers_negotiate_aes_128_gcm(tmp_path: Path) -> None:
    """Workers run with Ferry's OPENSSL_CONF, so the tunnel uses TLS_AES_128_GCM_SHA256 (as
    Envoy) instead of OpenSSL's default first choice, TLS_AES_256_GCM_SHA384."""
    creds = Credentials(tmp_path)
    for node, ns in (("a", "front"), ("b", "back")):
        cert = creds.mint(node, ns, "web")
        (tmp_path / f"{node}.chain").write_bytes(cert.chain_pem)
        (tmp_path / f"{node}.key").write_bytes(cert.key_pem)
    (tmp_path / "bundle").write_bytes(creds.bundle)
    run = [sys.executable, "-c", CIPHER_CHECK, str(tmp_path)]
    ours = subprocess.run(run, env=worker_environment(), cwd=REPO, capture_output=True, text=True)
    assert ours.stdout.strip() == "TLS_AES_128_GCM_SHA256", ours.stderr
    default = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    plain = subprocess.run(run, env=default, cwd=REPO, capture_output=True, text=True)
    assert plain.stdout.strip() == "TLS_AES_256_GCM_SHA384", plain.stderr


# -- one tunnel connection in this process, against a hostile TLS peer ------------------------


class _Host:
    """The `Host` of a server `TunnelConn` that the test drives itself (no worker)."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.requests: list[int] = []

    def watch(self, fd: int, old: int, new: int) -> None:
        pass

    def tunnel_ready(self, conn: TunnelConn) -> None:
        pass

    def tunnel_request(self, conn: TunnelConn, stream_id: int, authority: str) -> None:
        self.requests.append(stream_id)

    def tunnel_closed(self, conn: TunnelConn, reason: str) -> None:
        self.closed.append(reason)

    def stream_done(self, stream: TunnelStream) -> None:
        pass

    def flush_soon(self, conn: TunnelConn) -> None:
        pass


def _pump(conn: TunnelConn, host: _Host, timeout: float = 0.05) -> None:
    """One round of the worker's loop for `conn`: wait for its socket, handle, flush."""
    if host.closed:
        return
    bio = conn.bio
    want_out = [conn.sock] if bio is not None and bio.tx_bytes else []
    readable, writable, _ = select.select([conn.sock], want_out, [], timeout)
    if readable or writable:
        conn.on_event(conn.fd, (EPOLLIN if readable else 0) | (EPOLLOUT if writable else 0))
    if conn.flush_pending:
        conn.flush()


def _served(tmp: Path) -> tuple[TunnelConn, _Host, ssl.SSLSocket]:
    """A server TunnelConn over loopback TCP and a blocking TLS client, past the handshake."""
    creds = Credentials(tmp)
    ours, theirs = creds.mint("b", "back", "api"), creds.mint("a", "front", "web")
    server_ctx = server_context(ours.chain_pem, ours.key_pem, creds.bundle)
    client_ctx = client_context(theirs.chain_pem, theirs.key_pem, creds.bundle)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.create_connection(listener.getsockname())
        sock, _ = listener.accept()
    raw.settimeout(30)
    sock.setblocking(False)
    host = _Host()
    conn = TunnelConn(host, Buffers(), sock, server_ctx, client=False, trust_domain=TD)
    conn.start()
    client: list[ssl.SSLSocket] = []
    handshake = threading.Thread(target=lambda: client.append(client_ctx.wrap_socket(raw)))
    handshake.start()
    deadline = time.monotonic() + 10
    while (conn.core is None or handshake.is_alive()) and time.monotonic() < deadline:
        _pump(conn, host)
    handshake.join(1)
    assert conn.core is not None and client, host.closed
    return conn, host, client[0]


def _goaway_code(tls: ssl.SSLSocket) -> int | None:
    """Read what the server sent until it closed; the error code of its GOAWAY, if any."""
    core = HboneConnection(client=True)
    code = None
    try:
        while data := tls.recv(65536):
            for ev in core.receive(data):
                if isinstance(ev, ConnectionEnded):
                    code = ev.error_code
    except (OSError, TunnelProtocolError):  # a reset, or TLS ended without close_notify
        pass
    return code


def test_a_peer_that_floods_pings_without_reading_is_cut_off(tmp_path: Path) -> None:
    """Issue 8: PINGs whose acks are never read grew the send queue to 144 MB.  Now the acks
    the peer leaves unread are bounded (`floods.DEFAULT.unread_replies`, counted until the socket
    took them), the connection ends, and little ciphertext ever waits in the queue.  The PINGs
    come 500 at a time, each batch read before the next: only the unread acks add up."""
    conn, host, tls = _served(tmp_path)
    tls.sendall(PREFACE + settings_frame([]))
    pings = (frame_header(8, PING, 0, 0) + bytes(8)) * 500
    backlog = 0
    for _ in range((64 << 20) // len(pings)):  # far more acks than the socket buffers hold
        tls.sendall(pings)
        _pump(conn, host, 1.0)
        while not host.closed and select.select([conn.sock], [], [], 0)[0]:
            _pump(conn, host, 0)
        if host.closed:
            break
        assert conn.bio is not None
        backlog = max(backlog, conn.bio.backlog)
    tls.close()
    assert host.closed and "flood" in host.closed[0], host.closed
    assert backlog < 256 << 10


def test_a_header_block_left_open_ends_the_connection(tmp_path: Path) -> None:
    """Issue 8: a header block that never completes blocked the connection forever.  The core
    says it is pending; `TunnelConn.sweep` ends the connection after header_block_timeout with
    GOAWAY ENHANCE_YOUR_CALM."""
    conn, host, tls = _served(tmp_path)
    block = bytes(hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.9:80")]))

    def send_and_wait(data: bytes, until: Any) -> None:
        tls.sendall(data)
        deadline = time.monotonic() + 5
        while not until() and time.monotonic() < deadline:
            _pump(conn, host)

    # A block completed in time is fine ...
    first = PREFACE + settings_frame([]) + frame_header(3, HEADERS, 0, 1) + block[:3]
    send_and_wait(first, lambda: conn.header_block_since)
    since = conn.header_block_since
    assert since
    rest = frame_header(len(block) - 3, CONTINUATION, END_HEADERS, 1) + block[3:]
    send_and_wait(rest, lambda: host.requests)
    assert host.requests == [1] and not conn.header_block_since
    conn.sweep(since + DEFAULT.header_block_timeout)
    assert not host.closed
    # ... one left open is not.
    send_and_wait(frame_header(3, HEADERS, 0, 3) + block[:3], lambda: conn.header_block_since)
    since = conn.header_block_since
    conn.sweep(since + DEFAULT.header_block_timeout - 1)
    assert not host.closed
    conn.sweep(since + DEFAULT.header_block_timeout)
    assert host.closed and "header block" in host.closed[0]
    assert _goaway_code(tls) == ENHANCE_YOUR_CALM


PRINCIPAL_HTTP_POLICY = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web-reads, namespace: back}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{TD}/ns/front/sa/web"]}}}}]
    to: [{{operation: {{methods: ["GET"], paths: ["/public*"]}}}}]
"""

PRINCIPAL_DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-front, namespace: back}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["front"]}}]}]
"""


def test_the_destination_decides_each_tunnelled_request_by_the_source_principal(env: Env) -> None:
    ctl_a, ctl_b = mesh(env)
    env.http_server()
    send_policy(ctl_b, 1, PRINCIPAL_HTTP_POLICY)
    ok = curl(env.a, f"http://{B_IP}:{HTTP_PORT}/public/x")
    assert ok.returncode == 0 and ok.stdout == A_IP, ok.stderr  # tunnelled, the app sees A
    no = curl(env.a, f"http://{B_IP}:{HTTP_PORT}/private", "-i")
    assert no.stdout.startswith("HTTP/1.1 403"), no.stdout
    s = wait_stats(ctl_b, lambda s: flow(s, "b", "inbound", "mtls", ID_A).get("denied") == 1)
    assert any(d.policy == "back/web-reads" and d.decision == "allow" for d in s.decisions["b"])
    assert flow(stats(ctl_a), "a", "outbound", "mtls", ID_B)["connections_opened"] >= 2


def test_an_l4_deny_by_namespace_refuses_the_stream(env: Env) -> None:
    _ctl_a, ctl_b = mesh(env)
    env.http_server()
    send_policy(ctl_b, 1, PRINCIPAL_DENY)
    out = curl(env.a, f"http://{B_IP}:{HTTP_PORT}/")
    assert out.returncode != 0
    wait_stats(ctl_b, lambda s: flow(s, "b", "inbound", "mtls", ID_A).get("denied") == 1)
