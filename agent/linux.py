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
- `Inotify`: an inotify(7) instance (non-blocking, close-on-exec): `add_watch(path, mask)`,
  `rm_watch(wd)`, and `read()`, which returns every queued `InotifyEvent` (wd, mask, cookie,
  name) without blocking; its `fileno()` goes to a selector or an event loop's `add_reader`.

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
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): the CLONE_NEW* type of a namespace fd
PR_SET_PDEATHSIG = 1
LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}
THREAD_NETNS = "/proc/thread-self/ns/net"

# inotify(7) event bits and flags (linux/inotify.h)
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000  # the kernel's queue overflowed: events were lost (wd -1)
IN_IGNORED = 0x00008000  # the watch is gone (rm_watch, or its file was deleted / unmounted)
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # struct inotify_event {wd, mask, cookie, len}, then len bytes


@cache
def _libc() -> ctypes.CDLL:
    import ctypes  # on first use: most importers only need the ioctl and the constants

    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.prctl.argtypes = (ctypes.c_int, *[ctypes.c_ulong] * 4)
    libc.inotify_init1.argtypes = (ctypes.c_int,)
    libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc


def _check(result: int, what: str) -> int:
    """`result` of a libc call, or `OSError` (with errno) when it is negative."""
    if result < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


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


@dataclass(frozen=True, slots=True)
class InotifyEvent:
    wd: int  # the watch it belongs to (-1 for IN_Q_OVERFLOW)
    mask: int
    cookie: int  # pairs IN_MOVED_FROM with IN_MOVED_TO of one rename
    name: str  # the entry in a watched directory ("" for the directory itself)


class Inotify:
    """One inotify instance; close it when done (`close`, or use it as a context manager)."""

    def __init__(self) -> None:
        self.fd = _check(_libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch `path` for the events in `mask`; the watch descriptor (`OSError` if it cannot
        be watched, e.g. ENOENT, ENOTDIR with IN_ONLYDIR)."""
        encoded = os.fsencode(path)
        return _check(
            _libc().inotify_add_watch(self.fd, encoded, mask), f"inotify_add_watch {path}"
        )

    def rm_watch(self, wd: int) -> None:
        """Stop a watch; one the kernel already dropped (IN_IGNORED) is no error."""
        with contextlib.suppress(OSError):
            _check(_libc().inotify_rm_watch(self.fd, wd), "inotify_rm_watch")

    def read(self) -> list[InotifyEvent]:
        """Every event queued now ([] when there is none; never blocks)."""
        events: list[InotifyEvent] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(data):
                wd, mask, cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + length].split(b"\0", 1)[0]
                offset += length
                events.append(InotifyEvent(wd, mask, cookie, os.fsdecode(name)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
