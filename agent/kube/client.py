"""The Kubernetes API client: connection, list-then-watch loops (reflectors), annotation PATCH.

Client library: lightkube (`AsyncClient`).  Of the maintained Python clients it fits the agent:

- async: its `AsyncClient` runs on the agent's asyncio loop (httpx2 underneath), so five watches
  cost five tasks, not five threads; the official `kubernetes` client is synchronous (a thread
  per watch, and a blocked read to interrupt on shutdown); `kubernetes_asyncio` is async but
  untyped and pulls aiohttp;
- watch semantics: `list` exposes the collection's resourceVersion, `watch` starts from a given
  version and, with `on_error=on_error_raise`, hands every error (410 Gone included) back to the
  caller, so the reflector below decides: relist on 410 (the only way to see the deletions a
  watch missed; lightkube's own retry would rewatch from "now" and miss them), back off on the
  rest.  kr8s restarts a watch that got 410 from the very version that was too old, in a loop.
  None of them asks for bookmarks by itself: `BookmarkTransport` adds `allowWatchBookmarks=true`
  to every watch request, through lightkube's public `transport` seam, so a quiet kind's
  version keeps moving and a reconnect does not fall out of the server's history;
- footprint: lightkube with its models is about 4 MB and its dependencies are small (httpx2,
  msgspec, PyYAML); the generated official clients are an order of magnitude larger.  It is
  typed (`py.typed`), so the agent stays `mypy --strict`;
- credentials: in a pod it uses the service account (`KubeConfig.from_env`), re-reading the
  projected token file when the server answers 401, so rotated tokens just work.  Tokens never
  reach a log here: errors are logged by their status and message, never with headers or the
  configuration.

Objects are read as generic resources (plain dicts, `to_dict`), pods and namespaces included: the
agent reads a handful of fields with its own pure parsers (`agent.kube.pods`), which name a bad
field, instead of a strict typed decode that would fail a whole watch on one odd object.

`Reflector` follows one kind (see `agent.kube.watch` for the loop and its bookkeeping) and keeps
its objects by (namespace, name); its `on_change` (set by whoever follows the kind: the pod
controller, the policy source) is called after every list and event, and only marks it dirty.
`KubeClient` makes the client and the reflectors Ferry uses, and patches a pod's annotations (a
JSON merge patch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterable, Callable, Mapping
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.client_adapter import verify_cluster
from lightkube.core.client import FieldSelector
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.core.generic_client import ListAsyncIterable
from lightkube.core.resource import api_info
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericNamespacedResource,
    create_global_resource,
    create_namespaced_resource,
)
from lightkube.types import PatchType

from agent.config import ConfigError
from agent.kube.watch import BACKOFF_MAX, WatchHealth, backoff

log = logging.getLogger("ferry.agent")

Pods = create_namespaced_resource("", "v1", "Pod", "pods")
Namespaces = create_global_resource("", "v1", "Namespace", "namespaces")
AuthorizationPolicies = create_namespaced_resource(
    "security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies"
)
RequestAuthentications = create_namespaced_resource(
    "security.istio.io", "v1", "RequestAuthentication", "requestauthentications"
)
RateLimitPolicies = create_namespaced_resource(
    "ferry.dev", "v1alpha1", "RateLimitPolicy", "ratelimitpolicies"
)
POLICY_KINDS: dict[str, type[GenericNamespacedResource]] = {
    "AuthorizationPolicy": AuthorizationPolicies,
    "RequestAuthentication": RequestAuthentications,
    "RateLimitPolicy": RateLimitPolicies,
}
Resource = type[GenericNamespacedResource] | type[GenericGlobalResource]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds


class KubeConfigError(ConfigError):
    """The API server cannot be configured (no kubeconfig, no service account)."""


class Gone(Exception):
    """The watch's resourceVersion is older than the server's history (410): list again."""


class BookmarkTransport(httpx2.AsyncBaseTransport):
    """Asks every watch for bookmarks (`allowWatchBookmarks=true`), see the module doc."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.params.get("watch") == "true":
            request.url = request.url.copy_set_param("allowWatchBookmarks", "true")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def connect(kubeconfig: str) -> AsyncClient:
    """A client for the cluster `kubeconfig` names ("": in-cluster, else $KUBECONFIG or
    ~/.kube/config, as `KubeConfig.from_env` looks)."""
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        single = config.get()
        if single is None:
            raise ValueError("it names no current context")
    except (LightkubeConfigError, OSError, KeyError, ValueError) as exc:
        where = kubeconfig or "in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise KubeConfigError(
            f"kubernetes: cannot load the API server config ({where}): {exc}"
        ) from None
    if single.user is None:
        raise KubeConfigError(f"kubernetes: the config {kubeconfig!r} names no user")
    verify = verify_cluster(single.cluster, single.user, single.abs_file, trust_env=False)
    transport = BookmarkTransport(httpx2.AsyncHTTPTransport(verify=verify))
    return AsyncClient(single, transport=transport, trust_env=False, timeout=httpx2.Timeout(10.0))


def _why(exc: BaseException) -> str:
    """An error as logs and status show it: status and message, never headers."""
    if isinstance(exc, ApiError):
        return f"{exc.status.code} {exc.status.reason}: {exc.status.message}"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.url.path}"
    return f"{type(exc).__name__}: {exc}"


def _code(exc: BaseException) -> int | None:
    """The HTTP status of an API error (in a watch: the status of its ERROR event)."""
    if isinstance(exc, ApiError):
        return exc.status.code
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


class Reflector:
    """One kind, listed then watched, kept in `objects` (see the module doc)."""

    def __init__(
        self,
        client: AsyncClient,
        resource: Resource,
        kind: str,
        fields: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.resource = resource
        self.kind = kind
        self.on_change: Callable[[], None] = lambda: None  # set by who follows the kind
        self.fields: FieldSelector | None = dict(fields) if fields else None
        self.clock = clock
        self.jitter = jitter
        self.objects: dict[Key, dict[str, Any]] = {}  # replaced on change, never changed
        self.health = WatchHealth(kind)
        self.synced = asyncio.Event()
        info = api_info(resource).resource
        self.api_version = f"{info.group}/{info.version}" if info.group else info.version

    def _key(self, obj: Mapping[str, Any]) -> Key:
        meta = obj.get("metadata") or {}
        return str(meta.get("namespace") or ""), str(meta.get("name") or "")

    async def run(self) -> None:
        """List, then watch, forever (cancel to stop)."""
        version: str | None = None
        attempt = 0
        while True:
            try:
                if version is None:
                    version = await self._list()
                    attempt = 0
                version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _code(exc) == 410:
                    log.info("kubernetes: %s watch expired (%s); listing again", self.kind,
                             _why(exc))  # fmt: skip
                    version = None
                    continue
                if version is None and _code(exc) == 404:
                    self._not_served()
                    await asyncio.sleep(BACKOFF_MAX)
                    continue
                attempt += 1
                delay = backoff(attempt, self.jitter())
                suppressed = self.health.failed(_why(exc), self.clock())
                if suppressed is not None:
                    more = f" ({suppressed} more since the last report)" if suppressed else ""
                    log.warning("kubernetes: %s %s failed: %s%s; retrying in %.1f s", self.kind,
                                "list" if version is None else "watch", _why(exc), more,
                                delay)  # fmt: skip
                await asyncio.sleep(delay)

    def _not_served(self) -> None:
        """The API server does not serve the kind (no CRD): listed, empty, looked for again."""
        if self.health.served:
            log.warning("kubernetes: the API server does not serve %s (%s); none of them apply "
                        "until it does", self.kind, self.api_version)  # fmt: skip
        self.objects = {}
        self.health.listed("", self.clock(), served=False)
        self.synced.set()
        self.on_change()

    async def _list(self) -> str:
        listing: ListAsyncIterable[Any]
        if issubclass(self.resource, GenericNamespacedResource):
            listing = self.client.list(self.resource, namespace="*", fields=self.fields)
        else:
            listing = self.client.list(self.resource, fields=self.fields)
        objects = {}
        async for item in listing:
            raw: dict[str, Any] = item.to_dict()
            objects[self._key(raw)] = raw
        version = str(listing.resourceVersion)
        self.objects = objects
        self.health.listed(version, self.clock())
        self.synced.set()
        self.on_change()
        return version

    async def _watch(self, version: str) -> str:
        """Watch from `version` until an error (lightkube reconnects clean stream ends)."""
        stream: AsyncIterable[tuple[str, Any]]
        if issubclass(self.resource, GenericNamespacedResource):
            stream = self.client.watch(self.resource, namespace="*", fields=self.fields,
                                       resource_version=version)  # fmt: skip
        else:
            stream = self.client.watch(self.resource, fields=self.fields, resource_version=version)
        async for kind, obj in stream:
            raw: dict[str, Any] = obj.to_dict()
            version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
            if kind in ("ADDED", "MODIFIED"):
                self.objects = {**self.objects, self._key(raw): raw}
            elif kind == "DELETED":
                self.objects = {k: v for k, v in self.objects.items() if k != self._key(raw)}
            self.health.event(version, self.clock())
            if kind != "BOOKMARK":
                self.on_change()
        return version


class KubeClient:
    """The client and the reflectors of one agent."""

    def __init__(self, client: AsyncClient, node: str, policies: bool) -> None:
        self.client = client
        self.pods = Reflector(client, Pods, "pods", {"spec.nodeName": node})
        self.namespaces = Reflector(client, Namespaces, "namespaces")
        self.policies = {
            kind: Reflector(client, resource, kind) for kind, resource in POLICY_KINDS.items()
        } if policies else {}  # fmt: skip

    @property
    def reflectors(self) -> list[Reflector]:
        return [self.pods, self.namespaces, *self.policies.values()]

    async def annotate(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self.client.patch(Pods, name, patch, namespace=namespace,
                                patch_type=PatchType.MERGE)  # fmt: skip

    async def close(self) -> None:
        await self.client.close()
