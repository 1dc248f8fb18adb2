"""Choosing a node's redirection backend, and building it.

`redirection.backend` (or `agent run --backend`) names a backend or `auto`.  `select_backend`
turns that into a `Choice` (a backend and the reason, which `agent status` shows): a named
backend is checked to be usable here (an unusable one is a `ConfigError` saying why, before
anything starts); `auto` gathers `HostRules` on the host (`host_rules`: the legacy save
commands, `nft list ruleset` through libnftables, and what each backend needs) and lets the pure
`agent.redirect.detect.choose_backend` decide.

`make_backend` builds the chosen backend as a `SoleRedirection` over every other usable backend,
so applying it takes pods over from them (see `agent.redirect.backend`); `every_backend` builds
them all, for `agent cleanup`, which removes every backend's rules.

Whether each backend can run here: iptables always (python-iptables is a dependency);
nftables when Debian's `python3-nftables` bindings import and the kernel answers a listing;
eBPF when `agent.redirect.ebpf.support()` says so (the kernel loads its program types, kernel
headers and bcc are there; the reason names the headers, and warns when they are not the
running kernel's, which `agent status` shows).  eBPF as another backend (not selected) only
reads and removes what is pinned under the state dir: it never compiles or creates anything.
The kernel libraries load only here, when a backend is built or detected.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.config import ConfigError, RedirectionConfig
from agent.redirect.backend import ForeignRules, RedirectionBackend, SoleRedirection
from agent.redirect.detect import BackendName, Choice, HostRules, choose_backend

if TYPE_CHECKING:
    from agent.netns import NetnsExecutor

LEGACY_SAVE = ("iptables-legacy-save", "ip6tables-legacy-save")


class Backend(RedirectionBackend, ForeignRules, Protocol):
    """A real backend: it redirects, and it can give a pod up to another one."""


def ebpf_support() -> tuple[bool, str]:
    """Whether the eBPF backend can run on this node, and why (not)."""
    from agent.redirect.ebpf import support

    return support()


def _nftables_probe() -> tuple[bool, str, str]:
    """(usable, why, `nft list ruleset` of this thread's netns)."""
    try:
        from agent.redirect.nftables import list_ruleset
    except ImportError as exc:
        return False, f"the nftables Python bindings do not import ({exc}; Debian package " \
            "python3-nftables)", ""  # fmt: skip
    try:
        return True, "libnftables answers", list_ruleset()
    except ValueError as exc:  # RedirectionError: the kernel refused the listing
        return False, str(exc), ""


def nftables_support() -> tuple[bool, str]:
    usable, why, _ruleset = _nftables_probe()
    return usable, why


def _legacy_save(tool: str) -> str:
    """`tool`'s output; nothing when it is not installed (then no legacy rules can be seen)."""
    try:
        done = subprocess.run([tool], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return ""
    if done.returncode != 0:
        raise ConfigError(f"redirection.backend: auto: `{tool}` failed: {done.stderr.strip()}")
    return done.stdout


def host_rules() -> HostRules:
    """What `auto` decides on, read in the calling thread's network namespace (the host's)."""
    nft_ok, nft_why, ruleset = _nftables_probe()
    legacy = "".join(_legacy_save(tool) for tool in LEGACY_SAVE)
    return HostRules(legacy, ruleset, ebpf_support(), (nft_ok, nft_why))


def _support(name: BackendName) -> tuple[bool, str]:
    if name == "nftables":
        return nftables_support()
    if name == "ebpf":
        return ebpf_support()
    return True, "python-iptables"


def select_backend(cfg: RedirectionConfig, origin: str = "redirection.backend") -> Choice:
    """The backend `cfg.backend` means on this node; `origin` says who set it (for the reason).
    A named backend that cannot run here is a `ConfigError` naming it and why."""
    name = cfg.backend
    if name == "auto":
        return choose_backend(host_rules())
    usable, why = _support(name)
    if not usable:
        raise ConfigError(f"{origin}: {name!r} cannot run on this node: {why}")
    return Choice(name, f"{origin} is {name}" + (f"; {why}" if name == "ebpf" else ""))


def _build(
    name: BackendName, cfg: RedirectionConfig, executor: NetnsExecutor, state_dir: Path, load: bool
) -> Backend:
    if name == "ebpf":
        from agent.redirect.ebpf import EbpfRedirection

        return EbpfRedirection(cfg, executor, state_dir, load=load)
    if name == "nftables":
        from agent.redirect.nftables import NftablesRedirection

        return NftablesRedirection(cfg, executor)
    if name == "iptables":
        from agent.redirect.iptables import IptablesRedirection

        return IptablesRedirection(cfg, executor)


def every_backend(
    cfg: RedirectionConfig, executor: NetnsExecutor, state_dir: Path, chosen: str = ""
) -> list[Backend]:
    """Every backend that can run on this node; only `chosen` loads (eBPF: its programs)."""
    names: tuple[BackendName, ...] = ("iptables", "nftables", "ebpf")
    return [
        _build(name, cfg, executor, state_dir, name == chosen)
        for name in names
        if _support(name)[0]
    ]


def make_backend(
    choice: Choice,
    cfg: RedirectionConfig,
    executor: NetnsExecutor,
    state_dir: Path,
    read_only: bool = False,
) -> SoleRedirection:
    """The chosen backend, taking pods over from every other usable backend; `read_only` (for
    `agent status`): the eBPF backend reads what is pinned and loads nothing."""
    backends = every_backend(cfg, executor, state_dir, "" if read_only else choice.backend)
    selected = [b for b in backends if b.name == choice.backend]
    if not selected:
        raise ConfigError(f"redirection.backend: {choice.backend!r} cannot run on this node")
    others = [b for b in backends if b.name != choice.backend]
    return SoleRedirection(selected[0], others)
