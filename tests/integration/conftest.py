"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest


@pytest.fixture
def redis() -> Iterator[str]:
    """A redis-server (Debian package redis-server) on a Unix socket in a temporary directory,
    for as long as the test runs; a machine without it fails the test naming the package."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (Debian package redis-server)", pytrace=False)
    directory = tempfile.mkdtemp(prefix="ferry-redis-")  # short: a Unix socket path is <108 bytes
    path = os.path.join(directory, "redis.sock")
    process = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no",
         "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not open its socket in 10 s"
            time.sleep(0.02)
        yield path
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
