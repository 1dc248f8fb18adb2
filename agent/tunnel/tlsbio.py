"""TLS over memory BIOs: one `SSLObject` between a non-blocking socket and plaintext buffers.

Through an `SSLSocket`, OpenSSL issues one write() per 16 KiB record and two read()s per record,
and those syscalls were most of the proxy's CPU in bulk transfers.  `TlsBio` runs TLS over memory
BIOs instead (`SSLContext.wrap_bio`) and does the socket I/O itself, in large pieces:

- in: `receive` takes up to a whole buffer of ciphertext from the socket in one recv into the
  incoming BIO; `decrypt` then reads every complete record (one C `read` call each, no syscall)
  into one plaintext buffer, which the caller parses in one go.  `pending` (decrypted bytes
  OpenSSL still holds) and the incoming BIO tell when every complete record was read, so no call
  ends in SSLWantReadError (an exception with a formatted message: more than a small record costs
  to decrypt).  What stays in the incoming BIO is an incomplete record, which needs more bytes
  from the socket anyway, so nothing is hidden from level-triggered epoll.
- out: `write` encrypts plaintext into the outgoing BIO (many frames, many records at once);
  `send` takes all of that ciphertext and sends as much as the socket takes in one send; the
  rest waits in `tx` (a deque of views, never copied again) until the next `send` (EPOLLOUT).

`write` is the C object's own method (`_ssl._SSLSocket.write`, no Python frame in between), as are
the read and pending calls of `decrypt`.  `delivered()` tells the HBONE core's flood accounting
when the peer has read what was sent (see `HboneConnection.drained`).
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any


class TlsBio:
    """TLS for one socket, client or server side, over memory BIOs."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()  # ciphertext from the peer, not yet decrypted
        self.outgoing = ssl.MemoryBIO()  # ciphertext OpenSSL produced, not yet taken
        self.tls = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=None
        )
        self.tx: collections.deque[memoryview] = collections.deque()  # ciphertext to send
        self.tx_bytes = 0
        self.produced = 0  # ciphertext taken from OpenSSL so far (sent or in `tx`)
        self._mark = 0  # `produced` at the last `delivered()`
        sslobj: Any = getattr(self.tls, "_sslobj", self.tls)  # _ssl._SSLSocket
        self.write: Callable[[bytes | bytearray | memoryview], int] = sslobj.write
        self._read: Callable[[int, memoryview], int] = sslobj.read
        self._pending: Callable[[], int] = sslobj.pending

    def handshake(self, rx: memoryview) -> bool:
        """Advance the handshake with what the socket holds (read through `rx`); True once it
        is complete.  Raises OSError (ssl.SSLError: after sending the alert, if any)."""
        try:
            n = self.sock.recv_into(rx)
        except BlockingIOError:
            n = -1
        if n > 0:
            self.incoming.write(rx[:n])
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            if not n:
                raise ConnectionResetError("peer closed the connection") from None
            self.send()
            return False
        except ssl.SSLError:
            with contextlib.suppress(OSError):
                self.send()  # the alert
            raise
        return True

    def receive(self, rx: memoryview) -> int:
        """One recv of ciphertext (into `rx`, then the incoming BIO): the byte count, 0 at EOF,
        -1 if there was nothing.  Raises OSError."""
        try:
            n = self.sock.recv_into(rx)
        except BlockingIOError:
            return -1
        if n:
            self.incoming.write(rx[:n])
        else:
            self.incoming.write_eof()
        return n

    def decrypt(self, view: memoryview) -> tuple[int, bool]:
        """Decrypt the complete records of the incoming BIO into `view` until it is full:
        (bytes written, whether TLS was closed).  Raises ssl.SSLError."""
        incoming = self.incoming
        read = self._read
        pending = self._pending
        cap = len(view)
        pos = 0
        while pos < cap:
            if pos and not incoming.pending and not pending():
                break  # all read, and the last record was complete
            try:
                m = read(cap - pos, view[pos:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLEOFError:
                return pos, True
            if not m:
                return pos, True
            pos += m
        return pos, False

    @property
    def backlog(self) -> int:
        """Ciphertext not yet taken by the socket."""
        return self.tx_bytes + self.outgoing.pending

    def send(self) -> None:
        """Take what OpenSSL produced and send as much ciphertext as the socket takes (one send
        for many records); the rest waits in `tx`.  Raises OSError."""
        tx = self.tx
        send = self.sock.send
        outgoing = self.outgoing
        if outgoing.pending:
            chunk = outgoing.read()
            self.produced += len(chunk)
            if not tx:  # the usual case: nothing waits before it, so no queueing
                try:
                    n = send(chunk)
                except BlockingIOError:
                    n = 0
                if n < len(chunk):
                    tx.append(memoryview(chunk)[n:])
                    self.tx_bytes += len(chunk) - n
                return
            tx.append(memoryview(chunk))
            self.tx_bytes += len(chunk)
        while tx:
            head = tx[0]
            try:
                n = send(head)
            except BlockingIOError:
                break
            self.tx_bytes -= n
            if n < len(head):
                tx[0] = head[n:]
                break
            tx.popleft()

    def delivered(self) -> bool:
        """True when the socket took all the ciphertext produced before the previous True (and
        then the next call waits for what was produced until now): a peer that reads keeps
        making this True, one that does not never does."""
        if self.produced - self.tx_bytes < self._mark:
            return False
        self._mark = self.produced
        return True
