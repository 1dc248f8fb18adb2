"""The control socket: SOCK_SEQPACKET datagrams with SCM_RIGHTS descriptors.

Thin adapter between `protocol` (bytes <-> messages) and a unix socket.  `send_message` /
`recv_message` are blocking; `AsyncChannel` wraps a non-blocking socket for the agent's asyncio
loop.  A received message that carries the wrong number of descriptors is a `ProtocolError` (and
the stray descriptors are closed, never leaked).
"""

from __future__ import annotations

import asyncio
import os
import socket

from agent.control.protocol import (
    MAX_DATAGRAM,
    Message,
    ProtocolError,
    decode,
    encode,
    fds_expected,
)

CONTROL_SOCKET = "control.sock"


class ChannelClosed(ConnectionError):
    """The peer closed the control socket."""


def send_message(
    sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()
) -> None:
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def _parse(data: bytes, fds: list[int]) -> tuple[Message, list[int]]:
    if not data:
        for fd in fds:
            os.close(fd)
        raise ChannelClosed("peer closed the control socket")
    try:
        message = decode(data)
        if len(fds) != fds_expected(message):
            raise ProtocolError(
                f"{type(message).__name__} carried {len(fds)} descriptors, expected "
                f"{fds_expected(message)}"
            )
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def recv_message(sock: socket.socket) -> tuple[Message, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_DATAGRAM, 4)
    return _parse(data, fds)


class AsyncChannel:
    """A control connection driven by an asyncio loop (non-blocking socket)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def _wait(self, writable: bool) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        if writable:
            self._loop.add_writer(fd, ready)
        else:
            self._loop.add_reader(fd, ready)
        try:
            await future
        finally:
            if writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    async def send(self, message: Message, fds: tuple[int, ...] = ()) -> None:
        while True:
            try:
                send_message(self.sock, message, fds)
                return
            except BlockingIOError:
                await self._wait(writable=True)

    async def recv(self) -> tuple[Message, list[int]]:
        while True:
            try:
                return recv_message(self.sock)
            except BlockingIOError:
                await self._wait(writable=False)
            except ConnectionResetError as exc:
                raise ChannelClosed(str(exc)) from exc

    def close(self) -> None:
        self.sock.close()
