"""Configuration: grouped, frozen dataclasses with documented defaults, loaded from YAML.

`load_config(None)` returns the embedded default, so every command works with no file.  A file
only needs the keys it changes.  Every value is validated on load; a bad one (a wrong type too: a
scalar where a list or mapping belongs, or the reverse) raises `ConfigError` naming the key and
the value, and nothing starts with a half-understood configuration.  Names follow the rules of
`agent.names` (one set of rules for the whole agent).

Every key, with its default; lines marked "example" show a value that is NOT the default:

```yaml
node_name: node-a                # example; default: $NODE_NAME (a DaemonSet sets it from
                                 # spec.nodeName), else the host name, lower-cased (a DNS subdomain)
redirection:
  backend: iptables              # default: iptables | nftables | ebpf | auto (eBPF when the
                                 # kernel allows, else nftables when the host's rules are nft,
                                 # else iptables; `agent status` says which and why)
  outbound_port: 15001           # default: in-pod listener for redirected outbound TCP
  inbound_port: 15006            # default: in-pod listener for redirected inbound TCP
  tunnel_port: 15008             # default: never redirected (mTLS tunnel listener)
  mark: 0x539                    # default: SO_MARK on every proxy socket; rules skip it
  mark_mask: 0xfff               # default
  connmark: 0x111                # default: marks the inbound return path to the proxy
  route_table: 100               # default: policy routing table for that return path
  exclude_outbound_ports: [22]   # example; default: [] (lists of ports)
  exclude_inbound_ports: []      # default
  exclude_outbound_cidrs: ["10.96.0.0/12"]  # example; default: []
  ipv6: true                     # default
  kernel_fastpath: true          # default: with the eBPF backend, an uninspected same-node
                                 # connection's bytes go from app to app in the kernel, past
                                 # the proxy's worker (agent/proxy/fastpath.py); false: spliced
proxy:
  workers: 0                     # default: 0 = one per core
  connect_timeout: 5.0           # default, seconds
  idle_timeout: 3600.0           # default, seconds without bytes in either direction
  metrics_address: 127.0.0.1:15020  # default
  drain_timeout: 30.0            # default, seconds an upgraded proxy keeps serving the connections
                                 # it has open after handing its listeners over; then it closes them
  handoff_timeout: 30.0          # default, seconds a takeover may take (the new proxy's snapshot);
                                 # past it the running proxy keeps serving (rollback)
  exit_after_drain: true         # default: a replaced proxy exits once drained; false: it stays
                                 # idle (not serving, /readyz not ready) until SIGTERM, as in a
                                 # pod, where an exited container would be restarted
  ready_file: ""                 # default: none; a path: exists exactly while this proxy serves
                                 # and /readyz says ready (a pod's readiness probe: on a node
                                 # the metrics port answers for whichever proxy holds it)
limits:
  # What one peer or workload may make the proxy hold or do: past a bound, new work is refused
  # and counted (ferry_proxy_shed_total, `agent status`), what is established goes on; see
  # docs/limits.md.
  connections_per_node: 65536    # default: relays, tunnel streams and tunnel connections open at
                                 # once, each worker an equal share; also capped by the open-file
                                 # limit (6 descriptors a plaintext relay)
  connections_per_workload: 16384  # default: one workload's open connections, in and out (each
                                 # worker an equal share)
  connections_per_source: 4096   # default: connections one peer (source IP, or identity on a
                                 # tunnel) holds open to the node's workloads (each worker a share)
  handshakes_per_worker: 256     # default: tunnel TLS handshakes in progress (~50 KB each)
  handshakes_per_source: 64      # default: ... of them from one source IP
  streams_per_connection: 100    # default: concurrent streams on one tunnel or inspected HTTP/2
                                 # connection (SETTINGS_MAX_CONCURRENT_STREAMS)
  stream_window: 4194304         # default, bytes: a tunnel stream's flow-control window, all one
                                 # stream can make us hold for an app that does not read
  connection_window: 16777216    # default, bytes: a tunnel connection's window, the same for all
                                 # of its streams together
  buffered_per_worker: 268435456 # default, bytes held for apps that do not read, across a worker;
                                 # past it, a stream that holds 64 KiB or more is reset
  unread_replies: 1000           # default: PING/SETTINGS acks and resets queued for a peer that
                                 # does not read them; past it GOAWAY ENHANCE_YOUR_CALM
  ping_rate: 100                 # default: PING frames per second and connection (burst: one
                                 # second's worth); past it GOAWAY ENHANCE_YOUR_CALM
  settings_rate: 100             # default: SETTINGS frames per second and connection
  reset_rate: 1000               # default: RST_STREAM frames per second and connection
  empty_frame_rate: 1000         # default: frames that carry nothing (empty DATA, PRIORITY,
                                 # unknown types, unasked PING acks) per second and connection
  empty_frames_in_a_row: 100     # default: ... one after the other
  rapid_reset_streams: 500       # default: a connection ends when half of max(this, the streams
                                 # it opened) were reset by the peer before our answer
  settings_entries: 32           # default: entries in one SETTINGS frame
  header_block_bytes: 65536      # default: one HTTP/2 header block (tunnel, inspected HTTP/2)
  header_block_frames: 8         # default: CONTINUATION frames in one header block
  header_block_timeout: 10.0     # default, seconds a header block may stay incomplete
  request_header_bytes: 65536    # default: an inspected HTTP/1.1 request head, or HTTP/2 header
                                 # list; past it 400 (HTTP/2: the connection ends)
  request_header_timeout: 10.0   # default, seconds from the first byte of an inspected request
                                 # head to its end; past it 408 and the connection is closed
agent:
  reconcile_interval: 10.0       # default, seconds between full drift checks
  loss_watch_interval: 0.5       # default, seconds between the loss watch's samples of every
                                 # pod (lost rules repaired at once); 0: off, reconcile only
  metrics_address: 127.0.0.1:15021  # default: the agent's /metrics, /healthz, /readyz
identity:
  trust_domain: cluster.local    # default: spiffe://<trust_domain>/ns/<namespace>/sa/<sa>
  node_credentials: ""           # default, meaning <state-dir>/identity: a dir with node.crt,
                                 # node.key, bundle.pem (`agent ca issue-node`); with
                                 # ca_url only bundle.pem
  ca_url: ""                     # default: none (the node signs); https://... of `agent ca
                                 # serve`: certificates by CSR, no key on the node (Kubernetes)
  token_file: /var/run/secrets/kubernetes.io/serviceaccount/token  # default: sent to ca_url
  workload_cert_ttl: 86400.0     # default, seconds; renewed at half their lifetime
mesh:
  directory: ""                  # default, meaning <state-dir>/directory (this node only): the
                                 # shared dir where every node publishes its workloads
  default_mode: permissive       # default: permissive | strict (only tunnelled, authenticated)
  namespace_modes: {prod: strict}  # example; default: {} (namespace -> mode)
  egress: passthrough            # default: passthrough | refuse: destinations outside the mesh
policy:
  directory: /etc/ferry/policies # default: policy documents (YAML); missing means no policy
                                 # (watched for appearing); a mounted ConfigMap works
  root_namespace: ferry-system   # default: policies in this namespace apply to every workload
  jwks_refresh: 1200.0           # default, seconds between fetches of a RequestAuthentication's
                                 # jwksUri (as istiod)
  jwks_timeout: 5.0              # default, seconds one jwksUri fetch may take
  redis: ""                      # default: none; host:port or a Unix socket path of the Redis
                                 # that holds `scope: global` rate limits for every node (none:
                                 # they count per node)
  redis_on_failure: local        # default: local (count per node) | allow | deny, while Redis fails
  redis_timeout: 0.05            # default, seconds a rate-limit take may wait for Redis
kubernetes:
  enabled: false                 # default: true runs the agent as a Kubernetes node agent (pods
                                 # on this node enrolled by their ferry.dev/mesh labels;
                                 # docs/kubernetes.md)
  kubeconfig: ""                 # default: in-cluster (the pod's service account), else
                                 # $KUBECONFIG or ~/.kube/config; or a kubeconfig file's path
  system_namespace: ferry-system # default: Ferry's own namespace, whose pods are never enrolled
  policies: true                 # default: policy from the API server's AuthorizationPolicy,
                                 # RequestAuthentication and RateLimitPolicy objects (false:
                                 # policy.directory, as off Kubernetes)
  annotate: true                 # default: write ferry.dev/redirection(-reason) on every pod
  scan_interval: 5.0             # default, seconds between process scans while a selected pod
                                 # has no known network namespace
  probe_snat: true               # default: the node's own connections to enrolled pods (kubelet
                                 # probes) come from 169.254.7.127, which pods let in without
                                 # mTLS (docs/kubernetes.md, "Health probes")
telemetry:
  access_log: ""                 # default: off; "-" is the proxy's stdout, a path a file
                                 # (appended to, reopened on SIGHUP: logrotate-friendly)
  access_log_sample: 1.0         # default: the share of allowed connections and requests logged
                                 # (denied ones always are)
  access_log_queue: 8192         # default: lines waiting for the writer thread; past it a line
                                 # is dropped and counted (ferry_access_log_dropped_total)
  otlp_endpoint: ""              # default: no traces; an OTLP/HTTP traces URL, for example
                                 # http://127.0.0.1:4318/v1/traces
  trace_sample: 0.01             # default (Istio's 1 %): the share of traces started here that
                                 # are recorded (an incoming traceparent's sampled flag is kept)
  workload_label_limit: 500      # default: workloads with their own metric series; the ones
                                 # seen later share workload="other"
  identity_label_limit: 1000     # default: the same for source/destination identities
workloads:                       # example; default: [] (declarative standalone enrollments)
  - netns: web                   # example: a name under /var/run/netns, or a path
    namespace: shop              # example
    service_account: web         # example
    labels: {app: web}           # example; default: {} (Kubernetes-style, for policy selectors)
```
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from agent import names
from agent.telemetry.settings import TelemetryConfig, parse_telemetry
from agent.workloads import MODES, Mode


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the value."""


Backend = Literal["auto", "iptables", "nftables", "ebpf"]
BACKENDS = get_args(Backend)


@dataclass(frozen=True)
class RedirectionConfig:
    backend: Backend = "iptables"
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
    kernel_fastpath: bool = True


@dataclass(frozen=True)
class ProxyConfig:
    workers: int = 0
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    metrics_address: str = "127.0.0.1:15020"
    drain_timeout: float = 30.0
    handoff_timeout: float = 30.0
    exit_after_drain: bool = True
    ready_file: str = ""


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on what one peer or workload may make the proxy hold or do (docs/limits.md)."""

    connections_per_node: int = 65536
    connections_per_workload: int = 16384
    connections_per_source: int = 4096
    handshakes_per_worker: int = 256
    handshakes_per_source: int = 64
    streams_per_connection: int = 100
    stream_window: int = 4 << 20
    connection_window: int = 16 << 20
    buffered_per_worker: int = 256 << 20
    unread_replies: int = 1000
    ping_rate: int = 100
    settings_rate: int = 100
    reset_rate: int = 1000
    empty_frame_rate: int = 1000
    empty_frames_in_a_row: int = 100
    rapid_reset_streams: int = 500
    settings_entries: int = 32
    header_block_bytes: int = 65536
    header_block_frames: int = 8
    header_block_timeout: float = 10.0
    request_header_bytes: int = 65536
    request_header_timeout: float = 10.0


@dataclass(frozen=True)
class AgentConfig:
    reconcile_interval: float = 10.0
    loss_watch_interval: float = 0.5
    metrics_address: str = "127.0.0.1:15021"


@dataclass(frozen=True)
class IdentityConfig:
    trust_domain: str = "cluster.local"
    node_credentials: str = ""
    workload_cert_ttl: float = 86400.0
    ca_url: str = ""
    token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"


EGRESS = ("passthrough", "refuse")


@dataclass(frozen=True)
class MeshConfig:
    directory: str = ""
    default_mode: Mode = "permissive"
    namespace_modes: tuple[tuple[str, Mode], ...] = ()
    egress: str = "passthrough"

    def mode_for(self, namespace: str, explicit: Mode | None = None) -> Mode:
        """A workload's mode: its own, else its namespace's, else the default."""
        return explicit or dict(self.namespace_modes).get(namespace, self.default_mode)


OnFailure = Literal["local", "allow", "deny"]  # rate limits while Redis fails
REDIS_ON_FAILURE = get_args(OnFailure)


@dataclass(frozen=True)
class PolicyConfig:
    directory: str = "/etc/ferry/policies"
    root_namespace: str = "ferry-system"
    jwks_refresh: float = 1200.0
    jwks_timeout: float = 5.0
    redis: str = ""
    redis_on_failure: OnFailure = "local"
    redis_timeout: float = 0.05


@dataclass(frozen=True)
class KubernetesConfig:
    enabled: bool = False
    kubeconfig: str = ""
    system_namespace: str = "ferry-system"
    policies: bool = True
    annotate: bool = True
    scan_interval: float = 5.0
    probe_snat: bool = True


@dataclass(frozen=True)
class WorkloadSpec:
    """One declarative enrollment from the config's `workloads` list."""

    netns: str
    namespace: str
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Config:
    node_name: str = field(default_factory=lambda: os.uname().nodename.lower())
    redirection: RedirectionConfig = RedirectionConfig()
    proxy: ProxyConfig = ProxyConfig()
    limits: LimitsConfig = LimitsConfig()
    agent: AgentConfig = AgentConfig()
    identity: IdentityConfig = IdentityConfig()
    mesh: MeshConfig = MeshConfig()
    policy: PolicyConfig = PolicyConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    workloads: tuple[WorkloadSpec, ...] = ()


def _label(key: str, value: Any) -> str:
    """Kubernetes namespaces and service accounts are DNS labels; so are ours."""
    try:
        return names.dns_label(key, value)
    except names.InvalidName as exc:
        raise ConfigError(str(exc)) from None


def _text(key: str, value: Any) -> str:
    """A scalar written as a string (a number is taken as its text), never a list or mapping."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


def _list(key: str, value: Any) -> tuple[Any, ...]:
    """A YAML list (absent or null: empty); a scalar or a mapping is an error naming the key."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return tuple(value)


def _mapping(key: str, value: Any) -> dict[Any, Any]:
    """A YAML mapping (absent or null: empty); anything else is an error naming the key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
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
    values = _mapping(name, raw)
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
    return dict(values)


LIST_KEYS = ("exclude_outbound_ports", "exclude_inbound_ports", "exclude_outbound_cidrs")


def _redirection(raw: Any) -> RedirectionConfig:
    values = _section("redirection", raw, RedirectionConfig)
    for key in LIST_KEYS:
        if key in values:
            values[key] = _list(f"redirection.{key}", values[key])
    cfg = replace(RedirectionConfig(), **values)
    if cfg.backend not in BACKENDS:
        raise ConfigError(
            f"redirection.backend: {cfg.backend!r} is not one of {', '.join(BACKENDS)}"
        )
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
    if not isinstance(cfg.kernel_fastpath, bool):
        raise ConfigError(
            f"redirection.kernel_fastpath: {cfg.kernel_fastpath!r} must be true or false"
        )
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
    if not isinstance(cfg.exit_after_drain, bool):
        raise ConfigError(f"proxy.exit_after_drain: {cfg.exit_after_drain!r} must be true or false")
    if not isinstance(cfg.ready_file, str) or (cfg.ready_file and cfg.ready_file[0] != "/"):
        raise ConfigError(f'proxy.ready_file: {cfg.ready_file!r} must be an absolute path or ""')
    return replace(
        cfg,
        drain_timeout=_positive("proxy.drain_timeout", cfg.drain_timeout),
        handoff_timeout=_positive("proxy.handoff_timeout", cfg.handoff_timeout),
    )


WINDOW_RANGE = (65535, (1 << 31) - 1)  # what HTTP/2 lets a flow-control window be
HEADER_RANGE = (1024, 1 << 24)  # a header block must fit a request; HTTP/2 frame lengths are 24 bit


def _count(key: str, value: Any, low: int = 1, high: int = 1 << 31) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key}: {value!r} must be an integer from {low} to {high}")
    return value


def _limits(raw: Any) -> LimitsConfig:
    cfg = replace(LimitsConfig(), **_section("limits", raw, LimitsConfig))
    ranges = {"stream_window": WINDOW_RANGE, "connection_window": WINDOW_RANGE,
              "header_block_bytes": HEADER_RANGE, "request_header_bytes": HEADER_RANGE,
              "buffered_per_worker": (1 << 20, 1 << 40)}  # fmt: skip
    values: dict[str, Any] = {}
    for f in fields(LimitsConfig):
        value = getattr(cfg, f.name)
        if f.type == "float":
            values[f.name] = _positive(f"limits.{f.name}", value)
        else:
            values[f.name] = _count(f"limits.{f.name}", value, *ranges.get(f.name, (1, 1 << 31)))
    return LimitsConfig(**values)


def _agent(raw: Any) -> AgentConfig:
    cfg = replace(AgentConfig(), **_section("agent", raw, AgentConfig))
    _positive("agent.reconcile_interval", cfg.reconcile_interval)
    parse_address("agent.metrics_address", cfg.metrics_address)
    watch = cfg.loss_watch_interval
    if isinstance(watch, bool) or not isinstance(watch, int | float) or not 0 <= watch <= 60:
        raise ConfigError(f"agent.loss_watch_interval: {watch!r} must be 0 (off) to 60 seconds")
    return replace(cfg, loss_watch_interval=float(watch))


def _identity(raw: Any) -> IdentityConfig:
    cfg = replace(IdentityConfig(), **_section("identity", raw, IdentityConfig))
    try:
        names.trust_domain(cfg.trust_domain)
    except names.InvalidName as exc:
        raise ConfigError(f"identity.trust_domain: {exc}") from None
    if not isinstance(cfg.node_credentials, str):
        raise ConfigError(f"identity.node_credentials: {cfg.node_credentials!r} is not a path")
    if not isinstance(cfg.ca_url, str) or (cfg.ca_url and not cfg.ca_url.startswith("https://")):
        raise ConfigError(f"identity.ca_url: {cfg.ca_url!r} is not an https:// URL")
    if not isinstance(cfg.token_file, str) or not cfg.token_file:
        raise ConfigError(f"identity.token_file: {cfg.token_file!r} is not a path")
    ttl = _positive("identity.workload_cert_ttl", cfg.workload_cert_ttl)
    if ttl < 60:
        raise ConfigError(f"identity.workload_cert_ttl: {ttl!r} is below 60 seconds")
    return replace(cfg, workload_cert_ttl=ttl)


def _mode(key: str, value: Any) -> Mode:
    for mode in MODES:
        if value == mode:
            return mode
    raise ConfigError(f"{key}: {value!r} is not a mode ({' or '.join(MODES)})")


def _mesh(raw: Any) -> MeshConfig:
    values = _section("mesh", raw, MeshConfig)
    modes = _mapping("mesh.namespace_modes", values.get("namespace_modes"))
    checked = {
        _label("mesh.namespace_modes namespace", namespace): _mode(
            f"mesh.namespace_modes.{namespace}", mode
        )
        for namespace, mode in modes.items()
    }
    values["namespace_modes"] = tuple(sorted(checked.items()))
    cfg = replace(MeshConfig(), **values)
    _mode("mesh.default_mode", cfg.default_mode)
    if not isinstance(cfg.egress, str) or cfg.egress not in EGRESS:
        raise ConfigError(f"mesh.egress: {cfg.egress!r} is not one of {', '.join(EGRESS)}")
    if not isinstance(cfg.directory, str):
        raise ConfigError(f"mesh.directory: {cfg.directory!r} is not a path")
    return cfg


def _policy(raw: Any) -> PolicyConfig:
    cfg = replace(PolicyConfig(), **_section("policy", raw, PolicyConfig))
    if not isinstance(cfg.directory, str) or not cfg.directory:
        raise ConfigError(f"policy.directory: {cfg.directory!r} is not a path")
    _label("policy.root_namespace", cfg.root_namespace)
    if not isinstance(cfg.redis, str):
        raise ConfigError(f"policy.redis: {cfg.redis!r} is not host:port or a socket path")
    if cfg.redis and not cfg.redis.startswith("/"):
        host, _, port = cfg.redis.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"policy.redis: {cfg.redis!r} is not host:port or a socket path")
    if cfg.redis_on_failure not in REDIS_ON_FAILURE:
        raise ConfigError(f"policy.redis_on_failure: {cfg.redis_on_failure!r} is not one of "
                          f"{', '.join(REDIS_ON_FAILURE)}")  # fmt: skip
    return replace(
        cfg,
        jwks_refresh=_positive("policy.jwks_refresh", cfg.jwks_refresh),
        jwks_timeout=_positive("policy.jwks_timeout", cfg.jwks_timeout),
        redis_timeout=_positive("policy.redis_timeout", cfg.redis_timeout),
    )


def _kubernetes(raw: Any) -> KubernetesConfig:
    cfg = replace(KubernetesConfig(), **_section("kubernetes", raw, KubernetesConfig))
    for key in ("enabled", "policies", "annotate", "probe_snat"):
        if not isinstance(getattr(cfg, key), bool):
            raise ConfigError(f"kubernetes.{key}: {getattr(cfg, key)!r} is not true or false")
    if not isinstance(cfg.kubeconfig, str):
        raise ConfigError(f"kubernetes.kubeconfig: {cfg.kubeconfig!r} is not a path")
    _label("kubernetes.system_namespace", cfg.system_namespace)
    return replace(cfg, scan_interval=_positive("kubernetes.scan_interval", cfg.scan_interval))


def _labels(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    try:
        return names.labels(_mapping(key, value))
    except names.InvalidName as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _workloads(raw: Any) -> tuple[WorkloadSpec, ...]:
    specs = []
    for index, item in enumerate(_list("workloads", raw)):
        key = f"workloads[{index}]"
        values = _section(key, item, WorkloadSpec)
        missing = sorted({"netns", "namespace", "service_account"} - set(values))
        if missing:
            raise ConfigError(f"{key}: missing {', '.join(missing)}")
        labels = _labels(f"{key}.labels", values.pop("labels", None))
        spec = WorkloadSpec(**{k: _text(f"{key}.{k}", v) for k, v in values.items()}, labels=labels)
        _label(f"{key}.namespace", spec.namespace)
        _label(f"{key}.service_account", spec.service_account)
        specs.append(spec)
    netns = [s.netns for s in specs]
    dupes = sorted({n for n in netns if netns.count(n) > 1})
    if dupes:
        raise ConfigError(f"workloads: netns listed more than once: {', '.join(dupes)}")
    return tuple(specs)


def _node_name(values: dict[str, Any]) -> str:
    """`node_name`, else $NODE_NAME (a DaemonSet's downward API), else the host name."""
    key, value = "node_name", values.get("node_name")
    if value is None and os.environ.get("NODE_NAME"):
        key, value = "NODE_NAME (environment)", os.environ["NODE_NAME"]
    if value is None:
        return Config().node_name  # the host name: checked where it is used, `node_name_of`
    try:
        return names.node_name(value)
    except names.InvalidName as exc:
        raise ConfigError(f"{key}: {exc}") from None


def node_name_of(config: Config) -> str:
    """The node name, checked: the default (the host name) is only checked where it names a
    file (the agent, `agent cleanup`), so processes that never use it are not stopped by it."""
    try:
        return names.node_name(config.node_name)
    except names.InvalidName:
        raise ConfigError(
            f"node_name: the host name {config.node_name!r} is not a valid node name (a "
            "lower-case DNS name); set node_name in the config"
        ) from None


def parse_config(raw: Any) -> Config:
    """Validate a decoded YAML document into a `Config` (pure)."""
    values = _section("config", raw, Config)
    return Config(
        node_name=_node_name(values),
        redirection=_redirection(values.get("redirection")),
        proxy=_proxy(values.get("proxy")),
        limits=_limits(values.get("limits")),
        agent=_agent(values.get("agent")),
        identity=_identity(values.get("identity")),
        mesh=_mesh(values.get("mesh")),
        policy=_policy(values.get("policy")),
        kubernetes=_kubernetes(values.get("kubernetes")),
        telemetry=_telemetry(values.get("telemetry")),
        workloads=_workloads(values.get("workloads")),
    )


def _telemetry(raw: Any) -> TelemetryConfig:
    try:
        return parse_telemetry(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: Path | None) -> Config:
    """Read and validate a YAML file, or return the embedded default when `path` is None."""
    if path is None:
        return parse_config(None)
    import yaml  # only when there is a file: the everyday commands run without one

    # libyaml where there is one: linear time, and nesting past its limit is a YAMLError; the
    # pure-Python loader takes seconds on 3,000 unclosed brackets, and recurses on deep nesting
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        raw = yaml.load(path.read_text(), Loader=loader)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"config {path} nests collections too deeply") from None
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc
