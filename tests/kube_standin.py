"""A stand-in Kubernetes API server: the list/watch wire format, and nothing else, for tests.

No API server can run on the test machine, so the agent's Kubernetes client is tested against
this stand-in.  It is small on purpose and speaks what the real kube-apiserver speaks on the
paths Ferry uses, byte for byte where a client could tell the difference:

- HTTP/1.1 with keep-alive; every request must carry `Authorization: Bearer <token>` (else 401).
- `GET <collection>` lists: `{"kind": "PodList", "apiVersion": "v1", "metadata":
  {"resourceVersion": "N"}, "items": [...]}`; `GET <collection>/<name>` gets one object.
- `GET <collection>?watch=true` streams events as a chunked response, one JSON object per line
  (`{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": {...}}`):
  `resourceVersion` unset or "0" starts with a synthetic ADDED per object; a version older than
  the retained history gets 200 then one ERROR event carrying a `Status` with code 410
  (reason `Expired`, "too old resource version"), as the real watch cache answers;
  `allowWatchBookmarks=true` gets a BOOKMARK (only `metadata.resourceVersion`) every
  `bookmark_interval` seconds of quiet; `timeoutSeconds` ends the stream cleanly.
- `fieldSelector` on `metadata.name`, `metadata.namespace` and, for pods, `spec.nodeName` (`=`,
  `==`, `!=`, comma-joined); any other field is a 400, as on the real server.  An update that
  moves an object into or out of a watch's selector reaches it as ADDED or DELETED.
- `PATCH` with `application/merge-patch+json` (RFC 7386) on any object; other patch types get
  415.  A patch that changes nothing keeps the resourceVersion and makes no event.
- `POST /apis/authentication.k8s.io/v1/tokenreviews` (TokenReview, what a CA service asks):
  201 with the review in `status`: for a token made by `service_account_token`, `authenticated`,
  `user.username` `system:serviceaccount:<ns>:<sa>`, its groups, and the pod-bound claims in
  `user.extra` (`authentication.kubernetes.io/pod-name`, `-uid`, and `node-name` as 1.30+ gives
  it; `node_claim=False` leaves the node out, as older servers do); for an expired token, one
  for other audiences, or any other string, `authenticated: false` and the server's error text.
- resourceVersions are one global counter (decimal strings, opaque to clients); every object gets
  `metadata.uid`, `resourceVersion` and `creationTimestamp`.

Errors are `Status` objects with the real reasons and codes.  Tests drive the state directly
(`apply`, `delete`, `expire`: forget the history and end every open watch, so clients come back
with a version that is now too old and must relist; `fail_next`: answer the next requests with
an error; `unserved`: kinds answered 404, as when their CRD is not installed) and read what
clients asked for (`requests`).  The listening socket may be made in
another network namespace (pass `sock`), so an agent in a throwaway node can reach it.
"""

from __future__ import annotations

import copy
import datetime as dt
import http.server
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

Object = dict[str, Any]
TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class BoundToken:
    """A service-account token bound to a pod, as the stand-in's TokenReview knows it."""

    namespace: str
    service_account: str
    pod: str
    node: str
    expires: float
    audiences: tuple[str, ...]
    node_claim: bool


@dataclass(frozen=True)
class Kind:
    prefix: str  # "api/v1" or "apis/<group>/<version>"
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return self.prefix.removeprefix("apis/").removeprefix("api/")


KINDS = {
    "pods": Kind("api/v1", "Pod", True),
    "namespaces": Kind("api/v1", "Namespace", False),
    "authorizationpolicies": Kind("apis/security.istio.io/v1", "AuthorizationPolicy", True),
    "requestauthentications": Kind("apis/security.istio.io/v1", "RequestAuthentication", True),
    "ratelimitpolicies": Kind("apis/ferry.dev/v1alpha1", "RateLimitPolicy", True),
}
FIELDS = {"metadata.name", "metadata.namespace"}
POD_FIELDS = FIELDS | {"spec.nodeName"}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def status(code: int, reason: str, message: str) -> Object:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _field(obj: Object, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_selector(resource: str, text: str) -> list[tuple[str, bool, str]]:
    """`spec.nodeName=a,metadata.name!=b` as (field, equal, value) terms, or a 400."""
    allowed = POD_FIELDS if resource == "pods" else FIELDS
    terms = []
    for term in filter(None, text.split(",")):
        op = next((op for op in ("!=", "==", "=") if op in term), None)
        if op is None:
            raise ApiError(400, "BadRequest", f"invalid selector: {term!r}")
        name, value = term.split(op, 1)
        equal = op != "!="
        if name not in allowed:
            raise ApiError(400, "BadRequest",
                           f'field label not supported: {name}')  # fmt: skip
        terms.append((name, equal, value))
    return terms


def selected(obj: Object | None, terms: list[tuple[str, bool, str]]) -> bool:
    if obj is None:
        return False
    return all((_field(obj, name) == value) == equal for name, equal, value in terms)


@dataclass
class Event:
    rv: int
    resource: str
    type: str
    old: Object | None  # before (None: created)
    new: Object | None  # after (None: deleted)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)


class KubeStandin:
    """The stand-in server (see the module doc); serves from a thread until `close`."""

    def __init__(
        self,
        token: str,
        sock: socket.socket | None = None,
        bookmark_interval: float = 1.0,
    ) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.objects: dict[str, dict[tuple[str, str], Object]] = {k: {} for k in KINDS}
        self.rv = 1
        self.history: list[Event] = []
        self.oldest = 1  # watches from a version below this are too old (410)
        self.generation = 0  # bumped by `expire`: open watches end
        self.requests: list[Request] = []
        self.failures: list[tuple[int, str]] = []
        self.unserved: set[str] = set()  # resources answered 404, as without their CRD
        self.tokens: dict[str, BoundToken] = {}  # what TokenReview knows
        self.changed = threading.Condition()
        self.closing = False
        if sock is None:
            sock = socket.create_server(("127.0.0.1", 0))
        self.server = _Server(sock.getsockname()[:2], _handler(self), bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = sock
        self.server.daemon_threads = True
        sock.listen(64)
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       name="kube-standin", daemon=True)  # fmt: skip
        self.thread.start()

    def close(self) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    # ------------------------------------------------------------ test controls
    def apply(self, resource: str, obj: Object) -> Object:
        """Create or replace an object (as `kubectl apply` would); returns it as stored."""
        kind = KINDS[resource]
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", "") if kind.namespaced else "", meta["name"])
        with self.changed:
            old = self.objects[resource].get(key)
            new = copy.deepcopy(obj)
            new.update(kind=kind.kind, apiVersion=kind.api_version)
            meta = new["metadata"]
            meta["uid"] = (old or {}).get("metadata", {}).get("uid") or meta.get(
                "uid", str(uuid.uuid4())
            )
            meta.setdefault("creationTimestamp",
                            dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip
            self._store(resource, key, old, new)
            return copy.deepcopy(new)

    def delete(self, resource: str, namespace: str, name: str) -> None:
        key = (namespace if KINDS[resource].namespaced else "", name)
        with self.changed:
            old = self.objects[resource].get(key)
            if old is not None:
                self._store(resource, key, old, None)

    def get(self, resource: str, namespace: str, name: str) -> Object | None:
        key = (namespace if KINDS[resource].namespaced else "", name)
        with self.changed:
            found = self.objects[resource].get(key)
            return copy.deepcopy(found) if found else None

    def expire(self, meanwhile: Callable[[], None] | None = None) -> None:
        """End every open watch, make the changes of `meanwhile` (which no watch sees), and
        forget the event history (etcd compaction): a client that comes back with the version
        it had gets 410 Gone and must list again to learn of them."""
        with self.changed:
            self.generation += 1
            if meanwhile is not None:
                meanwhile()
            self.history.clear()
            self.oldest = self.rv + 1
            self.changed.notify_all()

    def fail_next(self, count: int, code: int = 500) -> None:
        """Answer the next `count` requests with `code` (an `InternalError` Status)."""
        with self.changed:
            self.failures += [(code, "InternalError")] * count

    def service_account_token(self, namespace: str, service_account: str, pod: str, node: str,
                              expires_in: float = 3600.0, audiences: tuple[str, ...] = (),
                              node_claim: bool = True) -> str:  # fmt: skip
        """A projected token of `pod` (on `node`) that TokenReview authenticates until it
        expires (`expires_in` may be negative: expired already)."""
        token = f"sa.{secrets.token_urlsafe(24)}"
        with self.changed:
            self.tokens[token] = BoundToken(
                namespace, service_account, pod, node, time.time() + expires_in,
                audiences or ("https://kubernetes.default.svc",), node_claim,
            )  # fmt: skip
        return token

    def review(self, body: Object) -> Object:
        """The TokenReview the real server answers for `body` (a TokenReview)."""
        spec = body.get("spec") or {}
        token, wanted = spec.get("token", ""), spec.get("audiences") or []
        with self.changed:
            bound = self.tokens.get(token)
        status: Object = {"user": {}}
        if bound is None:
            status["error"] = (
                "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
            )
        elif bound.expires <= time.time():
            status["error"] = "[invalid bearer token, service account token has expired]"
        elif wanted and not set(wanted) & set(bound.audiences):
            status["error"] = (f"[invalid bearer token, token audiences {list(bound.audiences)} is "
                               f"invalid for the target audiences {wanted}]")  # fmt: skip
        else:
            extra = {"authentication.kubernetes.io/pod-name": [bound.pod],
                     "authentication.kubernetes.io/pod-uid": [str(uuid.uuid4())]}  # fmt: skip
            if bound.node_claim:
                extra["authentication.kubernetes.io/node-name"] = [bound.node]
            status = {
                "authenticated": True,
                "user": {"username": f"system:serviceaccount:{bound.namespace}:"
                                     f"{bound.service_account}",
                         "uid": str(uuid.uuid4()),
                         "groups": ["system:serviceaccounts",
                                    f"system:serviceaccounts:{bound.namespace}",
                                    "system:authenticated"],
                         "extra": extra},
                "audiences": wanted or list(bound.audiences),
            }  # fmt: skip
        return {
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status,
        }  # fmt: skip

    def asked(self, method: str, path: str) -> list[Request]:
        with self.changed:
            return [r for r in self.requests if r.method == method and r.path == path]

    # -------------------------------------------------------------- the store
    def _store(self, resource: str, key: tuple[str, str], old: Object | None,
               new: Object | None) -> None:  # fmt: skip
        self.rv += 1
        if new is None:
            del self.objects[resource][key]
            gone = copy.deepcopy(old)
            assert gone is not None
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append(Event(self.rv, resource, "DELETED", old, gone))
        else:
            new["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[resource][key] = new
            self.history.append(Event(self.rv, resource, "MODIFIED", old, new))
        self.changed.notify_all()

    def _list(self, resource: str, namespace: str, terms: list[tuple[str, bool, str]]) -> Object:
        kind = KINDS[resource]
        with self.changed:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[resource].items())
                     if (not namespace or ns == namespace) and selected(o, terms)]  # fmt: skip
            rv = self.rv
        for item in items:  # the real server leaves these out of list items
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)}, "items": items}  # fmt: skip

    def _watch(
        self, resource: str, namespace: str, terms: list[tuple[str, bool, str]],
        since: str, bookmarks: bool, timeout: float,
    ) -> Iterator[Object]:  # fmt: skip
        """The events of one watch, as the real watch cache would send them."""
        kind = KINDS[resource]

        def visible(obj: Object | None) -> bool:
            if obj is None:
                return False
            ns = obj["metadata"].get("namespace", "")
            return (not namespace or ns == namespace) and selected(obj, terms)

        with self.changed:
            generation = self.generation
            if since in ("", "0"):
                position = self.rv
                initial = [copy.deepcopy(o) for o in self.objects[resource].values() if visible(o)]
            else:
                position = int(since)
                initial = []
                if position < self.oldest - 1:
                    message = f"too old resource version: {position} ({self.oldest - 1})"
                    yield {"type": "ERROR", "object": status(410, "Expired", message)}
                    return
        for obj in initial:
            yield {"type": "ADDED", "object": obj}
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while True:
            pending: list[Object] = []
            with self.changed:
                while True:
                    if self.closing or self.generation != generation:
                        return
                    fresh = [e for e in self.history if e.rv > position and e.resource == resource]
                    now = time.monotonic()
                    if fresh or now >= deadline:
                        break
                    if bookmarks and now - quiet_since >= self.bookmark_interval:
                        break
                    wake = min(deadline, quiet_since + self.bookmark_interval) if bookmarks else (
                        deadline)  # fmt: skip
                    self.changed.wait(max(0.001, wake - now))
                rv = self.rv
                for event in fresh:
                    was, now_in = visible(event.old), visible(event.new)
                    if event.type == "DELETED":
                        kind_of = "DELETED" if was else ""
                    elif was and now_in:
                        kind_of = "MODIFIED"
                    elif now_in:
                        kind_of = "ADDED"
                    elif was:  # moved out of the selector: the watcher sees it go
                        kind_of = "DELETED"
                    else:
                        kind_of = ""
                    if kind_of:
                        pending.append({"type": kind_of, "object": copy.deepcopy(event.new)})
                    position = event.rv
            yield from pending
            if pending:
                quiet_since = time.monotonic()
            elif time.monotonic() >= deadline:
                return
            elif bookmarks and time.monotonic() - quiet_since >= self.bookmark_interval:
                position = max(position, rv)
                yield {"type": "BOOKMARK", "object": {"kind": kind.kind,
                       "apiVersion": kind.api_version,
                       "metadata": {"resourceVersion": str(position)}}}  # fmt: skip
                quiet_since = time.monotonic()

    def _patch(self, resource: str, namespace: str, name: str, body: Any) -> Object:
        key = (namespace if KINDS[resource].namespaced else "", name)
        with self.changed:
            old = self.objects[resource].get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
            new = merge_patch(old, body)
            new["metadata"]["name"] = name  # identity fields cannot be patched away
            new["metadata"]["uid"] = old["metadata"]["uid"]
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if new != old:
                self._store(resource, key, old, new)
            return copy.deepcopy(self.objects[resource][key])


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-stream (every watch ends so): not a server error


def _route(path: str) -> tuple[str, str, str]:
    """(resource, namespace, name) of a request path, or a 404."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        rest = parts[3:]
    else:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or rest[0] not in KINDS or len(rest) > 2:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    resource = rest[0]
    kind = KINDS[resource]
    if "/".join(parts[: len(kind.prefix.split("/"))]) != kind.prefix:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {path}")
    return resource, namespace, rest[1] if len(rest) == 2 else ""


def _handler(standin: KubeStandin) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read `requests`

        def do_GET(self) -> None:
            self._serve("GET")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

        def do_POST(self) -> None:
            self._serve("POST")

        def _send_json(self, code: int, body: Object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with standin.changed:
                standin.requests.append(Request(method, url.path, query, dict(self.headers)))
                failure = standin.failures.pop(0) if standin.failures else None
            try:
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    raise ApiError(401, "Unauthorized", "Unauthorized")
                if failure is not None:
                    raise ApiError(failure[0], failure[1], "injected failure")
                if method == "POST":
                    if url.path != TOKENREVIEWS:
                        raise ApiError(
                            405,
                            "MethodNotAllowed",
                            f"the server does not allow this method on {url.path}",
                        )
                    self._send_json(201, standin.review(json.loads(body)))
                    return
                resource, namespace, name = _route(url.path)
                if resource in standin.unserved:
                    raise ApiError(404, "NotFound", "the server could not find the requested "
                                   f"resource {url.path}")  # fmt: skip
                terms = field_selector(resource, query.get("fieldSelector", ""))
                if method == "PATCH":
                    ctype = self.headers.get("Content-Type", "")
                    if ctype != "application/merge-patch+json":
                        raise ApiError(415, "UnsupportedMediaType",
                                       f"the body of the request was in an unknown format - "
                                       f"accepted media types include: "
                                       f"application/merge-patch+json; got {ctype}")  # fmt: skip
                    self._send_json(200, standin._patch(resource, namespace, name,
                                                        json.loads(body)))  # fmt: skip
                elif name:
                    found = standin.get(resource, namespace, name)
                    if found is None:
                        raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
                    self._send_json(200, found)
                elif query.get("watch") in ("true", "1"):
                    self._stream(standin._watch(
                        resource, namespace, terms, query.get("resourceVersion", ""),
                        query.get("allowWatchBookmarks") == "true",
                        float(query.get("timeoutSeconds") or 1800),
                    ))  # fmt: skip
                else:
                    self._send_json(200, standin._list(resource, namespace, terms))
            except ApiError as exc:
                self._send_json(exc.code, status(exc.code, exc.reason, exc.message))

        def _stream(self, events: Iterator[Object]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for event in events:
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler
