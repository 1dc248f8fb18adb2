"""Which kernel headers bcc compiles Ferry's eBPF programs against, and what to say about them.

bcc's clang frontend wants a kernel header tree: it looks in `/lib/modules/<release>/build` (and
`source`, where a distribution splits them, as Debian does).  Nodes often run a kernel whose
headers are not installed (a cloud or custom kernel; this project's VMs run 6.18 with none), so:

1. headers at `/lib/modules/<release>/build` are used as bcc finds them; if their own release
   (`include/generated/utsrelease.h`) is not the running kernel's (a link to a distribution's
   headers, as `make setup` makes), that is said as a warning;
2. when that directory is missing, the newest installed distribution headers
   (`/usr/src/linux-headers-<version>-<arch>`, with the `-common` tree its Makefile includes) are
   used, with a warning: Ferry's programs use only the socket-level UAPI (`bpf_sock_addr`,
   `bpf_sock_ops`, `bpf_sockopt`, `bpf_sk_lookup`), which is stable across kernel versions, and
   the kernel's verifier checks every field access at load time anyway;
3. with no headers at all, `HeadersError` names the Debian package to install.

`find_headers` is pure over the paths it is given (tests point it at temporary trees);
`KernelHeaders.compile_env` and `cflags` are what the bcc build needs for case 2 (bcc's
`BCC_KERNEL_SOURCE` plus include paths for the generated headers).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

MODULES = Path("/lib/modules")
SOURCES = Path("/usr/src")
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "ppc64le": "ppc64el",
                "s390x": "s390x"}  # fmt: skip
_KERNEL_ARCH = {"amd64": "x86", "arm64": "arm64", "armhf": "arm", "ppc64el": "powerpc",
                "s390x": "s390"}  # fmt: skip
_UTS_RELEASE = re.compile(r'#define\s+UTS_RELEASE\s+"([^"]+)"')
_INCLUDE = re.compile(r"^include\s+(\S+)/Makefile\s*$", re.MULTILINE)


class HeadersError(RuntimeError):
    """No kernel headers bcc could compile against; the message says what to install."""


@dataclass(frozen=True)
class KernelHeaders:
    """A header tree: `build` holds the generated headers, `source` the rest (the same directory
    for an unsplit tree).  `warning` is empty when they are the running kernel's own; `fallback`
    is true when bcc must be pointed at them (they are not under /lib/modules)."""

    release: str
    version: str
    build: Path
    source: Path
    warning: str = ""
    fallback: bool = False

    def compile_env(self) -> dict[str, str]:
        """Environment for the bcc build: empty when bcc finds the headers by itself."""
        return {"BCC_KERNEL_SOURCE": str(self.source)} if self.fallback else {}

    def cflags(self, arch: str) -> list[str]:
        """Include paths for the generated headers of a split tree used as a fallback."""
        if not self.fallback:
            return []
        karch = _KERNEL_ARCH.get(arch, arch)
        return [
            f"-I{self.build}/arch/{karch}/include/generated",
            f"-I{self.build}/arch/{karch}/include/generated/uapi",
            f"-I{self.build}/include",
            f"-I{self.build}/include/generated/uapi",
        ]

    def describe(self) -> str:
        where = f"{self.build}" if self.build == self.source else f"{self.build} + {self.source}"
        return f"{self.version} ({where})"


def debian_arch(machine: str | None = None) -> str:
    machine = machine or platform.machine()
    return _DEBIAN_ARCH.get(machine, machine)


def headers_version(build: Path) -> str:
    """The release a header tree was made for, from include/generated/utsrelease.h."""
    try:
        text = (build / "include" / "generated" / "utsrelease.h").read_text()
    except OSError:
        return build.name.removeprefix("linux-headers-")
    found = _UTS_RELEASE.search(text)
    return found.group(1) if found else build.name.removeprefix("linux-headers-")


def _source_of(build: Path) -> Path:
    """The `-common` tree a Debian `-<arch>` tree's Makefile includes, or the tree itself."""
    try:
        found = _INCLUDE.search((build / "Makefile").read_text())
    except OSError:
        return build
    if found and Path(found.group(1)).is_dir():
        return Path(found.group(1))
    return build


def _has_headers(source: Path) -> bool:
    return (source / "include" / "linux" / "kconfig.h").is_file()


def _version_key(path: Path) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", path.name)]


def find_headers(
    release: str | None = None,
    modules: Path = MODULES,
    sources: Path = SOURCES,
    arch: str | None = None,
) -> KernelHeaders:
    """The headers to compile against for kernel `release` (default: the running one)."""
    release = release or os.uname().release
    arch = arch or debian_arch()
    build = modules / release / "build"
    if build.is_dir():
        source = modules / release / "source"
        source = source if source.is_dir() else _source_of(build)
        if _has_headers(source) or _has_headers(build):
            version = headers_version(build)
            warning = ""
            if version != release:
                warning = (
                    f"kernel headers at {build} are {version}'s, not the running kernel "
                    f"{release}'s; socket-level eBPF compiles against them (stable UAPI)"
                )
            return KernelHeaders(release, version, build.resolve(), source.resolve(), warning)
    candidates = sorted(
        (p for p in sources.glob(f"linux-headers-*-{arch}") if p.is_dir()), key=_version_key
    )
    for candidate in reversed(candidates):
        source = _source_of(candidate)
        if _has_headers(source):
            version = headers_version(candidate)
            warning = (
                f"no kernel headers for the running kernel {release} ({build} is missing); "
                f"using the newest installed distribution headers, {candidate.name} "
                "(socket-level eBPF UAPI is stable)"
            )
            return KernelHeaders(release, version, candidate, source, warning, fallback=True)
    raise HeadersError(
        f"no kernel headers to compile eBPF against: {build} is missing and there is no "
        f"{sources}/linux-headers-*-{arch}; install the Debian package linux-headers-{arch} "
        f"(apt-get install linux-headers-{arch}), or use the iptables or nftables backend"
    )
