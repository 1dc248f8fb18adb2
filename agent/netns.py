"""Network namespaces: naming them, checking them, and running code inside them.

A workload on a standalone host *is* a network namespace, named by `ip netns` (a bind mount under
/var/run/netns) or given as any path to an nsfs file (`/proc/<pid>/ns/net`).  `resolve_netns`
turns what the user typed into a path and checks, with the `NS_GET_NSTYPE` ioctl, that it really is
a network namespace, so a typo is an error and not an enrollment of nothing.

`entered(fd)` switches only the calling thread into a namespace (pyroute2's `setns`, i.e.
`setns(2)` with CLONE_NEWNET) and back again on exit.  Sockets created meanwhile stay in that
namespace for their whole life, which is what lets one process hold listeners and upstream
connections inside every pod.  `NetnsExecutor` is a dedicated thread for blocking work that must
happen inside a namespace (python-iptables, netlink), so the caller's thread never moves.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

NETNS_RUN_DIR = Path("/var/run/netns")
NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(ValueError):
    """The named network namespace does not exist or is not a network namespace."""


def resolve_netns(name_or_path: str) -> Path:
    """Map `web` to /var/run/netns/web (a path stays a path) and check it is a live netns."""
    if not name_or_path or name_or_path in {".", ".."}:
        raise NetnsError(f"invalid network namespace {name_or_path!r}")
    path = Path(name_or_path) if "/" in name_or_path else NETNS_RUN_DIR / name_or_path
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
    finally:
        os.close(fd)
    return path


def is_netns_fd(fd: int) -> bool:
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def netns_inode(path: Path | str) -> int:
    """The namespace's inode: stable while it lives, so it tells a recreated netns apart."""
    return os.stat(path).st_ino


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
    from pyroute2 import netns as pyroute2_netns  # ~20 MB: loaded only where netns are entered

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pyroute2_netns.setns(netns_fd)
        try:
            yield
        finally:
            pyroute2_netns.setns(home)
    finally:
        os.close(home)


class NetnsExecutor:
    """One dedicated thread that runs blocking calls inside a given namespace, one at a time."""

    def __init__(self) -> None:
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
