"""Configuration: grouped, frozen dataclasses with documented defaults, loaded from YAML.

`load_config(None)` returns the embedded default, so every command works with no file.  A file
only needs the keys it changes.  Every value is validated on load; a bad one raises `ConfigError`
naming the key and the value, and nothing starts with a half-understood configuration.

```yaml
node_name: node-a                # default: the host name
redirection:
  backend: iptables              # only iptables today
  outbound_port: 15001           # in-pod listener for redirected outbound TCP
  inbound_port: 15006            # in-pod listener for redirected inbound TCP
  tunnel_port: 15008             # never redirected (mTLS tunnel listener)
  mark: 0x539                    # SO_MARK on every proxy socket; rules skip it
  mark_mask: 0xfff
  connmark: 0x111                # marks the inbound return path to the proxy
  route_table: 100               # policy routing table for that return path
  exclude_outbound_ports: [22]
  exclude_inbound_ports: []
  exclude_outbound_cidrs: ["10.96.0.0/12"]
  ipv6: true
proxy:
  workers: 0                     # 0 = one per core
  connect_timeout: 5.0           # seconds
  idle_timeout: 3600.0           # seconds without bytes in either direction
  metrics_address: 127.0.0.1:15020
agent:
  reconcile_interval: 10.0       # seconds between full drift checks
identity:
  trust_domain: cluster.local    # spiffe://<trust_domain>/ns/<namespace>/sa/<service account>
  node_credentials: ""           # dir with node.crt, node.key, bundle.pem (`agent ca issue-node`);
                                 # default: <state-dir>/identity
  workload_cert_ttl: 86400.0     # seconds; renewed at half their lifetime
mesh:
  directory: ""                  # shared dir where every node publishes its workloads;
                                 # default: <state-dir>/directory (this node only)
  default_mode: permissive       # permissive | strict (only tunnelled, authenticated inbound)
  namespace_modes: {prod: strict}
  egress: passthrough            # passthrough | refuse: destinations outside the mesh
workloads:                       # declarative standalone enrollments
  - netns: web                   # a name under /var/run/netns, or a path
    namespace: shop
    service_account: web
```
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STATE_DIR = Path("/run/ferry")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the value."""


@dataclass(frozen=True)
class RedirectionConfig:
    backend: str = "iptables"
    outbound_port: int = 15001
    inbound_port: int = 15006
    tunnel_port: int = 15008
    mark: int = 0x539
    mark_mask: int = 0xFFF
    connmark: int = 0x111
    route_table: int = 100
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    ipv6: bool = True


@dataclass(frozen=True)
class ProxyConfig:
    workers: int = 0
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    metrics_address: str = "127.0.0.1:15020"


@dataclass(frozen=True)
class AgentConfig:
    reconcile_interval: float = 10.0


@dataclass(frozen=True)
class IdentityConfig:
    trust_domain: str = "cluster.local"
    node_credentials: str = ""
    workload_cert_ttl: float = 86400.0


MODES = ("permissive", "strict")
EGRESS = ("passthrough", "refuse")


@dataclass(frozen=True)
class MeshConfig:
    directory: str = ""
    default_mode: str = "permissive"
    namespace_modes: tuple[tuple[str, str], ...] = ()
    egress: str = "passthrough"

    def mode_for(self, namespace: str, explicit: str | None = None) -> str:
        """A workload's mode: its own, else its namespace's, else the default."""
        return explicit or dict(self.namespace_modes).get(namespace, self.default_mode)


@dataclass(frozen=True)
class WorkloadSpec:
    """One declarative enrollment from the config's `workloads` list."""

    netns: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class Config:
    node_name: str = field(default_factory=socket.gethostname)
    redirection: RedirectionConfig = RedirectionConfig()
    proxy: ProxyConfig = ProxyConfig()
    agent: AgentConfig = AgentConfig()
    identity: IdentityConfig = IdentityConfig()
    mesh: MeshConfig = MeshConfig()
    workloads: tuple[WorkloadSpec, ...] = ()


def validate_name(kind: str, value: str) -> str:
    """Kubernetes namespaces and service accounts are DNS labels; so are ours."""
    if not isinstance(value, str) or not DNS_LABEL.match(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: must be a DNS label (lower-case letters, digits and '-', "
            "at most 63 characters, starting and ending with a letter or digit)"
        )
    return value


def _port(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ConfigError(f"{key}: {value!r} is not a TCP port (1-65535)")
    return value


def _positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: {value!r} must be a positive number of seconds")
    return float(value)


def _section(name: str, raw: Any, cls: type[Any]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping, got {raw!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
    return dict(raw)


def _redirection(raw: Any) -> RedirectionConfig:
    values: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in _section("redirection", raw, RedirectionConfig).items()
    }
    cfg = replace(RedirectionConfig(), **values)
    if cfg.backend != "iptables":
        raise ConfigError(f"redirection.backend: {cfg.backend!r} is not supported (iptables)")
    for key in ("outbound_port", "inbound_port", "tunnel_port"):
        _port(f"redirection.{key}", getattr(cfg, key))
    if len({cfg.outbound_port, cfg.inbound_port, cfg.tunnel_port}) != 3:
        raise ConfigError("redirection: outbound_port, inbound_port and tunnel_port must differ")
    for key in ("mark", "mark_mask", "connmark", "route_table"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**32:
            raise ConfigError(f"redirection.{key}: {value!r} must be an integer in 1..2^32-1")
    if cfg.mark & cfg.mark_mask == cfg.connmark & cfg.mark_mask:
        raise ConfigError("redirection: mark and connmark must differ under mark_mask")
    for key in ("exclude_outbound_ports", "exclude_inbound_ports"):
        for port in getattr(cfg, key):
            _port(f"redirection.{key}", port)
    for cidr in cfg.exclude_outbound_cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"redirection.exclude_outbound_cidrs: {cidr!r} is not a CIDR"
            ) from exc
    if not isinstance(cfg.ipv6, bool):
        raise ConfigError(f"redirection.ipv6: {cfg.ipv6!r} must be true or false")
    return cfg


def parse_address(key: str, value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to a tuple; used for listen addresses."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{key}: {value!r} is not host:port")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"{key}: {host!r} in {value!r} is not an IP address") from exc
    return host, _port(key, int(port))


def _proxy(raw: Any) -> ProxyConfig:
    cfg = replace(ProxyConfig(), **_section("proxy", raw, ProxyConfig))
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ConfigError(f"proxy.workers: {cfg.workers!r} must be 0 (one per core) or more")
    _positive("proxy.connect_timeout", cfg.connect_timeout)
    _positive("proxy.idle_timeout", cfg.idle_timeout)
    parse_address("proxy.metrics_address", cfg.metrics_address)
    return cfg


def _agent(raw: Any) -> AgentConfig:
    cfg = replace(AgentConfig(), **_section("agent", raw, AgentConfig))
    _positive("agent.reconcile_interval", cfg.reconcile_interval)
    return cfg


TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,253}[a-z0-9])?$")


def _identity(raw: Any) -> IdentityConfig:
    cfg = replace(IdentityConfig(), **_section("identity", raw, IdentityConfig))
    if not isinstance(cfg.trust_domain, str) or not TRUST_DOMAIN.match(cfg.trust_domain):
        raise ConfigError(
            f"identity.trust_domain: {cfg.trust_domain!r} is not a trust domain (lower-case "
            "letters, digits, '-' and '.')"
        )
    if not isinstance(cfg.node_credentials, str):
        raise ConfigError(f"identity.node_credentials: {cfg.node_credentials!r} is not a path")
    ttl = _positive("identity.workload_cert_ttl", cfg.workload_cert_ttl)
    if ttl < 60:
        raise ConfigError(f"identity.workload_cert_ttl: {ttl!r} is below 60 seconds")
    return replace(cfg, workload_cert_ttl=ttl)


def _mode(key: str, value: Any) -> str:
    if value not in MODES:
        raise ConfigError(f"{key}: {value!r} is not a mode ({' or '.join(MODES)})")
    return str(value)


def _mesh(raw: Any) -> MeshConfig:
    values = _section("mesh", raw, MeshConfig)
    modes = values.get("namespace_modes") or {}
    if not isinstance(modes, dict):
        raise ConfigError(f"mesh.namespace_modes: expected a mapping, got {modes!r}")
    for namespace, mode in modes.items():
        validate_name("mesh.namespace_modes namespace", namespace)
        _mode(f"mesh.namespace_modes.{namespace}", mode)
    values["namespace_modes"] = tuple(sorted(modes.items()))
    cfg = replace(MeshConfig(), **values)
    _mode("mesh.default_mode", cfg.default_mode)
    if cfg.egress not in EGRESS:
        raise ConfigError(f"mesh.egress: {cfg.egress!r} is not one of {', '.join(EGRESS)}")
    if not isinstance(cfg.directory, str):
        raise ConfigError(f"mesh.directory: {cfg.directory!r} is not a path")
    return cfg


def _workloads(raw: Any) -> tuple[WorkloadSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"workloads: expected a list, got {raw!r}")
    specs = []
    for index, item in enumerate(raw):
        values = _section(f"workloads[{index}]", item, WorkloadSpec)
        missing = sorted({"netns", "namespace", "service_account"} - set(values))
        if missing:
            raise ConfigError(f"workloads[{index}]: missing {', '.join(missing)}")
        spec = WorkloadSpec(**{k: str(v) for k, v in values.items()})
        validate_name(f"workloads[{index}].namespace", spec.namespace)
        validate_name(f"workloads[{index}].service_account", spec.service_account)
        specs.append(spec)
    netns = [s.netns for s in specs]
    dupes = sorted({n for n in netns if netns.count(n) > 1})
    if dupes:
        raise ConfigError(f"workloads: netns listed more than once: {', '.join(dupes)}")
    return tuple(specs)


def parse_config(raw: Any) -> Config:
    """Validate a decoded YAML document into a `Config` (pure)."""
    values = _section("config", raw, Config)
    base = Config()
    return Config(
        node_name=str(values.get("node_name", base.node_name)),
        redirection=_redirection(values.get("redirection")),
        proxy=_proxy(values.get("proxy")),
        agent=_agent(values.get("agent")),
        identity=_identity(values.get("identity")),
        mesh=_mesh(values.get("mesh")),
        workloads=_workloads(values.get("workloads")),
    )


def load_config(path: Path | None) -> Config:
    """Read and validate a YAML file, or return the embedded default when `path` is None."""
    if path is None:
        return Config()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
