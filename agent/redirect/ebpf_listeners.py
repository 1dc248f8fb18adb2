"""The proxy's half of the eBPF backend: putting its inbound listeners where sk_lookup finds them.

The eBPF backend's `sk_lookup` program (bpf/ferry.c) steers a pod's inbound connections to a
socket it finds in the pinned `listeners` SOCKHASH under (the pod's netns cookie, family).  The
proxy owns those sockets, so the proxy puts them there: `register(state_dir, listeners)` after it
opens a pod's listeners, and again on every snapshot from the agent (the agent may have made the
map anew).  When the map is not pinned (another backend) it does nothing.  A closed socket
leaves the map by itself (the kernel unhashes it), so a stopped proxy means refused
connections, not a bypass.  Raw bpf(2) only (`bpf_syscall`): the proxy never loads bcc.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from agent.redirect import bpf_syscall as sys_bpf

LISTENERS_PIN = Path("bpf") / "maps" / "listeners"
SO_NETNS_COOKIE = 71
_KEY = struct.Struct("=QII")  # struct listener_key: netns cookie, family, pad
_VALUE = struct.Struct("=Q")


def register(state_dir: Path, listeners: Iterable[socket.socket]) -> int:
    """Put `listeners` (a pod's inbound listening sockets) into the pinned map, if there is one;
    how many were registered.  OSError names the map and the socket on failure."""
    path = state_dir / LISTENERS_PIN
    try:
        fd = sys_bpf.obj_get(path)
    except FileNotFoundError:
        return 0
    count = 0
    try:
        for sock in listeners:
            cookie = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            key = _KEY.pack(struct.unpack("=Q", cookie)[0], int(sock.family), 0)
            what = f"registering listener {sock.getsockname()} in {path}"
            sys_bpf.map_update(fd, key, _VALUE.pack(sock.fileno()), what)
            count += 1
    finally:
        os.close(fd)
    return count
