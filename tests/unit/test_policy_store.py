"""The policy in force: from files to proxies, versioned, with JWKS inlined and errors refused.

The whole agent-side path runs for real except the proxy: `DirectorySource` on a temporary
directory (inotify), `PolicyStore`, a real `ProxyHub`, and a scripted proxy on the other end of a
SOCK_SEQPACKET socketpair that assembles the policy slices, validates them the way a proxy must
(`PolicySet.from_json`) and records when each version arrived.  JWKS come from a real HTTP
server on loopback.  The measure of "applied within 1 s": from the file write to the proxy
holding the new version.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.agent_session import Snapshot
from agent.config import PolicyConfig
from agent.control.channel import AsyncChannel
from agent.control.protocol import Ack, Hello, PolicyChunk, ProxySession, policy_chunks
from agent.directory import plan_update
from agent.jwks_fetch import JwksKeys
from agent.netns_id import NetnsId
from agent.policy.compile import PolicySet
from agent.policy.documents import RequestAuthentication
from agent.policy.jwt_rules import JwtRule
from agent.policy_source import DirectorySource
from agent.policy_store import POLICY_STATE, PolicyStore, encode, inline_jwks, jwks_uris
from agent.proxy_hub import ProxyHub
from agent.workloads import new_workload
from tests.unit.jwks_server import JwksServer, ec_key, jwks

BUDGET = 1.0
NO_DIRECTORY = plan_update(0, 0, "passthrough", (), (), reset=True)
WEB = new_workload(Path("/var/run/netns/web"), NetnsId(4, 7), "shop", "web", None, {"app": "web"})


def allow(name: str, method: str, app: str = "web") -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  rules:
  - to: [{{operation: {{methods: ["{method}"]}}}}]
"""


def request_authentication(uri: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules:
  - issuer: https://idp.example
    jwksUri: {uri}
"""


CUSTOM = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: shop}
spec:
  action: CUSTOM
  rules: [{}]
"""


@dataclass
class FakeProxy:
    """The proxy's end: acks everything, assembles and validates policy versions."""

    versions: dict[int, PolicySet] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    slices: list[str] = field(default_factory=list)

    async def run(self, channel: AsyncChannel) -> None:
        session = ProxySession()
        while True:
            message, fds = await channel.recv()
            for fd in fds:
                os.close(fd)
            session.receive(message)
            if isinstance(message, PolicyChunk):
                self.slices.append(message.text)
                if message.last:
                    text, self.slices = "".join(self.slices), []
                    self.versions[message.version] = PolicySet.from_json(json.loads(text))
                    self.arrived[message.version] = time.monotonic()
            await channel.send(Ack())

    @property
    def version(self) -> int:
        return max(self.versions, default=-1)

    async def wait_for(self, version: int, timeout: float = BUDGET) -> float:
        """Seconds until `version` arrived, from now."""
        started = time.monotonic()
        while version not in self.versions:
            if time.monotonic() - started > timeout:
                raise AssertionError(f"version {version} did not arrive; has {self.version}")
            await asyncio.sleep(0.005)
        return self.arrived[version] - started


@dataclass
class Node:
    store: PolicyStore
    proxy: FakeProxy
    hub: ProxyHub


@asynccontextmanager
async def node(
    directory: Path, state_dir: Path, config: PolicyConfig | None = None, **jwks_args: object
) -> AsyncIterator[Node]:
    """A policy store following `directory`, with one connected proxy, both running."""
    lock = asyncio.Lock()
    config = config or PolicyConfig(directory=str(directory))
    store: PolicyStore

    def snapshot() -> Snapshot:
        return Snapshot([], None, [], NO_DIRECTORY, store.chunks())

    hub = ProxyHub(snapshot, lock)
    store = PolicyStore(
        DirectorySource(directory),
        hub,
        lock,
        config,
        "cluster.local",
        state_dir,
        JwksKeys(config.jwks_refresh, **jwks_args),  # type: ignore[arg-type]
    )
    store.restore()
    store.source.start()
    await store.load()
    agent_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = AsyncChannel(proxy_end)
    await channel.send(Hello("0.1.0", 4242))
    proxy = FakeProxy()
    tasks = [
        asyncio.create_task(hub.connect(agent_end)),
        asyncio.create_task(proxy.run(channel)),
        asyncio.create_task(store.follow()),
        asyncio.create_task(store.jwks_forever(poll=0.05)),
    ]
    while not hub.links:
        await asyncio.sleep(0.005)
    try:
        yield Node(store, proxy, hub)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hub.close()
        channel.close()
        store.source.close()


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def methods(policy: PolicySet) -> dict[str, tuple[str, ...]]:
    return {p.name: p.rules[0].operations[0].methods for p in policy.authorization}


def run(scenario: Callable[[], object]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_a_file_change_reaches_the_proxy_within_a_second(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    write(directory / "a.yaml", allow("a", "GET"))

    async def scenario() -> None:
        async with node(directory, tmp_path) as n:
            assert n.proxy.version == 1  # the snapshot carried the version in force
            assert methods(n.proxy.versions[1]) == {"a": ("GET",)}
            started = time.monotonic()
            write(directory / "a.yaml", allow("a", "POST"))
            await n.proxy.wait_for(2)
            assert time.monotonic() - started < BUDGET
            assert methods(n.proxy.versions[2]) == {"a": ("POST",)}
            write(directory / "b.yaml", allow("b", "PUT"))
            await n.proxy.wait_for(3)
            assert methods(n.proxy.versions[3]) == {"a": ("POST",), "b": ("PUT",)}
            (directory / "a.yaml").unlink()
            (directory / "b.yaml").unlink()
            await n.proxy.wait_for(4)
            assert n.proxy.versions[4] == PolicySet()  # nothing left: no policy
            assert n.store.status({})["version"] == 4

    run(scenario)


def test_an_invalid_file_rejects_the_whole_change_and_the_last_good_stays(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    write(directory / "a.yaml", allow("a", "GET"))

    async def scenario() -> None:
        async with node(directory, tmp_path) as n:
            write(directory / "a.yaml", allow("a", "DELETE"))  # valid on its own...
            write(directory / "bad.yaml", CUSTOM)  # ...but the change holds an invalid one
            await asyncio.sleep(0.5)
            assert n.proxy.version == 1 and n.store.current.version == 1
            status = n.store.status({WEB.uid: WEB})
            [error] = status["rejected"]["errors"]
            assert error.startswith(f"{directory / 'bad.yaml'}: AuthorizationPolicy shop/custom: ")
            assert "CUSTOM" in error and status["version"] == 1
            assert status["workloads"] == {WEB.uid: ["AuthorizationPolicy shop/a"]}
            (directory / "bad.yaml").unlink()
            await n.proxy.wait_for(2)
            assert methods(n.proxy.versions[2]) == {"a": ("DELETE",)}
            assert n.store.status({})["rejected"] is None

    run(scenario)


def test_an_unchanged_reread_makes_no_version(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    write(directory / "a.yaml", allow("a", "GET"))

    async def scenario() -> None:
        async with node(directory, tmp_path) as n:
            write(directory / "a.yaml", allow("a", "GET"))  # the same documents again
            os.utime(directory / "a.yaml")
            await n.store.load()
            await asyncio.sleep(0.3)
            assert n.proxy.version == 1 and n.store.current.version == 1

    run(scenario)


def test_jwks_are_fetched_inlined_refreshed_and_kept(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    server = JwksServer()
    first = jwks(ec_key())
    server.serve("/jwks", first)
    uri = server.url("/jwks")
    write(directory / "ra.yaml", request_authentication(uri))
    config = PolicyConfig(directory=str(directory), jwks_refresh=0.3, jwks_timeout=2.0)

    def inlined(policy: PolicySet) -> str:
        [rule] = policy.authentication[0].jwt_rules
        assert rule.jwks_uri == uri
        return rule.jwks

    async def scenario() -> None:
        async with node(directory, tmp_path, config) as n:
            assert json.loads(inlined(n.proxy.versions[1])) == json.loads(first)
            rotated = jwks(ec_key(), ec_key())
            server.serve("/jwks", rotated)
            await n.proxy.wait_for(2, timeout=3.0)  # a refresh that changed the keys
            assert len(json.loads(inlined(n.proxy.versions[2]))["keys"]) == 2
            server.serve("/jwks", b"gone", status=500)
            await asyncio.sleep(0.8)  # refreshes fail: the last good keys stay
            assert n.proxy.version == 2
            status = n.store.status({})["jwks"][uri]
            assert "HTTP 500" in status["outcome"] and status["keys"] == 2

    try:
        run(scenario)
    finally:
        server.close()


def test_a_jwks_that_never_answers_is_pushed_without_keys(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    server = JwksServer()
    uri = server.url("/missing")
    write(directory / "ra.yaml", request_authentication(uri))

    async def scenario() -> None:
        async with node(directory, tmp_path) as n:
            [rule] = n.proxy.versions[1].authentication[0].jwt_rules
            assert (rule.jwks_uri, rule.jwks) == (uri, "")  # fail closed in the proxy
            assert n.store.status({})["jwks"][uri]["keys"] == 0

    try:
        run(scenario)
    finally:
        server.close()


def test_a_restarted_agent_keeps_the_last_good_policy(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    write(directory / "a.yaml", allow("a", "GET"))

    async def first_life() -> None:
        async with node(directory, tmp_path) as n:
            write(directory / "a.yaml", allow("a", "PUT"))
            await n.proxy.wait_for(2)

    async def second_life() -> None:
        async with node(directory, tmp_path) as n:
            # the directory holds an invalid change now: version 2 stays, from the saved file
            assert n.store.current.version == 2 and n.proxy.version == 2
            assert methods(n.proxy.versions[2]) == {"a": ("PUT",)}
            assert n.store.status({})["rejected"] is not None
            (directory / "bad.yaml").unlink()  # fixed: the same documents, no new version
            await asyncio.sleep(0.4)
            assert n.proxy.version == 2 and n.store.status({})["rejected"] is None
            write(directory / "a.yaml", allow("a", "POST"))
            await n.proxy.wait_for(3)  # versions keep growing across restarts

    run(first_life)
    assert oct((tmp_path / POLICY_STATE).stat().st_mode & 0o777) == "0o600"
    write(directory / "bad.yaml", CUSTOM)
    run(second_life)


def test_jwks_uris_and_inlining_are_pure() -> None:
    ra = RequestAuthentication(
        "jwt",
        "shop",
        jwt_rules=(
            JwtRule(issuer="a", jwks_uri="https://a/jwks"),
            JwtRule(issuer="b", jwks_uri="https://b/jwks", timeout=1.5),
            JwtRule(issuer="c", jwks_uri="https://c/jwks", jwks='{"keys": []}'),  # inline wins
            JwtRule(issuer="d", jwks='{"keys": []}'),  # inline only
        ),
    )
    policy = PolicySet(authentication=(ra,))
    assert jwks_uris(policy, 5.0) == {"https://a/jwks": 5.0, "https://b/jwks": 1.5}
    keys = {"https://a/jwks": '{"keys":[1]}', "https://b/jwks": ""}
    inlined = inline_jwks(policy, keys)
    assert [r.jwks for r in inlined.authentication[0].jwt_rules] == [
        '{"keys":[1]}',
        "",
        '{"keys": []}',
        '{"keys": []}',
    ]
    assert inline_jwks(policy, {}) == policy
    assert encode(PolicySet()) == '{"documents":[]}'
    assert policy_chunks(0, encode(PolicySet()))[0].text == '{"documents":[]}'


def test_restored_jwks_keep_refreshing_while_the_directory_is_rejected(tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    server = JwksServer()
    server.serve("/jwks", jwks(ec_key()))
    uri = server.url("/jwks")
    write(directory / "ra.yaml", request_authentication(uri))
    config = PolicyConfig(directory=str(directory), jwks_refresh=0.3, jwks_timeout=2.0)

    async def first_life() -> None:
        async with node(directory, tmp_path, config) as n:
            assert n.proxy.version == 1

    async def second_life() -> None:
        async with node(directory, tmp_path, config) as n:
            assert n.store.status({})["rejected"] is not None
            # the restored keys were refetched at once: the provider rotated meanwhile
            await n.proxy.wait_for(2, timeout=3.0)
            [rule] = n.proxy.versions[2].authentication[0].jwt_rules
            assert len(json.loads(rule.jwks)["keys"]) == 2

    try:
        run(first_life)
        write(directory / "bad.yaml", CUSTOM)
        server.serve("/jwks", jwks(ec_key(), ec_key()))
        run(second_life)
    finally:
        server.close()
