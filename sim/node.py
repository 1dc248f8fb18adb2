"""Simulated Kubernetes-like nodes: network namespaces wired by the real CNI plugins.

There is no kubelet or container runtime on the machines Ferry is developed on, so a "node" is a
network namespace and a "pod" is another network namespace, wired exactly as a runtime would wire
it: the CNI `bridge` plugin with `host-local` IPAM is run under `ip netns exec NODE`, so the
bridge, the host ends of the veths and the gateway addresses all live in the node netns.

Layout of one node (`SimNode("e2e")`)::

    netns ferry-e2e-1a2b3c              (ip_forward on, v4 and v6; no route to the host)
      bridge fbr1a2b3c  10.A.B.1/24  fd00:C::1/64      <- the pods' gateway, the "node IP"
      vethXXXX ... (one per pod, host side)
      flXXXXXXXXa  10.L.M.1/30 fd00:N::1/64            <- only if linked to another node
    netns ferry-e2e-1a2b3c-web          (a pod)
      eth0  10.A.B.2/24  fd00:C::2/64, default routes via the bridge (inside the node netns)

Nothing ever gets a route out of the machine: the node netns has no link to the host, and a
pod's default route ends at its node.  `link_nodes(a, b)` joins two nodes with a veth pair created
directly between their namespaces (never in the host's) and routes each node's pod subnets to the
other, so pods on different nodes can talk.

Subnets are unique among all live nodes on the machine, also across concurrent test runs: each
reservation is a file in `/run/ferry-sim/subnets`, taken under an flock and naming the namespaces
that own it; a reservation whose owners are gone is stale and reused.  Host routes are avoided too.

Every process started through a node or pod runs in its own session and is killed (process group,
then whatever else is still inside the namespace) on teardown.  `teardown()` is idempotent, works
on a half-built node, and is what `with SimNode(...) as node:` calls on exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

CNI_PATH = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
NETNS_DIR = Path("/var/run/netns")
REGISTRY_DIR = Path("/run/ferry-sim/subnets")
ECHO_SERVER = Path(__file__).with_name("echo_server.py")
NETNS_PREFIX = "ferry-"

_CMD_TIMEOUT = 30.0
_READY_TIMEOUT = 10.0
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SimError(RuntimeError):
    """A simulated node or pod could not be built, used or torn down; the message says why."""


def _run(argv: Sequence[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a setup command; on failure raise SimError with the command and its stderr."""
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", _CMD_TIMEOUT)
    proc = subprocess.run(list(argv), text=True, check=False, **kw)
    if check and proc.returncode != 0:
        raise SimError(
            f"`{' '.join(argv)}` failed with exit status {proc.returncode}: "
            f"{(proc.stderr or '').strip() or (proc.stdout or '').strip()}"
        )
    return proc


def _netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _delete_netns(name: str) -> None:
    """Kill whatever still runs inside the namespace, then delete it; a missing one is fine."""
    if not _netns_exists(name):
        return
    _kill_netns_pids(name)
    _run(["ip", "netns", "del", name])


def _kill_netns_pids(name: str) -> None:
    listed = _run(["ip", "netns", "pids", name], check=False)
    for word in listed.stdout.split():
        pid = int(word)
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group (every process we start leads its own), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _popen_in(netns: str, argv: Sequence[str], kw: dict[str, Any]) -> subprocess.Popen[Any]:
    kw["start_new_session"] = True  # the teardown kills by process group
    return subprocess.Popen(["ip", "netns", "exec", netns, *argv], **kw)


def _exec_in(
    netns: str, argv: Sequence[str], kw: dict[str, Any]
) -> subprocess.CompletedProcess[Any]:
    if not {"stdout", "stderr", "capture_output"} & kw.keys():
        kw["capture_output"] = True
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    kw.setdefault("check", False)
    return subprocess.run(["ip", "netns", "exec", netns, *argv], **kw)


# --- subnet reservations -------------------------------------------------------------------------


@contextlib.contextmanager
def _registry_locked() -> Iterator[Path]:
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY_DIR.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield REGISTRY_DIR


def _entry_path(registry: Path, net: IPNetwork) -> Path:
    return registry / str(net).replace("/", "_")


def _host_networks() -> list[IPNetwork]:
    """Every destination in the host's routing tables, so a sim subnet never shadows one."""
    nets: list[IPNetwork] = []
    for family in ("-4", "-6"):
        out = _run(["ip", "-j", family, "route", "show", "table", "all"], check=False).stdout
        for route in json.loads(out or "[]"):
            dst = route.get("dst", "default")
            if dst == "default":
                continue
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dst, strict=False))
    return nets


def _reserve(owners: Sequence[str], candidate: Callable[[], IPNetwork]) -> IPNetwork:
    """Reserve a fresh subnet for the namespaces `owners`; it stays taken while they all live."""
    host = _host_networks()
    with _registry_locked() as registry:
        for _ in range(1000):
            net = candidate()
            if any(_overlap(net, other) for other in host):
                continue
            entry = _entry_path(registry, net)
            if entry.exists():
                try:
                    holders = json.loads(entry.read_text())["owners"]
                except (OSError, ValueError, KeyError):
                    holders = []
                if holders and all(_netns_exists(h) for h in holders):
                    continue
            entry.write_text(json.dumps({"owners": list(owners), "pid": os.getpid()}))
            return net
    raise SimError(
        f"no free subnet found after 1000 tries; stale reservations in {REGISTRY_DIR}? "
        "(remove entries whose owners no longer exist)"
    )


def _overlap(x: IPNetwork, y: IPNetwork) -> bool:
    if isinstance(x, ipaddress.IPv4Network) and isinstance(y, ipaddress.IPv4Network):
        return x.overlaps(y)
    if isinstance(x, ipaddress.IPv6Network) and isinstance(y, ipaddress.IPv6Network):
        return x.overlaps(y)
    return False


def _release(net: IPNetwork | None) -> None:
    if net is None:
        return
    with _registry_locked() as registry:
        _entry_path(registry, net).unlink(missing_ok=True)


def _random_v4() -> IPNetwork:
    return ipaddress.ip_network(f"10.{random.randint(1, 254)}.{random.randint(0, 255)}.0/24")


def _random_v6() -> IPNetwork:
    return ipaddress.ip_network(f"fd00:{random.randint(1, 0xFFFF):x}::/64")


def _nth(net: IPNetwork, n: int) -> str:
    return str(net.network_address + n)


# --- pods ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pod:
    """One simulated pod: a netns with `eth0` on its node's bridge and real processes in it."""

    name: str
    netns: str
    ip4: str
    ip6: str
    node: SimNode = field(repr=False)
    container_id: str = field(repr=False)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    def exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` inside the pod to completion (captured text output, no check, by default)."""
        return _exec_in(self.netns, argv, kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside the pod in a new session; it is killed when the pod goes away."""
        proc = _popen_in(self.netns, argv, kw)
        self.processes.append(proc)
        return proc

    def _start_server(self, what: str, port: int, argv: Sequence[str]) -> subprocess.Popen[Any]:
        log = self.node.tmpdir / "logs" / f"{self.name}-{what}-{port}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as out:
            proc = self.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.wait_listening(port, proc=proc, log=log)
        return proc

    def seen(self, what: str, port: int) -> list[dict[str, Any]]:
        """What reached the echo server (`what`: http or tcp) on `port` so far, as it recorded
        it: one dict per request or connection."""
        log = self.node.tmpdir / "logs" / f"{self.name}-{what}-{port}.log"
        lines = log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith('{"seen"')]

    def start_http_server(self, port: int) -> subprocess.Popen[Any]:
        """`sim/echo_server.py --mode http`: answers every request with JSON naming the peer."""
        argv = [sys.executable, str(ECHO_SERVER), "--mode", "http", "--port", str(port)]
        return self._start_server("http", port, [*argv, "--name", self.name])

    def start_tcp_echo_server(self, port: int) -> subprocess.Popen[Any]:
        """`sim/echo_server.py --mode tcp`: echoes every byte back."""
        argv = [sys.executable, str(ECHO_SERVER), "--mode", "tcp", "--port", str(port)]
        return self._start_server("tcp", port, argv)

    def start_nginx(self, port: int) -> subprocess.Popen[Any]:
        """nginx on `port` (v4 and v6), keep-alive, no access log, serving small static files.

        `/` is a short text naming the pod; `/1k.bin` and `/64k.bin` are fixed-size bodies.
        """
        root = self.node.tmpdir / f"nginx-{self.name}-{port}"
        www = root / "www"
        www.mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_text(f"ferry sim nginx on pod {self.name}\n")
        (www / "1k.bin").write_bytes(b"x" * 1024)
        (www / "64k.bin").write_bytes(b"x" * 65536)
        conf = root / "nginx.conf"
        conf.write_text(
            f"""\
user root;
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    server {{
        listen {port};
        listen [::]:{port} ipv6only=on;
        root {www};
    }}
}}
"""
        )
        argv = ["nginx", "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]
        return self._start_server("nginx", port, argv)

    def start_iperf3_server(self, port: int) -> subprocess.Popen[Any]:
        """`iperf3 -s` on `port` (v4 and v6)."""
        return self._start_server("iperf3", port, ["iperf3", "-s", "-p", str(port)])

    def curl(
        self, url: str, timeout: float = 5.0, args: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        """curl `url` from inside the pod (never through a proxy); `args` go before the URL."""
        argv = ["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout), *args, url]
        return self.exec(argv, timeout=timeout + 10)

    def fetch_json(self, url: str, timeout: float = 5.0) -> dict[str, Any]:
        """GET `url` (normally an echo server) and return the decoded JSON body; raise on error."""
        result = self.curl(url, timeout, ["--fail"])
        if result.returncode != 0:
            raise SimError(
                f"curl {url} from pod {self.name} failed (exit {result.returncode}): "
                f"{result.stderr.strip()}"
            )
        body: dict[str, Any] = json.loads(result.stdout)
        return body

    def wait_listening(
        self,
        port: int,
        timeout: float = _READY_TIMEOUT,
        proc: subprocess.Popen[Any] | None = None,
        log: Path | None = None,
    ) -> None:
        """Block until a TCP socket listens on `port` in this pod (owned by `proc`, if given).

        Raises SimError when `proc` exits first or on timeout, with the tail of `log`.
        """
        _wait_listening(self.netns, port, timeout, proc, log)

    def _stop_processes(self) -> None:
        for proc in self.processes:
            _stop_process(proc)
        self.processes.clear()


def _wait_listening(
    netns: str,
    port: int,
    timeout: float,
    proc: subprocess.Popen[Any] | None,
    log: Path | None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        listening = _run(["ip", "netns", "exec", netns, "ss", "-Hltnp", f"sport = :{port}"])
        if listening.stdout.strip() and (proc is None or f"pid={proc.pid}," in listening.stdout):
            return
        tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise SimError(
                f"{proc.args!r} exited with status {proc.returncode} before listening on "
                f"port {port} in netns {netns}; its output:\n{tail}"
            )
        if time.monotonic() > deadline:
            raise SimError(
                f"nothing listens on port {port} in netns {netns} after {timeout}s\n{tail}"
            )
        time.sleep(0.05)


# --- nodes ---------------------------------------------------------------------------------------


class SimNode:
    """A node netns with a CNI bridge, a unique dual-stack pod subnet and the pods on it."""

    def __init__(self, name_prefix: str = "sim") -> None:
        if not _NAME_RE.match(name_prefix):
            raise ValueError(
                f"node name prefix {name_prefix!r} must be lowercase letters, digits and '-'"
            )
        self.id = secrets.token_hex(3)
        self.name = f"{NETNS_PREFIX}{name_prefix}-{self.id}"
        self.netns = self.name
        self.bridge = f"fbr{self.id}"
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.subnet4: ipaddress.IPv4Network | None = None
        self.subnet6: ipaddress.IPv6Network | None = None
        self.pods: dict[str, Pod] = {}
        self.processes: list[subprocess.Popen[Any]] = []
        self.links: list[Link] = []
        self._torn_down = False
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(Exception):
                self.teardown()
            raise

    def _build(self) -> None:
        _run(["ip", "netns", "add", self.netns])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self._sysctl(
            self.netns,
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        )
        v4 = _reserve([self.netns], _random_v4)
        assert isinstance(v4, ipaddress.IPv4Network)
        self.subnet4 = v4
        v6 = _reserve([self.netns], _random_v6)
        assert isinstance(v6, ipaddress.IPv6Network)
        self.subnet6 = v6

    @staticmethod
    def _sysctl(netns: str, *settings: str) -> None:
        _run(["ip", "netns", "exec", netns, "sysctl", "-qw", *settings])

    # The node's own addresses: the bridge gateway, reachable from its pods and linked nodes.
    @property
    def ip4(self) -> str:
        assert self.subnet4 is not None
        return _nth(self.subnet4, 1)

    @property
    def ip6(self) -> str:
        assert self.subnet6 is not None
        return _nth(self.subnet6, 1)

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    def __enter__(self) -> SimNode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"SimNode({self.netns!r}, {self.subnet4}, {self.subnet6})"

    # -- processes in the node netns (agent, proxy) --

    def exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` in the node netns to completion (captured text output, no check)."""
        return _exec_in(self.netns, argv, kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` in the node netns in a new session; killed on teardown."""
        proc = _popen_in(self.netns, argv, kw)
        self.processes.append(proc)
        return proc

    def wait_listening(self, port: int, timeout: float = _READY_TIMEOUT) -> None:
        """Block until a TCP socket listens on `port` in the node netns."""
        _wait_listening(self.netns, port, timeout, None, None)

    # -- pods --

    def cni_config(self) -> dict[str, Any]:
        """The CNI network configuration this node's pods are wired with."""
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "dataDir": str(self.tmpdir / "ipam"),
                "ranges": [
                    [{"subnet": str(self.subnet4), "gateway": self.ip4}],
                    [{"subnet": str(self.subnet6), "gateway": self.ip6}],
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            },
        }

    def _cni(self, command: str, netns: str, container_id: str) -> dict[str, Any]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": str(NETNS_DIR / netns),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(CNI_PATH),
        }
        proc = _run(
            ["ip", "netns", "exec", self.netns, str(CNI_PATH / "bridge")],
            check=False,
            input=json.dumps(self.cni_config()),
            env=env,
        )
        if proc.returncode != 0:
            raise SimError(
                f"CNI {command} for {netns} on node {self.netns} failed "
                f"(exit {proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}"
            )
        result: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
        return result

    def add_pod(self, name: str) -> Pod:
        """Create pod `name`: its netns, CNI ADD on this node's bridge, v4 and v6 ready to use."""
        if self._torn_down:
            raise SimError(f"node {self.netns} is torn down; create a new SimNode")
        if not _NAME_RE.match(name):
            raise ValueError(f"pod name {name!r} must be lowercase letters, digits and '-'")
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists on node {self.netns}")
        netns = f"{self.netns}-{name}"
        pod = Pod(name, netns, "", "", node=self, container_id=f"{self.netns}-{name}")
        self.pods[name] = pod  # registered first, so a failure below is still cleaned up
        _run(["ip", "netns", "add", netns])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        self._sysctl(netns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        try:
            result = self._cni("ADD", netns, pod.container_id)
            for entry in result.get("ips", []):
                iface = ipaddress.ip_interface(entry["address"])
                if iface.version == 4:
                    pod.ip4 = str(iface.ip)
                else:
                    pod.ip6 = str(iface.ip)
            if not pod.ip4 or not pod.ip6:
                raise SimError(f"CNI ADD for {netns} returned no IPv4 and IPv6 address: {result}")
            self._wait_addresses_ready(netns)
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove_pod(pod)
            raise
        return pod

    @staticmethod
    def _wait_addresses_ready(netns: str) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            out = _run(["ip", "-j", "-n", netns, "-6", "addr", "show", "dev", "eth0"]).stdout
            infos = [a for link in json.loads(out) for a in link.get("addr_info", [])]
            if infos and not any(a.get("tentative") for a in infos):
                return
            if time.monotonic() > deadline:
                raise SimError(f"IPv6 addresses on eth0 in {netns} still tentative: {infos}")
            time.sleep(0.05)

    def remove_pod(self, pod: Pod) -> None:
        """Stop the pod's processes, CNI DEL, delete its netns; a half-created pod is fine too."""
        errors: list[str] = []
        pod._stop_processes()
        if _netns_exists(self.netns):
            try:
                self._cni("DEL", pod.netns, pod.container_id)
            except SimError as exc:
                errors.append(str(exc))
        try:
            _delete_netns(pod.netns)
        except SimError as exc:
            errors.append(str(exc))
        self.pods.pop(pod.name, None)
        if errors:
            raise SimError("; ".join(errors))

    # -- teardown --

    def teardown(self) -> None:
        """Remove everything this node created; safe to call twice or on a half-built node."""
        errors: list[str] = []
        for proc in self.processes:
            _stop_process(proc)
        self.processes.clear()
        for pod in list(self.pods.values()):
            try:
                self.remove_pod(pod)
            except SimError as exc:
                errors.append(str(exc))
        for link in list(self.links):
            try:
                link.remove()
            except SimError as exc:
                errors.append(str(exc))
        try:
            _delete_netns(self.netns)
        except SimError as exc:
            errors.append(str(exc))
        if not _netns_exists(self.netns):
            _release(self.subnet4)
            _release(self.subnet6)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._torn_down = True
        if errors:
            raise SimError(f"teardown of node {self.netns} left residue: " + "; ".join(errors))


# --- links between nodes -------------------------------------------------------------------------


@dataclass(eq=False)
class Link:
    """A veth pair between two node netns, with each node routing the other's pod subnets.

    `reserved4` is the /24 reserved in the registry; the link uses its first /30.
    """

    a: SimNode
    b: SimNode
    ifname_a: str
    ifname_b: str
    reserved4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network
    removed: bool = False

    @property
    def subnet4(self) -> ipaddress.IPv4Network:
        return next(self.reserved4.subnets(new_prefix=30))

    @property
    def ip4_a(self) -> str:
        return _nth(self.subnet4, 1)

    @property
    def ip4_b(self) -> str:
        return _nth(self.subnet4, 2)

    @property
    def ip6_a(self) -> str:
        return _nth(self.subnet6, 1)

    @property
    def ip6_b(self) -> str:
        return _nth(self.subnet6, 2)

    def remove(self) -> None:
        """Delete the veth pair (and with it the routes over it); idempotent."""
        if self.removed:
            return
        for node, ifname in ((self.a, self.ifname_a), (self.b, self.ifname_b)):
            if _netns_exists(node.netns):
                _run(["ip", "-n", node.netns, "link", "del", ifname], check=False)
        _release(self.reserved4)
        _release(self.subnet6)
        self.removed = True
        for node in (self.a, self.b):
            if self in node.links:
                node.links.remove(self)


def link_nodes(a: SimNode, b: SimNode) -> Link:
    """Join two nodes with a veth pair (/30 + /64) and route each one's pod subnets to the other.

    Links are point to point: with three nodes, link every pair that must reach each other.
    """
    if a.subnet4 is None or a.subnet6 is None or b.subnet4 is None or b.subnet6 is None:
        raise SimError(f"cannot link {a!r} and {b!r}: a node is not fully built")
    owners = [a.netns, b.netns]
    net4 = _reserve(owners, _random_v4)
    try:
        net6 = _reserve(owners, _random_v6)
    except BaseException:
        _release(net4)
        raise
    assert isinstance(net4, ipaddress.IPv4Network) and isinstance(net6, ipaddress.IPv6Network)
    lid = secrets.token_hex(4)
    link = Link(a, b, f"fl{lid}a", f"fl{lid}b", net4, net6)
    a.links.append(link)
    b.links.append(link)
    try:
        _run(
            ["ip", "-n", a.netns, "link", "add", link.ifname_a, "type", "veth",
             "peer", "name", link.ifname_b, "netns", b.netns]
        )  # fmt: skip
        sides = (
            (a, link.ifname_a, link.ip4_a, link.ip6_a, b, link.ip4_b, link.ip6_b),
            (b, link.ifname_b, link.ip4_b, link.ip6_b, a, link.ip4_a, link.ip6_a),
        )
        for node, ifname, my4, my6, peer, peer4, peer6 in sides:
            n = ["ip", "-n", node.netns]
            _run([*n, "addr", "add", f"{my4}/30", "dev", ifname])
            _run([*n, "-6", "addr", "add", f"{my6}/64", "dev", ifname, "nodad"])
            _run([*n, "link", "set", ifname, "up"])
            _run([*n, "route", "add", str(peer.subnet4), "via", peer4, "dev", ifname])
            _run([*n, "-6", "route", "add", str(peer.subnet6), "via", peer6, "dev", ifname])
    except BaseException:
        with contextlib.suppress(Exception):
            link.remove()
        raise
    return link
