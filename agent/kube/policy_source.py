"""The policy kinds from the API server, as a `PolicySource` (`agent.policy_source`).

Three reflectors (`agent.kube.client.Reflector`) follow `AuthorizationPolicy` and
`RequestAuthentication` (security.istio.io/v1) and `RateLimitPolicy` (ferry.dev/v1alpha1) in
every namespace.  `read` turns what they hold into the very documents the directory source
yields (`policy_documents`, pure: each object's apiVersion, kind, metadata and spec through
`agent.policy.documents.parse_document`, its `status` left out), so `agent.policy_store` works
unchanged: an invalid object is reported with its kind, namespace, name, field and reason, the
whole change is rejected and the last good policy stays in force, as for a bad file.  Errors
name the object's place as `kubernetes` where the directory source names a file.

Until every kind has been listed once, `read` answers one error ("not listed yet"), so the
policy restored from the state dir stays in force instead of an empty set replacing it while
the API server is slow or away.  A kind the API server does not serve (its CRD is not installed)
counts as listed and empty.  `changed` returns after any list or event of the three kinds (the
reflectors' `on_change`), and at the latest every `RESCAN_INTERVAL` seconds; `read` may run in
a thread while the reflectors go on: they replace their object maps, never change them in place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from agent.kube.client import POLICY_KINDS, Reflector
from agent.policy.documents import Loaded, Parsed, PolicyError, combine, parse_document
from agent.policy_source import RESCAN_INTERVAL

log = logging.getLogger("ferry.agent")
PLACE = "kubernetes"


def policy_documents(objects: Iterable[tuple[str, str, Mapping[str, Any]]]) -> Loaded:
    """(kind, apiVersion, object) from the API server -> documents and errors (pure)."""
    parsed: list[tuple[Parsed, str]] = []
    ordered = sorted(objects, key=lambda o: (o[0], _key(o[2])))
    for index, (kind, api_version, obj) in enumerate(ordered):
        document = {"apiVersion": api_version, "kind": kind,
                    "metadata": obj.get("metadata"), "spec": obj.get("spec")}  # fmt: skip
        if document["spec"] is None:
            del document["spec"]
        parsed.append((parse_document(document, file=PLACE, index=index), PLACE))
    return combine(parsed)


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class KubernetesSource:
    """The policy kinds' reflectors behind `PolicySource` (see the module doc)."""

    def __init__(
        self, reflectors: Mapping[str, Reflector], rescan: float = RESCAN_INTERVAL
    ) -> None:
        self.reflectors = dict(reflectors)
        for reflector in self.reflectors.values():
            reflector.on_change = self.poke
        self.rescan = rescan
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def poke(self) -> None:
        """A reflector listed or saw an event (its `on_change`)."""
        self._dirty.set()

    def describe(self) -> str:
        return f"{PLACE} API server ({', '.join(POLICY_KINDS)})"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(r.run(), name=f"watch-{kind}")
            for kind, r in self.reflectors.items()
        ]

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    def read(self) -> Loaded:
        waiting = [kind for kind, r in self.reflectors.items() if not r.health.synced]
        if waiting:
            reason = f"not listed yet from the API server: {', '.join(waiting)}"
            return Loaded((), (PolicyError(PLACE, "", "", reason),))
        return policy_documents(
            (kind, r.api_version, obj)
            for kind, r in self.reflectors.items()
            for obj in r.objects.values()
        )

    async def changed(self) -> None:
        loop = asyncio.get_running_loop()
        rescan = loop.call_later(self.rescan, self._dirty.set)
        try:
            await self._dirty.wait()
        finally:
            rescan.cancel()
        self._dirty.clear()
