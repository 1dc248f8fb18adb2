"""Small Linux helpers that Python's standard library lacks (pure stdlib: ctypes, fcntl, socket).

- `setns(fd)`: switch the calling *thread* into the network namespace open on `fd` (setns(2)
  with CLONE_NEWNET).  Sockets created afterwards belong to that namespace for life.
- `open_thread_netns()`: an fd on the calling thread's current network namespace (to come back).
- `is_netns_fd(fd)`: whether `fd` is a network namespace (the NS_GET_NSTYPE ioctl on nsfs), so a
  typo or a regular file is never taken for a namespace.
- `set_pdeathsig(sig)`: prctl(PR_SET_PDEATHSIG): the kernel signals this process when its parent
  dies, so a worker never outlives its supervisor.
- `release_memory()`: glibc's malloc_trim, to give freed heap back after a large update.
- `reset(sock)`: close a TCP socket with an RST instead of a FIN (SO_LINGER on, timeout 0), so
  the peer sees "connection refused/reset" at once; `LINGER_RESET` is that option's value.

libc is reached through `ctypes.CDLL(None)` (the symbols already mapped into the process), once,
on first use (ctypes too is imported then): finding libc by name (`ctypes.util.find_library`)
would run ldconfig.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): the CLONE_NEW* type of a namespace fd
PR_SET_PDEATHSIG = 1
LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}
THREAD_NETNS = "/proc/thread-self/ns/net"


@cache
def _libc() -> ctypes.CDLL:
    import ctypes  # on first use: most importers only need the ioctl and the constants

    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.prctl.argtypes = (ctypes.c_int, *[ctypes.c_ulong] * 4)
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace open on `fd` (raises `OSError`)."""
    _check(_libc().setns(fd, nstype), "setns")


def open_thread_netns() -> int:
    """An O_CLOEXEC fd on the calling thread's current network namespace."""
    return os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def is_netns_fd(fd: int) -> bool:
    """True when `fd` is open on a network namespace (an nsfs file of type CLONE_NEWNET)."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits."""
    _check(_libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def release_memory() -> None:
    """Give freed heap memory back to the kernel (glibc `malloc_trim(0)`): after a large
    transient allocation, such as decoding a directory of 100,000 entries, RSS falls back to
    what is really in use.  A no-op where the C library has no malloc_trim."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def reset(sock: socket.socket) -> None:
    """Close `sock` with an RST (SO_LINGER with a zero timeout); never raises."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()
