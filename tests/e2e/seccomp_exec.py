"""Exec a command under the seccomp filters systemd installs for a unit's options (libseccomp).

    /usr/bin/python3 seccomp_exec.py FAMILIES NAMESPACES -- argv...

FAMILIES: `RestrictAddressFamilies=`' list (AF_UNIX AF_INET ...): socket(2) of any other family
fails with EAFNOSUPPORT.  NAMESPACES: `RestrictNamespaces=`' list (net ...): unshare(2) and
clone(2) with any other namespace flag fail with EPERM, setns(2) of another type or of type 0
too, clone3(2) with ENOSYS (so libc falls back to clone, as systemd does).  Also
`LockPersonality=yes` (personality(2) to another execution domain fails with EPERM),
`RestrictRealtime=yes` (sched_setscheduler(2) to SCHED_FIFO or SCHED_RR fails with EPERM) and
`SystemCallArchitectures=native` (the filter knows the native architecture only; a system call
of another one kills the process).  Run by Debian's python3 (python3-seccomp), then exec.
"""

from __future__ import annotations

import errno
import os
import socket
import sys

import seccomp  # type: ignore[import-not-found]

NAMESPACE_FLAGS = {
    "cgroup": 0x02000000, "ipc": 0x08000000, "mnt": 0x00020000, "net": 0x40000000,
    "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000,
}  # fmt: skip
AF_MAX = 46
SCHED_FIFO, SCHED_RR = 1, 2


def main(families: list[str], namespaces: list[str], argv: list[str]) -> None:
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    allowed = {int(getattr(socket, name)) for name in families}
    for family in range(AF_MAX):
        if family not in allowed:
            f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket",
                       seccomp.Arg(0, seccomp.EQ, family))  # fmt: skip
    f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.GE, AF_MAX))
    for name, flag in NAMESPACE_FLAGS.items():
        if name in namespaces:
            continue
        for call in ("unshare", "clone"):
            f.add_rule(seccomp.ERRNO(errno.EPERM), call,
                       seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))  # fmt: skip
        f.add_rule(seccomp.ERRNO(errno.EPERM), "setns", seccomp.Arg(1, seccomp.EQ, flag))
    f.add_rule(seccomp.ERRNO(errno.EPERM), "setns", seccomp.Arg(1, seccomp.EQ, 0))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for persona in range(1, 0x10):  # LockPersonality: no other execution domain (0x01..0x0f)
        f.add_rule(seccomp.ERRNO(errno.EPERM), "personality", seccomp.Arg(0, seccomp.EQ, persona))
    for policy in (SCHED_FIFO, SCHED_RR):
        f.add_rule(seccomp.ERRNO(errno.EPERM), "sched_setscheduler",
                   seccomp.Arg(1, seccomp.EQ, policy))  # fmt: skip
    f.load()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    split = sys.argv.index("--")
    main(sys.argv[1].split(), sys.argv[2].split(), sys.argv[split + 1 :])
