"""Global rate limits: token buckets shared by every node, in Redis.

`scope: global` rules (agent.policy.ratelimit) take their tokens here when the proxy is given a
Redis address, as Envoy's global rate limit does through its Redis-backed service, without the
extra service: the bucket arithmetic of `agent.policy.ratelimit.take_token` runs inside Redis as
one Lua script (EVALSHA; SCRIPT LOAD on NOSCRIPT), so each take is atomic across every worker of
every node.  The script reads Redis' own clock (TIME), not the caller's: the nodes' monotonic
clocks are unrelated, Redis' is the one clock every node sees.  State per key is a hash
{t: tokens in token-microseconds, l: last refill in microseconds}, both whole numbers below 2**53
(exact in Lua's doubles; `MAX_TOKEN_NS` bounds maxTokens x fillInterval for that), and the key
expires once its bucket would be full again (an absent key is a full bucket), so idle clients
cost no memory.  The interval is used in whole microseconds.

The client is a minimal RESP2 one over a blocking socket (a Unix socket path starting with `/`,
or host:port) with a timeout: a worker's event loop waits at most `timeout` per take.  When
Redis fails (refused, timeout, error reply), the failure is counted and the connection dropped;
for `retry_interval` seconds no new attempt is made, so a dead Redis costs one timeout per
interval, not one per request.  Meanwhile, and for the failed take itself, `on_failure` decides:
  "local" (default): take from `fallback`, the node's shared buckets (same key and bucket: the
          limit holds per node instead of across nodes);
  "allow": admit (fail open; reported as a full bucket);
  "deny":  refuse (fail closed; retry after the retry interval).
"""

from __future__ import annotations

import hashlib
import logging
import socket

from agent.config import OnFailure
from agent.policy.ratelimit import BucketStore

log = logging.getLogger("ferry.proxy.policy")
KEY_PREFIX = b"ferry:rl:"
US_PER_SECOND = 1_000_000

TAKE_SCRIPT = b"""
local max_tokens, per_fill, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local full = max_tokens * interval
local state = redis.call('HMGET', KEYS[1], 't', 'l')
local tokens, last = tonumber(state[1]), tonumber(state[2])
if tokens == nil or last == nil then tokens, last = full, now end
if now > last then
  tokens = math.min(full, tokens + (now - last) * per_fill)
  last = now
end
local allowed = 0
if tokens >= interval then
  tokens = tokens - interval
  allowed = 1
end
local remaining = math.floor(tokens / interval)
if remaining * interval > tokens then remaining = remaining - 1 end
local missing = 0
if tokens < full then missing = (remaining + 1) * interval - tokens end
redis.call('HSET', KEYS[1], 't', string.format('%.0f', tokens), 'l', string.format('%.0f', last))
redis.call('PEXPIRE', KEYS[1], math.ceil((full - tokens) / per_fill / 1000) + 1000)
return {allowed, remaining, string.format('%.0f', missing)}
"""
TAKE_SHA = hashlib.sha1(TAKE_SCRIPT).hexdigest().encode()


class RedisError(Exception):
    """Redis answered with an error, or not in RESP."""


class RedisBuckets:
    """A `BucketStore` in Redis; see the module docstring."""

    def __init__(
        self, address: str, *, fallback: BucketStore, on_failure: OnFailure = "local",
        timeout: float = 0.05, retry_interval: float = 1.0,
    ) -> None:  # fmt: skip
        if on_failure not in ("local", "allow", "deny"):
            raise ValueError(f"on_failure {on_failure!r} is not one of 'local', 'allow', 'deny'")
        if timeout <= 0 or retry_interval < 0:
            raise ValueError(f"timeout {timeout} must be > 0, retry_interval {retry_interval} >= 0")
        self.address = address
        self.fallback = fallback
        self.on_failure: OnFailure = on_failure
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.failures = 0  # Redis errors (each drops the connection)
        self.fallbacks = 0  # takes decided by `on_failure` instead of Redis
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._down_until = float("-inf")

    def take(
        self, key: bytes, max_tokens: int, tokens_per_fill: int, fill_interval: float, now: float
    ) -> tuple[bool, int, float]:
        """Take a token from the global bucket of `key`; `now` (monotonic) only paces retries."""
        if now >= self._down_until:
            interval_us = max(1, round(fill_interval * US_PER_SECOND))
            args = (
                str(max_tokens).encode(),
                str(tokens_per_fill).encode(),
                str(interval_us).encode(),
            )
            try:
                allowed, remaining, missing = self._evalsha(KEY_PREFIX + key, args)
            except (OSError, RedisError, ValueError) as exc:
                if self._down_until == float("-inf"):  # was working: say so once
                    log.warning("global rate limits: Redis at %s failed (%s); on failure: %s",
                                self.address, exc, self.on_failure)  # fmt: skip
                self.failures += 1
                self.close()
                self._down_until = now + self.retry_interval
            else:
                if self._down_until != float("-inf"):
                    log.warning("global rate limits: Redis at %s answers again", self.address)
                    self._down_until = float("-inf")
                return allowed == 1, remaining, int(missing) / tokens_per_fill / US_PER_SECOND
        self.fallbacks += 1
        if self.on_failure == "local":
            return self.fallback.take(key, max_tokens, tokens_per_fill, fill_interval, now)
        if self.on_failure == "allow":
            return True, max_tokens, 0.0
        return False, 0, self.retry_interval

    def _evalsha(self, key: bytes, args: tuple[bytes, ...]) -> tuple[int, int, bytes]:
        try:
            reply = self._command(b"EVALSHA", TAKE_SHA, b"1", key, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            self._command(b"SCRIPT", b"LOAD", TAKE_SCRIPT)
            reply = self._command(b"EVALSHA", TAKE_SHA, b"1", key, *args)
        match reply:
            case [int(allowed), int(remaining), bytes(missing)]:
                return allowed, remaining, missing
        raise RedisError(f"unexpected reply to the take script: {reply!r}")

    # ------------------------------------------------------------------ RESP2
    def _connect(self) -> socket.socket:
        if self._sock is None:
            if self.address.startswith("/"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.address)
                except OSError:
                    sock.close()
                    raise
            else:
                host, _, port = self.address.rpartition(":")
                sock = socket.create_connection((host.strip("[]"), int(port)), self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self.timeout)
            self._sock = sock
        return self._sock

    def _command(self, *args: bytes) -> object:
        sock = self._connect()
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exactly(size + 2)[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise RedisError(f"not a RESP reply: {line[:40]!r}")

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self) -> None:
        assert self._sock is not None
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError(f"Redis at {self.address} closed the connection")
        self._buffer += data

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()
