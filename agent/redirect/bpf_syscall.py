"""The bpf(2) system call, raw: maps, programs, pins and links without bcc or libbpf.

Only what Ferry's eBPF backend and proxy need, each a thin function over one command of
`union bpf_attr` (linux/bpf.h), built with `struct` and passed through libc's `syscall(2)`:
map create/lookup/update/delete/iterate, program load, pin and get (bpffs), link create, update
and detach, program query on an attach point (a cgroup or a netns), object info by fd, and fds by
id.  bcc compiles the programs (once, in another process: `agent.redirect.ebpf_object`); the
agent and the proxy only ever speak to the kernel through this module, so neither of them maps
LLVM (about 180 MB) into its memory.

Every failure raises `OSError` with the errno and a message naming the command and the object
(a pin path, a map, a program), so callers report what failed on what.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

# Commands (enum bpf_cmd).
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_ATTACH = 8
PROG_QUERY = 16
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_DETACH = 34

# Program types (enum bpf_prog_type) and attach types (enum bpf_attach_type) Ferry uses.
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
PROG_SK_LOOKUP = 30
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_MSG_VERDICT = 7
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_SK_LOOKUP = 36

# Map types (enum bpf_map_type) and update flags.
MAP_HASH = 1
MAP_ARRAY = 2
MAP_LRU_HASH = 9
MAP_LPM_TRIE = 11
MAP_SOCKHASH = 18
BPF_ANY = 0

LINK_TYPE_CGROUP = 3
LINK_TYPE_NETNS = 5

BPF_FS_MAGIC = 0xCAFE4A11
_ATTR_SIZE = 144  # large enough for every command used here; the rest stays zero
_LOG_SIZE = 1 << 20


@cache
def _syscall() -> tuple[ctypes.CDLL, int]:
    machine = platform.machine()
    if machine not in _SYS_BPF:
        raise OSError(errno.ENOSYS, f"bpf(2): unsupported architecture {machine!r}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc, _SYS_BPF[machine]


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    libc, number = _syscall()
    result = int(libc.syscall(number, cmd, attr, ctypes.c_uint(len(attr))))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _attr(layout: str, *values: int | bytes) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(layout, attr, 0, *values)
    return attr


def _address(buffer: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buffer is None else ctypes.addressof(buffer)


def _name(name: str) -> bytes:
    return name.encode()[:15]


# ------------------------------------------------------------------------------------- maps
@dataclass(frozen=True)
class MapSpec:
    """What a map is: its kernel name, type and sizes (as `bpf_map_info` reports them)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


def map_create(spec: MapSpec) -> int:
    attr = _attr(
        "=IIIIIII16s",
        spec.type,
        spec.key_size,
        spec.value_size,
        spec.max_entries,
        spec.flags,
        0,
        0,
        _name(spec.name),
    )
    return _bpf(MAP_CREATE, attr, f"creating map {spec.name}")


def map_info(fd: int) -> MapSpec:
    info = _info(fd, 88)
    kind, _id, key_size, value_size, max_entries, flags = struct.unpack_from("=6I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()
    return MapSpec(name, kind, key_size, value_size, max_entries, flags)


def map_update(fd: int, key: bytes, value: bytes, what: str) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _attr("=IIQQQ", fd, 0, _address(k), _address(v), BPF_ANY)
    _bpf(MAP_UPDATE_ELEM, attr, what)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key`, or None when there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _attr("=IIQQQ", fd, 0, _address(k), _address(v), 0)
    try:
        _bpf(MAP_LOOKUP_ELEM, attr, "map lookup")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    attr = _attr("=IIQ", fd, 0, _address(k))
    try:
        _bpf(MAP_DELETE_ELEM, attr, "map delete")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    current: ctypes.Array[ctypes.c_char] | None = None
    while True:
        following = ctypes.create_string_buffer(key_size)
        attr = _attr("=IIQQ", fd, 0, _address(current), _address(following))
        try:
            _bpf(MAP_GET_NEXT_KEY, attr, "map iteration")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return keys
            raise
        keys.append(following.raw)
        current = following


# --------------------------------------------------------------------------------- programs
def prog_load(
    name: str, prog_type: int, attach_type: int, insns: bytes, license: str = "GPL"
) -> int:
    """Load `insns` (already holding real map fds); the verifier's log is in the error."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(_LOG_SIZE)
    attr = _attr(
        "=IIQQIIQII16sII",
        prog_type,
        len(insns) // 8,
        _address(code),
        _address(lic),
        1,
        _LOG_SIZE,
        _address(log),
        0,
        0,
        _name(name),
        0,
        attach_type,
    )
    try:
        return _bpf(PROG_LOAD, attr, f"loading program {name}")
    except OSError as exc:
        verifier = log.value.decode(errors="replace").strip().splitlines()[-12:]
        raise OSError(exc.errno, f"{exc.strerror}; verifier: {' | '.join(verifier)}") from None


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = _info(fd, 228)
    kind, prog_id = struct.unpack_from("=II", info, 0)
    name = info.raw[64:80].split(b"\0", 1)[0].decode()
    return ProgInfo(prog_id, kind, name)


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    """Attach without a link (a sockmap's programs: they live as long as the map)."""
    _bpf(PROG_ATTACH, _attr("=IIII", target_fd, prog_fd, attach_type, 0), f"attaching {what}")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """The ids of the programs attached to a cgroup or netns fd for `attach_type`."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr("=IIIIQI", target_fd, attach_type, 0, 0, ctypes.addressof(ids), len(ids))
    _bpf(PROG_QUERY, attr, f"querying attach type {attach_type}")
    (count,) = struct.unpack_from("=I", attr, 24)
    return list(ids[: min(count, len(ids))])


# ------------------------------------------------------------------------------- pins, info
def obj_pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(OBJ_PIN, _attr("=QI", _address(p), fd), f"pinning {path}")


def obj_get(path: Path) -> int:
    """An fd on the object pinned at `path` (FileNotFoundError when nothing is)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(OBJ_GET, _attr("=QI", _address(p), 0), f"opening pinned {path}")


def _info(fd: int, size: int) -> ctypes.Array[ctypes.c_char]:
    info = ctypes.create_string_buffer(size)
    attr = _attr("=IIQ", fd, size, _address(info))
    _bpf(OBJ_GET_INFO_BY_FD, attr, f"reading info of fd {fd}")
    return info


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(PROG_GET_FD_BY_ID, _attr("=I", prog_id), f"opening program id {prog_id}")


# ------------------------------------------------------------------------------------ links
@dataclass(frozen=True)
class LinkInfo:
    """A link and where it is attached: `target` is the cgroup id (cgroup links) or the netns
    inode (netns links); 0 once the link was detached (`bpftool link detach`)."""

    id: int
    type: int
    prog_id: int
    target: int
    attach_type: int


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    attr = _attr("=IIII", prog_fd, target_fd, attach_type, 0)
    return _bpf(LINK_CREATE, attr, f"attaching {what}")


def link_update(link_fd: int, prog_fd: int, what: str) -> None:
    _bpf(LINK_UPDATE, _attr("=IIII", link_fd, prog_fd, 0, 0), f"updating {what}")


def link_detach(link_fd: int, what: str) -> None:
    _bpf(LINK_DETACH, _attr("=I", link_fd), f"detaching {what}")


def link_info(fd: int) -> LinkInfo:
    info = _info(fd, 64)
    kind, link_id, prog_id = struct.unpack_from("=III", info, 0)
    if kind == LINK_TYPE_CGROUP:
        target, attach_type = struct.unpack_from("=QI", info, 16)
    elif kind == LINK_TYPE_NETNS:
        target, attach_type = struct.unpack_from("=II", info, 16)
    else:
        target, attach_type = 0, 0
    return LinkInfo(link_id, kind, prog_id, target, attach_type)


# ------------------------------------------------------------------------------------ bpffs
def is_bpffs(path: Path) -> bool:
    libc, _ = _syscall()
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type is the first word
    libc.statfs.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    (magic,) = struct.unpack_from("=q", buf, 0)
    return bool(magic == BPF_FS_MAGIC)


def mount_bpffs(path: Path) -> None:
    """Mount a fresh bpffs instance on `path` (a directory); its pins live as long as it."""
    libc, _ = _syscall()
    libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting bpffs on {path}: {os.strerror(err)}")


def unmount(path: Path) -> None:
    libc, _ = _syscall()
    libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
    if libc.umount2(os.fsencode(path), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmounting {path}: {os.strerror(err)}")
