"""Envoy in exactly Ferry's position: a per-node proxy whose listeners live inside each pod netns.

`envoy_config(pods, ...)` is a pure function from the pods to an Envoy v3 bootstrap (a dict, written
as JSON).  Every pod gets the two listeners Ferry opens in it, and one cluster for each:

- ``out-<pod>``: listener on ``127.0.0.1:15001`` *inside the pod netns*
  (``socket_address.network_namespace_filepath``) with the ``original_dst`` listener filter and a
  ``tcp_proxy`` to cluster ``out-<pod>``, of ``type: ORIGINAL_DST`` / ``lb_policy:
  CLUSTER_PROVIDED``, whose ``upstream_bind_config`` binds ``0.0.0.0:0`` in the same pod netns
  and sets ``SO_MARK`` (level 1, name 36) to the redirection mark before bind, so the pod's own
  rules let the upstream connection out;
- ``in-<pod>``: the same on ``0.0.0.0:15006`` for traffic redirected into the pod, with its
  upstream (to the app, on the original destination) opened from inside the pod netns, marked.

So the pod's iptables rules (Ferry's own, applied with `agent.redirect.IptablesRedirection`) steer
its traffic into Envoy just as they steer it into Ferry, and config for 1, 10 or 100 pods is
the same function.  The admin interface is on a unix socket, so nothing listens on a node port.

The pieces (`socket_address`, `ORIGINAL_DST_FILTER`, `tcp_proxy`, `upstream_bind_config`) are
also what `bench.envoy_mtls` builds its cross-node bootstraps from.

`EnvoyProcess` runs one Envoy (``--concurrency N``, no hot restart) in the node netns through
`sim.node.SimNode.popen`, waits until every listener is active, reads stats, and stops it.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.node import SimNode

ENVOY = Path(sys.executable).parent / "envoy"
SOL_SOCKET = 1
SO_MARK = 36

ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
    },
}
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


class EnvoyError(RuntimeError):
    """Envoy did not start, did not become ready, or its admin interface failed."""


@dataclass(frozen=True)
class EnvoyPod:
    """What the config needs to know about a pod: a unique name and its netns file."""

    name: str
    netns_path: str


def tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    """A ``tcp_proxy`` network filter to `cluster`."""
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster},
    }


def socket_address(address: str, port: int, netns_path: str) -> dict[str, Any]:
    """A socket address bound inside the netns `netns_path`."""
    return {
        "socket_address": {
            "address": address,
            "port_value": port,
            "network_namespace_filepath": netns_path,
        }
    }


def _listener(name: str, address: str, port: int, netns_path: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": socket_address(address, port, netns_path),
        "listener_filters": [ORIGINAL_DST_FILTER],
        "filter_chains": [{"filters": [tcp_proxy(name, name)]}],
    }


def upstream_bind_config(netns_path: str, mark: int) -> dict[str, Any]:
    """Upstream sockets bound (``0.0.0.0:0``) in the netns `netns_path`, `mark` set before bind."""
    return {
        "source_address": {
            "address": "0.0.0.0",
            "port_value": 0,
            "network_namespace_filepath": netns_path,
        },
        "socket_options": [
            {"level": SOL_SOCKET, "name": SO_MARK, "int_value": mark, "state": "STATE_PREBIND"}
        ],
    }


def _cluster(name: str, netns_path: str, mark: int, connect_timeout: float) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": f"{connect_timeout}s",
        "upstream_bind_config": upstream_bind_config(netns_path, mark),
    }


def envoy_config(
    pods: Sequence[EnvoyPod],
    *,
    admin_socket: str,
    mark: int = 0x539,
    outbound_port: int = 15001,
    inbound_port: int = 15006,
    connect_timeout: float = 5.0,
) -> dict[str, Any]:
    """The bootstrap for `pods`: per pod an outbound and an inbound listener, each to a cluster."""
    names = [p.name for p in pods]
    if len(set(names)) != len(names):
        raise ValueError(f"pod names must be unique: {names}")
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for pod in pods:
        for direction, address, port in (
            ("out", "127.0.0.1", outbound_port),
            ("in", "0.0.0.0", inbound_port),
        ):
            name = f"{direction}-{pod.name}"
            listeners.append(_listener(name, address, port, pod.netns_path))
            clusters.append(_cluster(name, pod.netns_path, mark, connect_timeout))
    return {
        "admin": {"address": {"pipe": {"path": admin_socket}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class EnvoyProcess:
    """One Envoy in the node netns, configured for `pods` (or with `config`, a bootstrap without
    its admin section); `stop()` is idempotent."""

    def __init__(
        self,
        node: SimNode,
        pods: Sequence[EnvoyPod],
        concurrency: int,
        mark: int,
        outbound_port: int = 15001,
        inbound_port: int = 15006,
        tag: str = "envoy",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.node = node
        self.dir = node.tmpdir / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.admin_socket = str(self.dir / "admin.sock")
        self.config_path = self.dir / "envoy.json"
        self.log_path = self.dir / "envoy.log"
        if config is None:
            self.listeners = 2 * len(pods)
            config = envoy_config(
                pods,
                admin_socket=self.admin_socket,
                mark=mark,
                outbound_port=outbound_port,
                inbound_port=inbound_port,
            )
        else:  # a ready-made bootstrap (bench.envoy_mtls); the admin socket is ours
            config = {**config, "admin": {"address": {"pipe": {"path": self.admin_socket}}}}
            self.listeners = len(config["static_resources"]["listeners"])
        self.config_path.write_text(json.dumps(config, indent=1))
        Path(self.admin_socket).unlink(missing_ok=True)
        argv = [
            str(ENVOY),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(concurrency),
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--log-path",
            str(self.log_path),
        ]
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc: subprocess.Popen[Any] = node.popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def admin(self, path: str, timeout: float = 5.0) -> str:
        conn = _UnixHTTPConnection(self.admin_socket, timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
        except OSError as exc:
            raise EnvoyError(f"envoy admin GET {path}: {exc}") from exc
        finally:
            conn.close()
        if response.status != 200:
            raise EnvoyError(f"envoy admin GET {path}: HTTP {response.status}: {body[:200]}")
        return body

    def stats(self, prefix: str) -> dict[str, int]:
        """Counters and gauges whose name matches the regex `prefix` (admin /stats?filter=)."""
        found: dict[str, int] = {}
        for line in self.admin(f"/stats?filter={prefix}").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                found[name.strip()] = int(value)
        return found

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until Envoy is LIVE and all of its listeners are active (bound in their pods)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited with status {self.proc.returncode}\n{self.logs()}")
            if Path(self.admin_socket).exists():
                try:
                    ready = self.admin("/ready").strip()
                    active = self.stats("^listener_manager.total_listeners_active$")
                    count = active.get("listener_manager.total_listeners_active", -1)
                    last = f"ready={ready!r} listeners_active={count}/{self.listeners}"
                    if ready == "LIVE" and count == self.listeners:
                        return
                except EnvoyError as exc:
                    last = str(exc)
            time.sleep(0.05)
        raise EnvoyError(f"envoy not ready after {timeout}s ({last})\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in (self.dir / "stdout.log", self.log_path):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc in self.node.processes:
            self.node.processes.remove(self.proc)
