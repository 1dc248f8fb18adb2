"""The policy in force on this node: read from a source, checked, JWKS inlined, versioned, pushed.

`PolicyStore` follows one `agent.policy_source.PolicySource` (`follow`: wait for a change, load,
again).  A load reads every document (`source.read`, in a thread) and decides:

- any document invalid: the whole change is rejected and the last good policy stays in force (a
  partial set could allow what a rejected DENY was meant to stop).  Every error (file, field
  path, reason) is logged once per distinct rejection and kept for `agent status`.
- all valid: the documents become the declared `PolicySet`.  Its `jwksUri`s are resolved
  (`agent.jwks_fetch.JwksKeys`: new URIs fetched now, before the push) and their keys inlined
  into the rules (`inline_jwks`, as istiod does), which gives the effective set.  Its canonical
  JSON (`encode`) is compared with the version in force; only a different text makes a new
  version, saved (below), then pushed to every proxy as slices (`hub.send_policy`), under the
  agent's state lock so a proxy that connects meanwhile gets either the old version in its
  snapshot and then the new one, or the new one only (`chunks` is what the snapshot sends).

A JWKS refresh that changes the keys goes the same way (`refresh_jwks`, called when a URI is
due): a new version with the new keys inlined.  Loads and refreshes are serialized.

The version in force is saved to `<state-dir>/policy.json` (0600, written to a temporary file
and renamed), with the declared set it came from, and read back when the agent starts, so a
restart neither loses the last good policy (the directory may hold an invalid change by then)
nor sends proxies an empty one while it loads; version numbers therefore keep growing across
restarts, and the keys it inlined seed the JWKS cache (refetched at once, kept if the fetch
fails, refreshed as usual even while the directory holds a rejected change).

`for_workload` compiles the policy in force for one workload (its namespace and labels), cached
per version, for `agent policy check` (`agent.policy_check.evaluate`) and for the documents per
workload that `agent status` shows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from agent.config import PolicyConfig
from agent.control.protocol import PolicyChunk, policy_chunks
from agent.jwks_fetch import JwksKeys
from agent.policy.compile import PolicySet, WorkloadPolicy, compile_for
from agent.policy.documents import PolicyError
from agent.policy_check import CheckRequest, evaluate
from agent.policy_source import PolicySource
from agent.workloads import Workload

log = logging.getLogger("ferry.agent")
POLICY_STATE = "policy.json"
EMPTY = PolicySet()


class PolicySink(Protocol):
    async def send_policy(self, version: int, text: str) -> int: ...


# --------------------------------------------------------------------------- pure parts
def jwks_uris(policy: PolicySet, default_timeout: float) -> dict[str, float]:
    """Every `jwksUri` of a rule without inline `jwks`, with its fetch timeout (the rule's own
    `timeout`, else the default; the shortest when several rules name one URI)."""
    wanted: dict[str, float] = {}
    for document in policy.authentication:
        for rule in document.jwt_rules:
            if rule.jwks_uri and not rule.jwks:
                timeout = rule.timeout or default_timeout
                wanted[rule.jwks_uri] = min(timeout, wanted.get(rule.jwks_uri, timeout))
    return wanted


def inline_jwks(policy: PolicySet, keys: Mapping[str, str]) -> PolicySet:
    """`policy` with the fetched key set of every `jwksUri` rule (that has no inline `jwks`)
    inlined; a URI without keys ("") stays without, so its tokens are rejected (fail closed)."""
    authentication = tuple(
        replace(
            document,
            jwt_rules=tuple(
                replace(rule, jwks=keys.get(rule.jwks_uri, ""))
                if rule.jwks_uri and not rule.jwks
                else rule
                for rule in document.jwt_rules
            ),
        )
        for document in policy.authentication
    )
    return replace(policy, authentication=authentication)


def encode(policy: PolicySet) -> str:
    """The one text of a policy set: canonical ASCII JSON (equal sets, equal texts)."""
    return json.dumps(policy.to_json(), sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- state
@dataclass(frozen=True)
class PolicyVersion:
    """A policy in force: what the proxies got, and when."""

    version: int
    policy: PolicySet  # effective (JWKS inlined)
    text: str  # `encode(policy)`
    loaded_at: float  # when it was made (0: never, the empty policy the agent starts with)


@dataclass(frozen=True)
class Rejection:
    at: float
    errors: tuple[PolicyError, ...]


class PolicyStore:
    def __init__(
        self,
        source: PolicySource,
        sink: PolicySink,
        state_lock: asyncio.Lock,
        config: PolicyConfig,
        trust_domain: str,
        state_dir: Path,
        jwks: JwksKeys,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.sink = sink
        self.state_lock = state_lock
        self.config = config
        self.trust_domain = trust_domain
        self.path = state_dir / POLICY_STATE
        self.jwks = jwks
        self.clock = clock
        self.current = PolicyVersion(0, EMPTY, encode(EMPTY), 0.0)
        self.declared = EMPTY  # the last good documents, as loaded (before inlining)
        self.rejection: Rejection | None = None
        self.warnings: tuple[PolicyError, ...] = ()
        self._publishing = asyncio.Lock()
        self._compiled: dict[tuple[str, tuple[tuple[str, str], ...]], WorkloadPolicy] = {}
        self._compiled_version = -1

    # --------------------------------------------------------------- restore
    def restore(self) -> None:
        """Take the version saved by the last agent as the one in force (see the module doc)."""
        try:
            raw = json.loads(self.path.read_text())
            policy = PolicySet.from_json(json.loads(raw["policy"]))
            declared = PolicySet.from_json(json.loads(raw["declared"]))
            version, loaded_at = int(raw["version"]), float(raw["loaded_at"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("policy: ignoring %s: %s", self.path, exc)
            return
        self.current = PolicyVersion(version, policy, encode(policy), loaded_at)
        self.declared = declared
        for document in policy.authentication:
            for rule in document.jwt_rules:
                if rule.jwks_uri and rule.jwks:
                    self.jwks.seed(rule.jwks_uri, rule.jwks, loaded_at)
        log.info("policy: version %d restored from %s (%d document(s))", version, self.path,
                 len(policy.documents))  # fmt: skip

    def _save(self, current: PolicyVersion, declared: PolicySet) -> None:
        body = json.dumps(
            {
                "version": current.version,
                "loaded_at": current.loaded_at,
                "policy": current.text,
                "declared": encode(declared),  # without the fetched keys: refetched on restore
            }
        )
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    # ------------------------------------------------------------------ load
    async def follow(self) -> None:
        """Reload on every change of the source, forever (the source is started already)."""
        while True:
            await self.source.changed()
            try:
                await self.load()
            except Exception:  # the next change (or rescan) tries again; the agent keeps running
                log.exception("policy: loading from the %s failed", self.source.describe())

    async def load(self) -> None:
        """Read the source; apply its documents if every one is valid (see the module doc)."""
        loaded = await asyncio.to_thread(self.source.read)
        if loaded.errors:
            if self.rejection is None or self.rejection.errors != loaded.errors:
                for error in loaded.errors:
                    log.error("policy: %s", error)
                log.error("policy: change rejected (%d error(s)); version %d stays in force",
                          len(loaded.errors), self.current.version)  # fmt: skip
                self.rejection = Rejection(self.clock(), loaded.errors)
            return
        self.rejection = None
        if loaded.warnings != self.warnings:
            for warning in loaded.warnings:
                log.warning("policy: %s", warning)
            self.warnings = loaded.warnings
        self.declared = PolicySet.of(loaded.documents)
        await self.publish()

    async def refresh_jwks(self) -> None:
        """Refetch the JWKS that are due; a change of keys is a new version."""
        due = self.jwks.next_due()
        if due is not None and self.clock() >= due:
            await self.publish()

    async def publish(self) -> None:
        """Resolve the JWKS of the declared set, inline them and push a new version if the
        effective text changed."""
        async with self._publishing:
            declared = self.declared  # a load may declare a newer set meanwhile: it publishes next
            await self.jwks.resolve(jwks_uris(declared, self.config.jwks_timeout))
            effective = inline_jwks(declared, self.jwks.published())
            text = encode(effective)
            if text == self.current.text:
                return
            started = time.monotonic()
            current = PolicyVersion(self.current.version + 1, effective, text, self.clock())
            try:  # saved first: a restart never falls back behind what proxies were sent
                await asyncio.to_thread(self._save, current, declared)
            except OSError as exc:
                log.error("policy: cannot save %s (a restarted agent would start from the "
                          "version before): %s", self.path, exc)  # fmt: skip
            async with self.state_lock:
                self.current = current
                acked = await self.sink.send_policy(current.version, text)
            log.info("policy: version %d (%d document(s), %d bytes) reached %d proxy(ies) in "
                     "%.1f ms", current.version, len(effective.documents), len(text), acked,
                     (time.monotonic() - started) * 1e3)  # fmt: skip

    async def jwks_forever(self, poll: float = 1.0) -> None:
        while True:
            await asyncio.sleep(poll)
            try:
                await self.refresh_jwks()
            except Exception:
                log.exception("policy: refreshing JWKS failed")

    # ----------------------------------------------------------------- reads
    def chunks(self) -> list[PolicyChunk]:
        """The version in force as slices (for a proxy's snapshot; call under the state lock)."""
        return policy_chunks(self.current.version, self.current.text)

    def for_workload(self, workload: Workload) -> WorkloadPolicy:
        """The policy in force compiled for `workload` (cached per version)."""
        if self._compiled_version != self.current.version:
            self._compiled, self._compiled_version = {}, self.current.version
        key = (workload.namespace, workload.labels)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = compile_for(
                self.current.policy,
                workload.namespace,
                dict(workload.labels),
                root_namespace=self.config.root_namespace,
                trust_domain=self.trust_domain,
            )
        return compiled

    def check(self, workload: Workload, request: CheckRequest) -> dict[str, Any]:
        """`agent policy check` for one workload (see `agent.policy_check`)."""
        result = evaluate(
            self.for_workload(workload),
            workload.ips[0] if workload.ips else "",
            request,
            self.clock(),
        )
        return {"version": self.current.version, "workload": workload.describe(), **result}

    def status(self, workloads: Mapping[str, Workload]) -> dict[str, Any]:
        rejection = self.rejection
        return {
            "source": self.source.describe(),
            "version": self.current.version,
            "loaded_at": self.current.loaded_at or None,
            "documents": len(self.current.policy.documents),
            "rejected": None
            if rejection is None
            else {"at": rejection.at, "errors": [str(e) for e in rejection.errors]},
            "warnings": [str(w) for w in self.warnings],
            "jwks": self.jwks.status(),
            "workloads": {uid: list(self.for_workload(w).policies) for uid, w in workloads.items()},
        }
