"""Network namespaces: naming them, identifying them, and running code inside them.

A workload on a standalone host *is* a network namespace, named by `ip netns` (a bind mount under
/var/run/netns) or given as any path to an nsfs file (`/proc/<pid>/ns/net`, a bind mount
elsewhere).  `resolve_netns` turns what the user typed into a path and checks, with the
`NS_GET_NSTYPE` ioctl, that it really is a network namespace, so a typo is an error and not an
enrollment of nothing.

A namespace's identity is `agent.netns_id.NetnsId` (device and inode of its nsfs file); enrollment
is keyed by it, never by a path.  `host_namespaces`
names the namespaces that must never be enrolled: the one this process runs in (the node's own)
and PID 1's (the host's), as far as they can be seen.

`entered(fd)` switches only the calling thread into a namespace (setns(2) with CLONE_NEWNET,
`agent.linux.setns`) and back again on exit.  Sockets created meanwhile stay in that namespace for
their whole life, which is what lets one process hold listeners and upstream connections inside
every pod.  `NetnsExecutor` is a dedicated thread for blocking work that must happen inside a
namespace (python-iptables, netlink), so the caller's thread never moves.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from agent.linux import is_netns_fd, open_thread_netns, setns
from agent.netns_id import NetnsId, netns_path

HOST_NAMESPACES = (
    ("/proc/1/ns/net", "the host's network namespace (PID 1's)"),
    ("/proc/self/ns/net", "the network namespace the agent itself runs in (the node's own)"),
)

T = TypeVar("T")


class NetnsError(ValueError):
    """The named network namespace does not exist or is not a network namespace."""


def resolve_netns(name_or_path: str) -> tuple[Path, NetnsId]:
    """The path and identity of a live network namespace, or `NetnsError` naming the input."""
    if not name_or_path or name_or_path in {".", ".."}:
        raise NetnsError(f"invalid network namespace {name_or_path!r}")
    path = netns_path(name_or_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(
            f"network namespace {name_or_path!r} does not exist ({path} not found; "
            "see `ip netns list`)"
        ) from None
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {str(path)!r}: {exc.strerror}") from None
    try:
        if not is_netns_fd(fd):
            raise NetnsError(f"{str(path)!r} is not a network namespace")
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return path, NetnsId(st.st_dev, st.st_ino)


def host_namespaces() -> dict[NetnsId, str]:
    """The namespaces never to enroll, each with what it is: PID 1's and this process's own."""
    found: dict[NetnsId, str] = {}
    for path, what in HOST_NAMESPACES:
        with contextlib.suppress(OSError):  # PID 1's may be hidden (hardened /proc, no root)
            st = os.stat(path)
            found.setdefault(NetnsId(st.st_dev, st.st_ino), what)
    return found


def pod_addresses() -> tuple[str, ...]:
    """The global unicast addresses of the calling thread's netns (run it inside a pod)."""
    from pyroute2 import IPRoute  # ~20 MB: loaded only where addresses are read

    with IPRoute() as ipr:
        found = []
        for message in ipr.get_addr():
            address = ipaddress.ip_address(dict(message["attrs"])["IFA_ADDRESS"])
            if not (address.is_loopback or address.is_link_local):
                found.append(str(address))
        return tuple(sorted(found))


def open_netns(path: Path | str) -> int:
    """An O_CLOEXEC fd on the namespace; it keeps the namespace alive while open."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if not is_netns_fd(fd):
        os.close(fd)
        raise NetnsError(f"{str(path)!r} is not a network namespace")
    return fd


@contextmanager
def entered(netns_fd: int) -> Iterator[None]:
    """Run the block with the calling thread inside `netns_fd`; always switch back."""
    home = open_thread_netns()
    try:
        setns(netns_fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


class NetnsExecutor:
    """One dedicated thread that runs blocking calls inside a given namespace, one at a time."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor  # only where namespaces are entered

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")

    def call(self, netns: Path | str | int, fn: Callable[[], T]) -> T:
        return self._pool.submit(_call_inside, netns, fn).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _call_inside(netns: Path | str | int, fn: Callable[[], T]) -> T:
    fd = netns if isinstance(netns, int) else open_netns(netns)
    try:
        with entered(fd):
            return fn()
    finally:
        if not isinstance(netns, int):
            os.close(fd)
