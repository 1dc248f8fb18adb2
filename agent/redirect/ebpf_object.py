"""Ferry's eBPF object: compiled once with bcc, cached as plain data, loaded without LLVM.

bcc compiles `bpf/ferry.c` with LLVM, which takes seconds and maps about 180 MB into the
process that does it.  So the compile runs in a child process (`python -m
agent.redirect.ebpf_object OUT`), never in the agent, and its result is cached as JSON:

- for every map, its `MapSpec` (type, key and value sizes, entries, flags), read back from the
  kernel after bcc created it;
- for every program, its type, expected attach type and final instructions (`BPF.dump_func`),
  with the places where bcc put a map's fd (`ld_imm64` with `BPF_PSEUDO_MAP_FD`) recorded by map
  name, and the places holding `NETNS_PLACEHOLDER` (the pod's netns cookie in each pod's copy of
  the sk_lookup program).

`BpfObject.instructions(program, map_fds, netns=...)` patches real fds (and a cookie) into a
copy, ready for `bpf_syscall.prog_load`.  The cache file is named by `object_key`: a hash of the
C source, the bcc version and the header tree, so an edited source or other headers compile
again, and an agent restart, a second agent (another state dir) or a test session reuse it.  The
compile is once per machine boot at most (the default cache lives in the state dir, on tmpfs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.redirect import bpf_syscall as sys_bpf
from agent.redirect.kernel_headers import KernelHeaders, debian_arch, find_headers

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "ferry.c"
NETNS_PLACEHOLDER = 0xFE77C00C1E5E7B0B  # NETNS_COOKIE in bpf/ferry.c
MAPS = (
    "config",
    "enrolled",
    "excluded_ports",
    "excluded_cidr4",
    "excluded_cidr6",
    "origdst_cookie",
    "origdst_tuple",
    "deliveries",
    "listeners",
    "legs",
    "apps",
    "app_state",
    "joins",
    "switches",
    "leg_acked",
)
PROGRAMS = {
    "connect4": (sys_bpf.PROG_CGROUP_SOCK_ADDR, sys_bpf.ATTACH_CGROUP_INET4_CONNECT),
    "connect6": (sys_bpf.PROG_CGROUP_SOCK_ADDR, sys_bpf.ATTACH_CGROUP_INET6_CONNECT),
    "sockops": (sys_bpf.PROG_SOCK_OPS, sys_bpf.ATTACH_CGROUP_SOCK_OPS),
    "getsockopt": (sys_bpf.PROG_CGROUP_SOCKOPT, sys_bpf.ATTACH_CGROUP_GETSOCKOPT),
    "sk_lookup": (sys_bpf.PROG_SK_LOOKUP, sys_bpf.ATTACH_SK_LOOKUP),
    "fastpath": (sys_bpf.PROG_SK_MSG, sys_bpf.ATTACH_SK_MSG_VERDICT),
}
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_INSN = struct.Struct("<BBhi")  # code, dst:4|src:4, offset, imm


class ObjectError(RuntimeError):
    """The eBPF object could not be compiled or read; the message says why."""


@dataclass(frozen=True)
class Program:
    name: str
    prog_type: int
    attach_type: int
    insns: bytes
    map_refs: tuple[tuple[int, str], ...]  # (instruction index, map name)
    netns_slots: tuple[int, ...]  # instruction indexes of NETNS_PLACEHOLDER


@dataclass(frozen=True)
class BpfObject:
    key: str
    headers: str
    maps: tuple[sys_bpf.MapSpec, ...]
    programs: tuple[Program, ...]

    def program(self, name: str) -> Program:
        for program in self.programs:
            if program.name == name:
                return program
        raise ObjectError(f"the eBPF object has no program {name!r}")

    def instructions(self, program: Program, map_fds: dict[str, int], netns: int = 0) -> bytes:
        """`program`'s instructions with real map fds (and `netns` in its cookie slots)."""
        code = bytearray(program.insns)
        for index, name in program.map_refs:
            _set_imm64(code, index, map_fds[name], _PSEUDO_MAP_FD)
        for index in program.netns_slots:
            _set_imm64(code, index, netns, 0)
        return bytes(code)

    def to_json(self) -> str:
        return json.dumps(
            {
                "key": self.key,
                "headers": self.headers,
                "maps": [vars(m) for m in self.maps],
                "programs": [
                    {
                        "name": p.name,
                        "prog_type": p.prog_type,
                        "attach_type": p.attach_type,
                        "insns": p.insns.hex(),
                        "map_refs": [list(r) for r in p.map_refs],
                        "netns_slots": list(p.netns_slots),
                    }
                    for p in self.programs
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> BpfObject:
        doc = json.loads(text)
        return cls(
            key=doc["key"],
            headers=doc["headers"],
            maps=tuple(sys_bpf.MapSpec(**m) for m in doc["maps"]),
            programs=tuple(
                Program(
                    name=p["name"],
                    prog_type=p["prog_type"],
                    attach_type=p["attach_type"],
                    insns=bytes.fromhex(p["insns"]),
                    map_refs=tuple((int(i), str(n)) for i, n in p["map_refs"]),
                    netns_slots=tuple(int(i) for i in p["netns_slots"]),
                )
                for p in doc["programs"]
            ),
        )


def _set_imm64(code: bytearray, index: int, value: int, src: int) -> None:
    op, regs, off, _ = _INSN.unpack_from(code, index * 8)
    _INSN.pack_into(code, index * 8, op, (regs & 0x0F) | (src << 4), off, value & 0xFFFFFFFF)
    op2, regs2, off2, _ = _INSN.unpack_from(code, index * 8 + 8)
    _INSN.pack_into(code, index * 8 + 8, op2, regs2, off2, (value >> 32) & 0xFFFFFFFF)


def bcc_version() -> str | None:
    """bcc's version text, read without importing it (that would map libbcc and LLVM); None
    when bcc is not importable here."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return None
    try:
        return (Path(spec.origin).parent / "version.py").read_text().strip()
    except OSError:
        return "unknown"


def object_key(headers: KernelHeaders, source: Path = SOURCE) -> str:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    for part in (bcc_version() or "", headers.version, str(headers.build), str(headers.source)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def load_or_compile(cache_dir: Path, headers: KernelHeaders | None = None) -> BpfObject:
    """The object for the running kernel: from `cache_dir` if compiled before, else compiled
    now in a child process (seconds) and cached.  Raises `HeadersError` or `ObjectError`."""
    headers = headers or find_headers()
    key = object_key(headers)
    path = cache_dir / f"ferry-bpf-{key}.json"
    try:
        return BpfObject.from_json(path.read_text())
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        raise ObjectError(f"cached eBPF object {path} is unreadable ({exc}); delete it") from exc
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    env = dict(os.environ, **headers.compile_env())
    args = [sys.executable, "-m", "agent.redirect.ebpf_object", partial, key, headers.build]
    args += [headers.source, headers.version, "1" if headers.fallback else ""]
    done = subprocess.run(
        [str(a) for a in args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ObjectError(
            f"compiling {SOURCE} with bcc against {headers.describe()} failed: {tail}"
        )
    partial.replace(path)
    return BpfObject.from_json(path.read_text())


def compile_object(headers: KernelHeaders, key: str) -> BpfObject:
    """Compile with bcc in this process (the child's job) and read the result back as data."""
    from bcc import BPF, lib

    text = SOURCE.read_text()
    module = BPF(text=text, cflags=headers.cflags(debian_arch()))
    try:
        map_fds: dict[int, sys_bpf.MapSpec] = {}
        for name in MAPS:
            fd = int(lib.bpf_table_fd(module.module, name.encode()))
            if fd < 0:
                raise ObjectError(f"bcc made no map {name!r} from {SOURCE}")
            map_fds[fd] = sys_bpf.map_info(fd)
        programs = []
        for name, (prog_type, attach_type) in PROGRAMS.items():
            insns = bytes(module.dump_func(name.encode()))
            refs, slots = _relocations(insns, map_fds, name)
            programs.append(Program(name, prog_type, attach_type, insns, refs, slots))
        return BpfObject(
            key=key,
            headers=headers.describe(),
            maps=tuple(map_fds.values()),
            programs=tuple(programs),
        )
    finally:
        module.cleanup()


def _relocations(
    insns: bytes, map_fds: dict[int, sys_bpf.MapSpec], program: str
) -> tuple[tuple[tuple[int, str], ...], tuple[int, ...]]:
    refs: list[tuple[int, str]] = []
    slots: list[int] = []
    index = 0
    while index * 8 < len(insns):
        op, regs, _off, imm = _INSN.unpack_from(insns, index * 8)
        if op != _LD_IMM64:
            index += 1
            continue
        high = _INSN.unpack_from(insns, index * 8 + 8)[3]
        value = (imm & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)
        if regs >> 4 == _PSEUDO_MAP_FD:
            if imm not in map_fds:
                raise ObjectError(f"program {program} refers to an unknown map fd {imm}")
            refs.append((index, map_fds[imm].name))
        elif value == NETNS_PLACEHOLDER:
            slots.append(index)
        index += 2
    return tuple(refs), tuple(slots)


def main(argv: list[str]) -> int:
    """`python -m agent.redirect.ebpf_object OUT KEY BUILD SOURCE VERSION FALLBACK`."""
    out, key, build, source, version, fallback = argv
    release = os.uname().release
    headers = KernelHeaders(release, version, Path(build), Path(source), fallback=bool(fallback))
    obj = compile_object(headers, key)
    Path(out).write_text(obj.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
