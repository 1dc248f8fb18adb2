"""The agent's configuration file (`agent.config.load_config`).

Input: the file.  Contract: `load_config` raises nothing but `ConfigError` (naming the file and
the key), whatever the file holds.
"""

from __future__ import annotations

import contextlib

import agent.config
from agent.config import ConfigError, load_config
from fuzz.harness import main
from fuzz.inputs import scratch_file

FILE = scratch_file("agent.yaml")


def check(data: bytes) -> None:
    FILE.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(FILE)


def seeds() -> dict[str, bytes]:
    documented = (agent.config.__doc__ or "").split("```yaml\n")[1].split("```")[0]
    return {
        "documented": documented.encode(),
        "empty": b"",
        "node-only": b"node_name: node-a\n",
        "wrong-type": b"proxy: [1, 2]\n",
        "bad-port": b"redirection: {outbound_port: 70000}\n",
        "bad-cidr": b"redirection: {exclude_outbound_cidrs: [10.0.0.0/33]}\n",
        "not-utf8": b"node_name: \xff\n",
    }


if __name__ == "__main__":
    main(check)
