"""The proxy's worker processes, as the supervisor drives them.

`WorkerPool` starts N `agent.proxy.worker` processes (with OPENSSL_CONF set to Ferry's
`agent/tunnel/openssl.cnf` for the TLS 1.3 suite preference, and the node's shared rate-limit
buckets as an inherited fd), reads what each sends back on its own thread (a `Done` per message,
`Stats` on request and every second), restarts one that dies (from the main thread: the
parent-death signal follows the thread that spawned it) and gives it the whole state again.

Messages carry a sequence number; `send` hands one message to every live worker without waiting,
`wait` collects the outcomes of everything sent so far (each worker's error, or a worker that did
not answer in WORKER_TIMEOUT), and `to_workers` does both.  A worker that dies meanwhile is
skipped: it gets everything when it is restarted.  All state is guarded by the supervisor's lock;
`changed` is the condition the reader threads signal.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from agent.config import Config
from agent.proxy.messages import (
    WORKER_SECTIONS,
    Done,
    MessageError,
    Stats,
    StatsRequest,
    ToWorker,
    decode,
    encode,
)
from agent.tunnel.tls import worker_environment

log = logging.getLogger("ferry.proxy")
WORKER_TIMEOUT = 10.0  # seconds a worker may take to apply one message

MakeMessage = Callable[[int], ToWorker]  # a message, given its sequence number


@dataclass(eq=False)
class WorkerHandle:
    index: int
    process: subprocess.Popen[bytes]
    control: socket.socket
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    stats: Stats | None = None
    replies: int = 0
    done: dict[int, Done] = field(default_factory=dict)
    gone: bool = False

    def send(self, message: ToWorker, fds: list[int] | None = None) -> None:
        data = encode(message)
        with self.send_lock:
            if fds:
                socket.send_fds(self.control, [data], fds)
            else:
                self.control.sendall(data)


class WorkerPool:
    def __init__(
        self, config: Config, count: int, buckets_fd: int, lock: threading.RLock,
        stopping: threading.Event,
    ) -> None:  # fmt: skip
        self.config = config
        self.count = count
        self.buckets_fd = buckets_fd
        self.lock = lock
        self.changed = threading.Condition(lock)
        self.stopping = stopping
        self.handles: list[WorkerHandle] = []
        self.dead: queue.Queue[int] = queue.Queue()
        self._seq = itertools.count(1)
        self._unanswered: list[tuple[WorkerHandle, int]] = []  # sent, outcome not collected

    def start(self) -> None:
        self.handles = [self._spawn(i) for i in range(self.count)]

    @property
    def alive(self) -> int:
        return sum(1 for w in self.handles if w.process.poll() is None)

    def _spawn(self, index: int) -> WorkerHandle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = {key: asdict(getattr(self.config, key)) for key in WORKER_SECTIONS}
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.proxy.worker", "--control-fd", str(theirs.fileno()),
             "--worker-id", str(index), "--config-json", json.dumps(settings),
             "--buckets-fd", str(self.buckets_fd)],
            pass_fds=[theirs.fileno(), self.buckets_fd],
            env=worker_environment(),  # TLS 1.3 suite preference (agent/tunnel/openssl.cnf)
        )  # fmt: skip
        theirs.close()
        handle = WorkerHandle(index, process, ours)
        threading.Thread(
            target=self._read, args=(handle,), name=f"worker-{index}", daemon=True
        ).start()
        return handle

    def _read(self, handle: WorkerHandle) -> None:
        while True:
            try:
                data = handle.control.recv(1 << 22)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = decode(data)
            except MessageError as exc:
                log.error("worker %d sent a malformed message: %s", handle.index, exc)
                continue
            with self.lock:
                if isinstance(message, Stats):
                    handle.stats = message
                    handle.replies += 1
                elif isinstance(message, Done):
                    handle.done[message.seq] = message
                    if message.seq < 0:
                        log.error("worker %d: %s", handle.index, message.error)
                self.changed.notify_all()
        with self.lock:
            handle.gone = True
            self.changed.notify_all()
        if not self.stopping.is_set():
            self.dead.put(handle.index)

    def respawn(self, index: int, state: Sequence[tuple[MakeMessage, list[int]]]) -> list[str]:
        """Restart dead worker `index` and give it `state` (call from the main thread)."""
        with self.lock:
            old = self.handles[index]
            log.error("worker %d (pid %d) exited; restarting it", index, old.process.pid)
            old.process.wait()
            old.control.close()
            replacement = self.handles[index] = self._spawn(index)
            errors = []
            for make, fds in state:
                errors += self.to_workers(make, fds, [replacement])
            return errors

    def to_workers(
        self, make: MakeMessage, fds: list[int] | None = None,
        only: list[WorkerHandle] | None = None,
    ) -> list[str]:  # fmt: skip
        """Send one message to every live worker and wait until each applied it (and every
        message sent before it without waiting); the failures ("worker N: why")."""
        with self.lock:
            self.send(make, fds, only)
            return self.wait()

    def send(
        self, make: MakeMessage, fds: list[int] | None = None,
        only: list[WorkerHandle] | None = None,
    ) -> None:  # fmt: skip
        """Send without waiting; `wait` collects the outcome later."""
        with self.lock:
            for worker in self.handles if only is None else only:
                if worker.gone:
                    continue
                seq = next(self._seq)
                try:
                    worker.send(make(seq), fds)
                except OSError:
                    continue  # dead: it gets everything on respawn
                self._unanswered.append((worker, seq))

    def wait(self) -> list[str]:
        with self.lock:
            deadline = time.monotonic() + WORKER_TIMEOUT
            errors = []
            waiting, self._unanswered = self._unanswered, []
            for worker, seq in waiting:
                while seq not in worker.done and not worker.gone:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.changed.wait(left)
                done = worker.done.pop(seq, None)
                if done is None and not worker.gone:
                    errors.append(f"worker {worker.index} did not answer in {WORKER_TIMEOUT}s")
                elif done is not None and done.error:
                    errors.append(f"worker {worker.index}: {done.error}")
            return list(dict.fromkeys(errors))  # one line per distinct failure

    def fresh_stats(self, timeout: float = 1.0) -> list[Stats]:
        """Ask every worker for its counters and wait (briefly) for all replies."""
        with self.lock:
            wanted = {w.index: w.replies + 1 for w in self.handles if not w.gone}
            for worker in self.handles:
                with contextlib.suppress(OSError):
                    worker.send(StatsRequest())
            deadline = time.monotonic() + timeout
            while any(w.replies < wanted.get(w.index, 0) for w in self.handles if not w.gone):
                left = deadline - time.monotonic()
                if left <= 0 or not self.changed.wait(left):
                    break
            return [w.stats for w in self.handles if w.stats is not None]

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker answers on its control socket, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = deadline - time.monotonic()
            if len(self.fresh_stats(timeout=max(min(left, 1.0), 0.01))) >= self.count:
                return True
        return False

    def wait_exited(self, timeout: float) -> bool:
        """Wait until every worker has exited by itself (drained), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for worker in self.handles:
            try:
                worker.process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self) -> None:
        with self.lock:
            for worker in self.handles:
                worker.process.terminate()
            for worker in self.handles:
                try:
                    worker.process.wait(5)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
