"""The policy set the agent pushes to the proxy (`agent.proxy.policy_state`): the JSON text of
a `PolicySet`, as the last slice of a PolicyChunk completes it.

Input: the text (the control protocol decodes it from JSON, so any string can come).
Contract: `PolicyState.receive` raises nothing but `PolicyRejected`, and a set it takes encodes
(`to_json`) to one that decodes equal.
"""

from __future__ import annotations

import json

import yaml

from agent.policy.compile import PolicySet
from agent.policy.documents import encode
from agent.proxy.policy_state import PolicyRejected, PolicyState
from fuzz.harness import main
from fuzz.targets.jwks import vector
from fuzz.targets.policy_documents import AUTHENTICATION, AUTHORIZATION, DENY, RATE_LIMIT


def check(data: bytes) -> None:
    state = PolicyState("ferry-system", "cluster.local")
    try:
        state.receive(1, True, data.decode("utf-8", "surrogatepass"))
    except UnicodeDecodeError:
        return
    except PolicyRejected:
        return
    assert PolicySet.from_json(state.policy.to_json()) == state.policy


def seeds() -> dict[str, bytes]:
    documents = [yaml.safe_load(text) for text in (AUTHORIZATION, DENY, RATE_LIMIT)]
    whole = json.dumps({"documents": documents}).encode()
    with_jwt = yaml.safe_load(AUTHENTICATION)
    with_jwt["spec"]["jwtRules"][0]["jwks"] = json.dumps(vector("rfc7515_a3_es256")["jwks"])
    del with_jwt["spec"]["jwtRules"][0]["jwksUri"]
    return {
        "three-kinds": whole,
        "empty": b'{"documents": []}',
        "authentication": json.dumps({"documents": [with_jwt]}).encode(),
        "canonical": json.dumps({"documents": [encode_first(whole)]}).encode(),
        "not-a-set": b"[]",
        "invalid-document": whole.replace(b"ALLOW", b"CUSTOM"),
    }


def encode_first(whole: bytes) -> object:
    """The first document of a set, in the canonical form the agent sends."""
    return encode(PolicySet.from_json(json.loads(whole)).documents[0])


if __name__ == "__main__":
    main(check)
