"""The policy set in force in one proxy process, assembled from its slices, compiled per workload.

The agent sends the whole policy set (`agent.policy.compile.PolicySet`, as JSON) cut into
versioned slices (`agent.control.protocol.PolicyChunk`); the supervisor and every worker keep a
`PolicyState`.  `receive` collects the slices of one version and, on the last one, decodes and
validates the whole set again (defence in depth: a set that does not validate is refused with
every reason and the previous one stays in force); only then does it replace the set in force, in
one assignment, so a connection is always decided by one complete version.  A slice of another
version than the one being collected starts over (an agent that reconnected mid-change).

`for_workload(namespace, labels)` compiles what selects one workload (`compile_for`), once per
distinct (namespace, labels) and policy version: workloads of one deployment share the result.
It is None when no document selects the workload, so unpoliced traffic costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from agent.policy.compile import PolicySet, WorkloadPolicy, compile_for
from agent.policy.documents import InvalidPolicy

LabelKey = tuple[str, tuple[tuple[str, str], ...]]


class PolicyRejected(ValueError):
    """A policy version could not be applied; the one in force stays."""


class PolicyState:
    def __init__(self, root_namespace: str, trust_domain: str) -> None:
        self.root_namespace = root_namespace
        self.trust_domain = trust_domain
        self.version = 0
        self.policy = PolicySet()
        self._collecting = -1
        self._parts: list[str] = []
        self._compiled: dict[LabelKey, WorkloadPolicy | None] = {}

    def receive(self, version: int, last: bool, text: str) -> bool:
        """Take one slice; True when it completed a version (now in force).  PolicyRejected
        when the completed set does not decode or validate."""
        if version != self._collecting:
            self._collecting, self._parts = version, []
        self._parts.append(text)
        if not last:
            return False
        whole, self._parts, self._collecting = "".join(self._parts), [], -1
        try:
            policy = PolicySet.from_json(json.loads(whole))
        except (ValueError, InvalidPolicy, RecursionError) as exc:  # RecursionError: too deep
            raise PolicyRejected(f"policy version {version} refused: {exc}") from None
        self.version, self.policy = version, policy
        self._compiled = {}
        return True

    def set_trust_domain(self, trust_domain: str) -> None:
        """Principals in policies are read against the trust domain: recompile on a change."""
        if trust_domain != self.trust_domain:
            self.trust_domain = trust_domain
            self._compiled = {}

    def for_workload(self, namespace: str, labels: Mapping[str, str]) -> WorkloadPolicy | None:
        key = (namespace, tuple(sorted(labels.items())))
        if key in self._compiled:
            return self._compiled[key]
        compiled: WorkloadPolicy | None = None
        if self.policy.documents:
            compiled = compile_for(self.policy, namespace, labels,
                                   root_namespace=self.root_namespace,
                                   trust_domain=self.trust_domain)  # fmt: skip
            if not compiled.policies:
                compiled = None
        self._compiled[key] = compiled
        return compiled
