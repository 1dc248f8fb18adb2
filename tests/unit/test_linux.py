"""The small Linux helpers of `agent.linux`: namespace fds, RST on close, parent-death signal.

Entering a namespace (`setns`) is exercised by every kernel test through `agent.netns.entered`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.linux import is_netns_fd, open_thread_netns, reset, setns


def test_is_netns_fd_tells_a_network_namespace_from_anything_else(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.touch()
    cases = {"/proc/self/ns/net": True, "/proc/self/ns/mnt": False, str(plain): False}
    for path, expected in cases.items():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert is_netns_fd(fd) is expected, path
        finally:
            os.close(fd)


def test_setns_into_the_current_namespace_is_a_no_op() -> None:
    fd = open_thread_netns()
    try:
        before = os.stat("/proc/thread-self/ns/net").st_ino
        setns(fd)
        assert os.stat("/proc/thread-self/ns/net").st_ino == before
        assert is_netns_fd(fd)
    finally:
        os.close(fd)


def test_setns_failure_is_an_oserror_naming_the_call(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.touch()
    fd = os.open(plain, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError, match="setns"):
            setns(fd)
    finally:
        os.close(fd)


def test_reset_closes_with_an_rst() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        reset(accepted)
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        client.close()


def test_set_pdeathsig_kills_the_child_with_its_parent() -> None:
    child = (
        "import signal, sys, time\n"
        "from agent.linux import set_pdeathsig\n"
        "set_pdeathsig(signal.SIGKILL)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    middle = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        assert middle.stdout is not None
        pid = int(middle.stdout.readline())
        assert middle.stdout.readline().strip() == "ready"
    finally:
        middle.kill()
        middle.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split(") ")[1].startswith("Z"):
                return  # dead, waiting to be reaped by init
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("the child outlived its parent")
