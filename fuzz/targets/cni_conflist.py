"""Chaining `ferry-cni` into the primary CNI's configuration file (`agent.cni_conflist`).

Input: an options byte (bit 0: the file is a `.conf`, else a `.conflist`), then the file as
the primary CNI wrote it.  Contract: `with_plugin` and `without_plugin` raise nothing but
`ConflistError`; the installed file is a `.conflist` that holds Ferry's entry, installing
again changes nothing, and uninstalling leaves no Ferry entry.
"""

from __future__ import annotations

import json

from agent.cni_conflist import (
    ConflistError,
    is_ferry,
    plugin_entry,
    primary,
    with_plugin,
    without_plugin,
)
from fuzz.harness import main
from fuzz.inputs import options

ENTRY = plugin_entry("/run/ferry", ["kube-system"])


def check(data: bytes) -> None:
    flags, content = options(data)
    name = "10-net.conf" if flags & 1 else "10-net.conflist"
    primary({name: content, "99-other.conf": b"{}"})
    without_plugin(name, content)
    try:
        installed = with_plugin(name, content, ENTRY)
    except ConflistError:
        return
    if installed is None:  # already chained: a conflist holding exactly Ferry's entry once
        return
    new_name, new_content = installed
    assert new_name.endswith(".conflist"), new_name
    plugins = json.loads(new_content)["plugins"]
    assert ENTRY in plugins, plugins
    assert with_plugin(new_name, new_content, ENTRY) is None, new_content
    removed = without_plugin(new_name, new_content)
    assert removed is not None
    assert not any(is_ferry(p) for p in json.loads(removed)["plugins"]), removed


def seeds() -> dict[str, bytes]:
    bridge = {"cniVersion": "1.0.0", "name": "net", "type": "bridge", "bridge": "cni0"}
    conflist = {"cniVersion": "1.0.0", "name": "net", "plugins": [bridge, {"type": "portmap"}]}
    chained = conflist | {"plugins": [bridge, ENTRY]}
    return {
        "conf": b"\x01" + json.dumps(bridge).encode(),
        "conflist": b"\x00" + json.dumps(conflist).encode(),
        "chained": b"\x00" + json.dumps(chained).encode(),
        "chained-twice": b"\x00"
        + json.dumps(chained | {"plugins": [ENTRY, bridge, ENTRY]}).encode(),
        "empty-plugins": b"\x00" + b'{"plugins": []}',
        "conf-without-type": b"\x01" + b'{"name": "net"}',
        "not-json": b"\x00" + b'{"plugins": [',
    }


if __name__ == "__main__":
    main(check)
