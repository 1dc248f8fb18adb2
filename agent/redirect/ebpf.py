"""The eBPF redirection backend: cgroup connect hooks out, sk_lookup in (programs in bpf/ferry.c).

Outbound.  `connect4`/`connect6` (and `sockops`, `getsockopt`) are attached once, as bpf_links,
at the root of the cgroup v2 hierarchy (the host's, also from a container's own cgroup namespace:
`agent.redirect.cgroup_root`), and act only on sockets whose network namespace cookie is in the
`enrolled` map, which `apply` fills.  The root rather than each pod's own cgroup,
because a workload here is a network namespace: a standalone netns (`ip netns add`) has no cgroup
of its own, and a Kubernetes pod's processes may sit in several cgroups (one per container,
created after the CNI ran), while the netns exists before any of them and is the one thing every
socket of the pod shares.  One attachment also means enrollment costs a map update and no
attach, and the hooks' cost for an unenrolled process is one hash lookup.  (A container's own
cgroup attachments, with BPF_F_ALLOW_MULTI semantics of links, run alongside ours.)  The proxy's
own sockets carry `RedirectionConfig.mark` (SO_MARK, set before connect), which the hooks skip.

Original destination.  connect4/6 keep the destination the app asked for under the socket's
cookie; `sockops` moves it, once the connection is established, under (netns, the app's address
and port), the peer of the socket the proxy accepts; `getsockopt` answers the proxy's
`SO_ORIGINAL_DST` from it.  So the proxy reads the original destination the same way for every
backend (conntrack answers it after an iptables/nftables REDIRECT), with no per-connection map
syscall or pin path in its data path; the price is one small program run on getsockopt calls on
the node, which returns at its first comparison for any other option.

Inbound.  Each pod's netns gets its own `sk_lookup` link: a copy of the program with the pod's
netns cookie patched in (sk_lookup programs cannot ask for it), which hands every TCP connection
that arrives (except the proxy's own deliveries to the app, which `sockops` records by 4-tuple
while they are set up) to the proxy's inbound listener of that netns and family, except the
tunnel port and excluded ports.  The proxy puts its listeners into the `listeners` SOCKHASH
(`ebpf_listeners`); when it is down they are gone and connections are refused: fail closed.  It
reads the original destination with getsockname().

Return path.  The proxy delivers to the app from a socket bound to the client's address
(IP_TRANSPARENT), as with iptables, so the app's replies must be routed back to the proxy, not to
the client.  The connect hooks give such a delivery socket (a proxy-marked socket bound before
connect) the connmark; `net.ipv4.tcp_fwmark_accept=1` in the pod makes the app's accepted socket
take the mark of that SYN; and the policy route of `agent.redirect.routing` (the same rule and
table as the iptables backend's, shared state between backends) sends packets with the connmark
over lo to the proxy.  No netfilter rule is involved.

Same-node fast path (`redirection.kernel_fastpath`, the config map's `fastpath`).  `sockops`
puts the app sockets of proxied connections into the `apps` SOCKHASH; the `fastpath` program is
its sk_msg verdict (BPF_PROG_ATTACH, no link: the map holds it).  The proxy offers joins for
uninspected same-node connections (`agent.proxy.fastpath`, maps `legs` and `joins`), and each
app's sends then go straight into the proxy's socket toward the other app (bpf/ferry.c), as long
as that socket's backlog stays small (`leg_acked`, kept by `sockops` on every ACK).

State.  Maps, programs and links are pinned under `<state dir>/bpf` (a bpffs instance Ferry
mounts there unless one already is): `maps/<name>`, `progs/<object key>/<name>`,
`links/cgroup-<program>` and `links/netns-<cookie>`.  An agent restart finds them and reuses
them (no compile, nothing detached, the proxy's listeners stay registered); a new object (other
source or headers) replaces the programs under the same links with BPF_LINK_UPDATE, atomically.
Programs are compiled once per boot in a child process and cached (`ebpf_object`; in the state
dir, or in $FERRY_BPF_CACHE_DIR, which the test suite shares); the agent itself never maps LLVM.
`inspect` reads back from the kernel which programs are attached to the cgroup root and to the
pod's netns, the enrolled cookie, the config and exclusion maps, the routing and the sysctl, so
a detached link (`bpftool link detach`) or an edited map is drift, which `apply` repairs.  When
the last pod is removed the cgroup links go too; `cleanup(state_dir)` removes everything.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from agent.config import RedirectionConfig
from agent.netns import NetnsExecutor
from agent.redirect import bpf_syscall as sys_bpf
from agent.redirect.cgroup_root import cgroup2_root
from agent.redirect.ebpf_object import MAPS, PROGRAMS, BpfObject, ObjectError, bcc_version
from agent.redirect.ebpf_object import load_or_compile as load_object
from agent.redirect.kernel_headers import HeadersError, KernelHeaders, find_headers
from agent.redirect.routing import apply_routing, desired_routing, read_routing, remove_routing
from agent.redirect.rules import RedirectionError, RedirectionReport, compare

T = TypeVar("T")

PIN_DIR = "bpf"
CACHE_ENV = "FERRY_BPF_CACHE_DIR"  # where the compiled object is cached (default: the state dir)
SO_NETNS_COOKIE = 71
CGROUP_PROGRAMS = ("connect4", "connect6", "sockops", "getsockopt")
KERNEL_NAMES = {
    "connect4": "ferry_connect4",
    "connect6": "ferry_connect6",
    "sockops": "ferry_sockops",
    "getsockopt": "ferry_sockopt",
    "sk_lookup": "ferry_sk_lookup",
    "fastpath": "ferry_fastpath",
}
OUTBOUND, INBOUND = 0, 1
FWMARK_ACCEPT = "net/ipv4/tcp_fwmark_accept"
SYSCTL_LINE = "sysctl -w net.ipv4.tcp_fwmark_accept=1"
_CONFIG = struct.Struct("=IIIHHHHI")  # struct config in bpf/ferry.c
_PORT_KEY = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")


def pin_root(state_dir: Path) -> Path:
    return state_dir / PIN_DIR


def netns_cookie() -> int:
    """The calling thread's network namespace cookie (what bpf_get_netns_cookie returns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return int(_U64.unpack(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])


def support() -> tuple[bool, str]:
    """Whether this node can run the eBPF backend, and why (not)."""
    if bcc_version() is None:
        return False, "bcc is not importable (Debian package python3-bpfcc; make setup links it)"
    try:
        headers = find_headers()
        cgroup = cgroup2_root()
    except (HeadersError, RedirectionError) as exc:
        return False, str(exc)
    trivial = bytes.fromhex("b701000001000000bf100000000000009500000000000000")
    for name, (prog_type, attach_type) in PROGRAMS.items():
        try:
            os.close(sys_bpf.prog_load(f"ferry_probe_{name}"[:15], prog_type, attach_type, trivial))
        except OSError as exc:
            return False, f"the kernel refuses a {name} eBPF program: {exc}"
    note = f"; {headers.warning}" if headers.warning else ""
    return True, (
        f"cgroup v2 at {cgroup}, sk_lookup, sockops and sockopt hooks load; "
        f"headers {headers.version}{note}"
    )


class EbpfRedirection:
    """In-pod redirection with cgroup connect hooks (outbound) and sk_lookup (inbound).

    With `load` (the node's selected backend), construction loads (or reuses) the pinned maps
    and programs and writes the configuration, before any pod is enrolled: the proxy finds the
    listener map from then on; it raises `RedirectionError` (or `HeadersError`) naming what is
    missing.  Without it (another backend is selected, or `agent status` reads), it only reads
    and removes what is pinned under the state dir, never compiling or creating anything until
    `apply` needs it.
    """

    name = "ebpf"

    def __init__(
        self,
        cfg: RedirectionConfig,
        executor: NetnsExecutor,
        state_dir: Path,
        *,
        cache_dir: Path | None = None,
        headers: KernelHeaders | None = None,
        load: bool = True,
    ) -> None:
        self.cfg = cfg
        self.executor = executor
        self.routing = desired_routing(cfg)
        self.root = pin_root(state_dir)
        self.cache_dir = cache_dir or Path(os.environ.get(CACHE_ENV) or state_dir)
        self.headers = headers
        self.warning = ""
        self.object: BpfObject | None = None
        self._lock = threading.Lock()
        self._maps: dict[str, int] = {}
        self._specs: dict[str, sys_bpf.MapSpec] = {}
        self._progs: dict[str, int] = {}
        if load:
            self.load()

    def load(self) -> None:
        """Compile (once, cached) or reuse the object, create or reuse the pinned maps and
        programs, write the config, and move attached hooks to a new object's programs."""
        headers = self.headers or find_headers()
        self.headers, self.warning = headers, headers.warning
        with self._lock:
            self._close()
            try:
                self.object = load_object(self.cache_dir, headers)
                self._load(self.object)
            except (OSError, ObjectError) as exc:
                self._close()
                raise RedirectionError(f"eBPF backend under {self.root}: {exc}") from exc

    @cached_property
    def cgroup(self) -> Path:
        return cgroup2_root()

    # --------------------------------------------------------------- protocol
    def apply(self, netns: Path) -> None:
        """Enroll `netns`: the return-path routing and sysctl in the pod, hooks attached, config
        current, cookie enrolled, sk_lookup linked."""

        def inside() -> int:
            apply_routing(self.cfg)
            _write_sysctl(FWMARK_ACCEPT, "1")
            return netns_cookie()

        obj = self.object
        if obj is None:
            self.load()
            obj = self._loaded()
        cookie = self._call(netns, inside)
        with self._errors(netns), self._lock:
            self._write_config()
            self._ensure_cgroup_links()
            sys_bpf.map_update(
                self._maps["enrolled"], _U64.pack(cookie), _U32.pack(1), "enrolling netns"
            )
            self._ensure_netns_link(obj, netns, cookie)

    def remove(self, netns: Path) -> None:
        """Forget `netns` (and detach the cgroup hooks when no pod is left), then its routing
        and sysctl; fine if absent.  Not loaded (another backend selected): only a pod that
        eBPF redirection still holds has anything removed."""
        if self.object is None and not self.own_rules(netns):
            return
        self.remove_own_rules(netns)
        self._call(netns, lambda: remove_routing(self.cfg))

    def inspect(self, netns: Path) -> RedirectionReport:
        """Compare what the kernel holds for `netns` with what Ferry wants there."""

        def inside() -> tuple[int, tuple[str, ...]]:
            lines = read_routing(self.cfg).commands()
            if _read_sysctl(FWMARK_ACCEPT) == "1":
                lines += (SYSCTL_LINE,)
            return netns_cookie(), lines

        cookie, pod = self._call(netns, inside)
        desired = self.desired_lines(cookie)
        if not self._opened():
            return compare(desired, ())
        with self._errors(netns), self._lock:
            pod = self._observed_pod(netns, cookie) + pod
            observed = self._observed_global() + pod if pod else ()
            return compare(desired, observed)

    def own_rules(self, netns: Path) -> tuple[str, ...]:
        """This pod's enrollment, sk_lookup link and sysctl as lines (for another backend
        taking over; the routing, shared with the other backends, is not included)."""
        if not self._opened():
            return ()

        def inside() -> tuple[int, str]:
            return netns_cookie(), _read_sysctl(FWMARK_ACCEPT)

        cookie, accept = self._call(netns, inside)
        with self._errors(netns), self._lock:
            lines = self._observed_pod(netns, cookie)
        return lines + ((SYSCTL_LINE,) if lines and accept == "1" else ())

    def remove_own_rules(self, netns: Path) -> None:
        """Forget this pod here, detach its sk_lookup link and reset the sysctl, leaving the
        shared routing; the last pod gone (removed, or taken over by another backend), detach
        the cgroup hooks too."""
        if not self._opened():
            return

        def inside() -> int:
            _write_sysctl(FWMARK_ACCEPT, "0")
            return netns_cookie()

        cookie = self._call(netns, inside)
        with self._errors(netns), self._lock:
            sys_bpf.map_delete(self._maps["enrolled"], _U64.pack(cookie))
            _drop_link(self._netns_link(cookie))
            if not sys_bpf.map_keys(self._maps["enrolled"], 8):
                for name in CGROUP_PROGRAMS:
                    _drop_link(self._cgroup_link(name))

    def installed(self, netns: Path) -> bool:
        """Whether this pod is enrolled here or holds an sk_lookup link of Ferry's."""
        return bool(self.own_rules(netns))

    def close(self) -> None:
        """Close this process's fds on maps and programs; pins (and the kernel state) stay."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        for fd in (*self._maps.values(), *self._progs.values()):
            os.close(fd)
        self._maps.clear()
        self._specs.clear()
        self._progs.clear()

    def _loaded(self) -> BpfObject:
        if self.object is None:
            raise RedirectionError(f"the eBPF backend under {self.root} is not loaded")
        return self.object

    def _opened(self) -> bool:
        """Whether the maps are open: loaded, or pinned by an earlier load (opened now)."""
        with self._lock:
            if self._maps:
                return True
            if not (self.root / "maps" / "enrolled").exists():
                return False
            try:
                for name in MAPS:
                    fd = sys_bpf.obj_get(self.root / "maps" / name)
                    self._maps[name], self._specs[name] = fd, sys_bpf.map_info(fd)
            except OSError as exc:
                self._close()
                raise RedirectionError(f"eBPF maps pinned under {self.root}: {exc}") from exc
            return True

    # ----------------------------------------------------------------- desired
    def desired_lines(self, cookie: int) -> tuple[str, ...]:
        lines = [self._cgroup_line(name) for name in CGROUP_PROGRAMS]
        lines.append(_config_line(self._config_value()))
        lines += [_port_line(d, p) for d, p in sorted(self._excluded_ports())]
        lines += [f"bpf exclude outbound cidr {c}" for c in sorted(self._excluded_cidrs())]
        lines.append(f"bpf enrolled netns {cookie}")
        lines.append(f"bpf sk_lookup {KERNEL_NAMES['sk_lookup']} attached to netns {cookie}")
        return tuple(lines) + self.routing.commands() + (SYSCTL_LINE,)

    def _cgroup_line(self, name: str) -> str:
        return f"bpf cgroup {name} {KERNEL_NAMES[name]} attached at {self.cgroup}"

    def _config_value(self) -> bytes:
        c = self.cfg
        return _CONFIG.pack(
            c.mark & c.mark_mask,
            c.mark_mask,
            c.connmark & c.mark_mask,
            c.outbound_port,
            c.inbound_port,
            c.tunnel_port,
            1 if c.ipv6 else 0,
            1 if c.kernel_fastpath else 0,
        )

    def _excluded_ports(self) -> set[tuple[int, int]]:
        return {(OUTBOUND, p) for p in self.cfg.exclude_outbound_ports} | {
            (INBOUND, p) for p in self.cfg.exclude_inbound_ports
        }

    def _excluded_cidrs(self) -> set[str]:
        return {str(ipaddress.ip_network(c, strict=False)) for c in self.cfg.exclude_outbound_cidrs}

    # ---------------------------------------------------------------- observed
    def _observed_global(self) -> tuple[str, ...]:
        lines: list[str] = []
        cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in CGROUP_PROGRAMS:
                attached = sys_bpf.prog_query(cgroup_fd, PROGRAMS[name][1])
                with _pinned(self._cgroup_link(name)) as link:
                    if link is not None and sys_bpf.link_info(link).prog_id in attached:
                        lines.append(self._cgroup_line(name))
        finally:
            os.close(cgroup_fd)
        config = sys_bpf.map_lookup(self._maps["config"], _U32.pack(0), _CONFIG.size)
        if config is not None and config != bytes(_CONFIG.size):
            lines.append(_config_line(config))
        ports = sys_bpf.map_keys(self._maps["excluded_ports"], _PORT_KEY.size)
        lines += [_port_line(d, p) for p, d in sorted(_PORT_KEY.unpack(k) for k in ports)]
        cidrs = [_cidr(k) for k in sys_bpf.map_keys(self._maps["excluded_cidr4"], 8)]
        cidrs += [_cidr(k) for k in sys_bpf.map_keys(self._maps["excluded_cidr6"], 20)]
        lines += [f"bpf exclude outbound cidr {c}" for c in sorted(cidrs)]
        return tuple(lines)

    def _observed_pod(self, netns: Path, cookie: int) -> tuple[str, ...]:
        lines = []
        if sys_bpf.map_lookup(self._maps["enrolled"], _U64.pack(cookie), 4) is not None:
            lines.append(f"bpf enrolled netns {cookie}")
        if self._netns_link_attached(netns, cookie):
            lines.append(f"bpf sk_lookup {KERNEL_NAMES['sk_lookup']} attached to netns {cookie}")
        return tuple(lines)

    # ----------------------------------------------------------------- loading
    def _load(self, obj: BpfObject) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, mode=0o700)
        if not sys_bpf.is_bpffs(self.root):
            sys_bpf.mount_bpffs(self.root)
        for directory in ("maps", "progs", "links"):
            (self.root / directory).mkdir(exist_ok=True)
        for spec in obj.maps:
            self._open_map(spec)
        progs = self.root / "progs" / obj.key
        progs.mkdir(exist_ok=True)
        for name in CGROUP_PROGRAMS:
            path = progs / name
            try:
                self._progs[name] = sys_bpf.obj_get(path)
            except FileNotFoundError:
                program = obj.program(name)
                code = obj.instructions(program, self._maps)
                fd = sys_bpf.prog_load(
                    KERNEL_NAMES[name], program.prog_type, program.attach_type, code
                )
                self._progs[name] = fd
                sys_bpf.obj_pin(fd, path)
        self._attach_fastpath(obj, progs / "fastpath")
        for old in (self.root / "progs").iterdir():
            if old != progs:
                shutil.rmtree(old)  # unpinning; links keep what they run until updated
        self._write_config()
        for name in CGROUP_PROGRAMS:  # a new object: the attached hooks run it from now on
            self._update_link(self._cgroup_link(name), name)
        for path in (self.root / "links").glob("netns-*"):
            self._update_netns_link(obj, path)

    def _attach_fastpath(self, obj: BpfObject, path: Path) -> None:
        """The same-node fast path's sk_msg verdict program, on the `apps` SOCKHASH (the map
        holds it as long as the map lives; attaching again replaces it)."""
        try:
            fd = sys_bpf.obj_get(path)
        except FileNotFoundError:
            program = obj.program("fastpath")
            code = obj.instructions(program, self._maps)
            name = KERNEL_NAMES["fastpath"]
            fd = sys_bpf.prog_load(name, program.prog_type, program.attach_type, code)
            sys_bpf.obj_pin(fd, path)
        try:
            what = f"the fast path to {self.root / 'maps' / 'apps'}"
            sys_bpf.prog_attach(fd, self._maps["apps"], sys_bpf.ATTACH_SK_MSG_VERDICT, what)
        finally:
            os.close(fd)

    def _open_map(self, spec: sys_bpf.MapSpec) -> None:
        path = self.root / "maps" / spec.name
        try:
            fd = sys_bpf.obj_get(path)
        except FileNotFoundError:
            pass
        else:
            if sys_bpf.map_info(fd) == spec:
                self._maps[spec.name], self._specs[spec.name] = fd, spec
                return
            os.close(fd)  # another layout (an older object): replaced, its contents rebuilt
            path.unlink()
        fd = sys_bpf.map_create(spec)
        self._maps[spec.name], self._specs[spec.name] = fd, spec
        sys_bpf.obj_pin(fd, path)

    def _prog_id(self, name: str) -> int:
        return sys_bpf.prog_info(self._progs[name]).id

    # ------------------------------------------------------------------- config
    def _write_config(self) -> None:
        sys_bpf.map_update(
            self._maps["config"], _U32.pack(0), self._config_value(), "writing the config map"
        )
        ports = {_PORT_KEY.pack(p, d) for d, p in self._excluded_ports()}
        self._sync_set("excluded_ports", ports)
        v4: set[bytes] = set()
        v6: set[bytes] = set()
        for text in self._excluded_cidrs():
            net = ipaddress.ip_network(text)
            key = _U32.pack(net.prefixlen) + net.network_address.packed
            (v4 if net.version == 4 else v6).add(key)
        self._sync_set("excluded_cidr4", v4)
        self._sync_set("excluded_cidr6", v6)

    def _sync_set(self, name: str, keys: set[bytes]) -> None:
        fd, spec = self._maps[name], self._specs[name]
        for key in sys_bpf.map_keys(fd, spec.key_size):
            if key not in keys:
                sys_bpf.map_delete(fd, key)
        for key in keys:
            sys_bpf.map_update(fd, key, b"\1", f"writing {name}")

    # -------------------------------------------------------------------- links
    def _cgroup_link(self, name: str) -> Path:
        return self.root / "links" / f"cgroup-{name}"

    def _netns_link(self, cookie: int) -> Path:
        return self.root / "links" / f"netns-{cookie}"

    def _ensure_cgroup_links(self) -> None:
        cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in CGROUP_PROGRAMS:
                path = self._cgroup_link(name)
                attached = sys_bpf.prog_query(cgroup_fd, PROGRAMS[name][1])
                with _pinned(path) as link:
                    if link is not None and sys_bpf.link_info(link).prog_id in attached:
                        continue
                _drop_link(path)
                what = f"{name} at cgroup {self.cgroup}"
                fd = sys_bpf.link_create(self._progs[name], cgroup_fd, PROGRAMS[name][1], what)
                try:
                    sys_bpf.obj_pin(fd, path)
                finally:
                    os.close(fd)
        finally:
            os.close(cgroup_fd)

    def _update_link(self, path: Path, name: str) -> None:
        with _pinned(path) as link:
            if link is not None and sys_bpf.link_info(link).prog_id != self._prog_id(name):
                sys_bpf.link_update(link, self._progs[name], f"link {path}")

    def _update_netns_link(self, obj: BpfObject, path: Path) -> None:
        cookie = int(path.name.removeprefix("netns-"))
        with _pinned(path) as link:
            if link is None:
                return
            prog = self._load_sk_lookup(obj, cookie)
            try:
                sys_bpf.link_update(link, prog, f"link {path}")
            except OSError as exc:
                if exc.errno != errno.ENOLINK:  # detached (netns gone): apply repairs or forgets
                    raise
            finally:
                os.close(prog)

    def _load_sk_lookup(self, obj: BpfObject, cookie: int) -> int:
        program = obj.program("sk_lookup")
        code = obj.instructions(program, self._maps, netns=cookie)
        name = KERNEL_NAMES["sk_lookup"]
        return sys_bpf.prog_load(name, program.prog_type, program.attach_type, code)

    def _netns_link_attached(self, netns: Path, cookie: int) -> bool:
        with _pinned(self._netns_link(cookie)) as link:
            if link is None:
                return False
            prog_id = sys_bpf.link_info(link).prog_id
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return prog_id in sys_bpf.prog_query(fd, sys_bpf.ATTACH_SK_LOOKUP)
        finally:
            os.close(fd)

    def _ensure_netns_link(self, obj: BpfObject, netns: Path, cookie: int) -> None:
        if self._netns_link_attached(netns, cookie):
            return
        path = self._netns_link(cookie)
        _drop_link(path)
        prog = self._load_sk_lookup(obj, cookie)
        netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            link = sys_bpf.link_create(
                prog, netns_fd, sys_bpf.ATTACH_SK_LOOKUP, f"sk_lookup to {netns}"
            )
            try:
                sys_bpf.obj_pin(link, path)
            finally:
                os.close(link)
        finally:
            os.close(netns_fd)
            os.close(prog)

    # ------------------------------------------------------------------ helpers
    def _call(self, netns: Path, fn: Callable[[], T]) -> T:
        try:
            return self.executor.call(netns, fn)
        except RedirectionError as exc:
            raise RedirectionError(f"netns {netns}: {exc}") from exc
        except OSError as exc:
            raise RedirectionError(f"netns {netns}: {exc.strerror or exc}") from exc

    @contextmanager
    def _errors(self, netns: Path) -> Iterator[None]:
        if not self._maps:
            raise RedirectionError(f"netns {netns}: the eBPF backend is closed")
        try:
            yield
        except OSError as exc:
            raise RedirectionError(f"netns {netns}: {exc.strerror or exc}") from exc


@contextmanager
def _pinned(path: Path) -> Iterator[int | None]:
    try:
        fd = sys_bpf.obj_get(path)
    except FileNotFoundError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _drop_link(path: Path) -> None:
    """Detach the link pinned at `path` (even if someone else holds it) and unpin it."""
    with _pinned(path) as link:
        if link is None:
            return
        try:
            sys_bpf.link_detach(link, f"link {path}")
        except OSError as exc:
            if exc.errno not in (errno.ENOLINK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    path.unlink(missing_ok=True)


def cleanup(state_dir: Path) -> bool:
    """Remove every pinned Ferry eBPF object under `state_dir` (links detached first) and the
    bpffs mounted there.  For `agent cleanup`, with the agent stopped; True if there was any."""
    root = pin_root(state_dir)
    if not root.is_dir():
        return False
    for link in sorted((root / "links").glob("*")) if (root / "links").is_dir() else []:
        _drop_link(link)
    if sys_bpf.is_bpffs(root):
        if os.path.ismount(root):
            sys_bpf.unmount(root)
        else:
            for path in sorted(root.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
    root.rmdir()
    return True


def _write_sysctl(name: str, value: str) -> None:
    """Write a sysctl of the calling thread's network namespace (/proc/sys/net is per netns)."""
    with open(f"/proc/sys/{name}", "w") as knob:
        knob.write(value)


def _read_sysctl(name: str) -> str:
    with open(f"/proc/sys/{name}") as knob:
        return knob.read().strip()


def _config_line(value: bytes) -> str:
    mark, mask, connmark, outbound, inbound, tunnel, ipv6, fastpath = _CONFIG.unpack(value)
    return (
        f"bpf config mark {mark:#x}/{mask:#x} connmark {connmark:#x} outbound {outbound} "
        f"inbound {inbound} tunnel {tunnel} ipv6 {'on' if ipv6 else 'off'} "
        f"fastpath {'on' if fastpath else 'off'}"
    )


def _port_line(direction: int, port: int) -> str:
    return f"bpf exclude {'outbound' if direction == OUTBOUND else 'inbound'} port {port}"


def _cidr(key: bytes) -> str:
    """An LPM trie key (prefix length, then the address) as `10.96.0.0/12`."""
    (prefix,) = _U32.unpack_from(key)
    return str(ipaddress.ip_network((ipaddress.ip_address(key[4:]), prefix)))
