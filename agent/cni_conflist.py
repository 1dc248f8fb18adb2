"""Chaining `ferry-cni` into the node's CNI configuration: the decisions, over file contents (pure).

A node's primary CNI (flannel, calico, cilium, bridge, ...) writes its network configuration
into the CNI conf dir; the runtime uses the lexically first valid `*.conf` / `*.conflist` file
there (kubelet's and libcni's rule, which Istio's install-cni follows too).  Ferry appends its
plugin to that network's plugin list, so the runtime runs `ferry-cni` after the primary plugin
for every pod, with the primary's result as `prevResult`.

- `primary(files)` picks that file from `{name: content}`: the first name, in byte order, ending
  in `.conf` or `.conflist` whose content is a usable network (a `.conflist` with a non-empty
  `plugins` list, a `.conf` with a `type`); unreadable files are passed over, as libcni does.
- `with_plugin(name, content, entry)` is the file after installing: a `.conflist` keeps every
  key and plugin it had, with Ferry's entry replaced where it was (an upgrade reinstalls in
  place) or appended last; a single-plugin `.conf` becomes `<name>.conflist` holding
  `{cniVersion, name, plugins: [the old config, Ferry's entry]}` (the old file is then removed).
  It returns None when the file already holds exactly that entry once, so installing twice, or
  a watcher seeing its own write, changes nothing.
- `without_plugin(content)` is a conflist with Ferry's entries removed (None: it had none); the
  rest of the file, a converted one included, stays as it is.

Ferry's entry (`plugin_entry`) is `{"type": "ferry-cni", "state_dir": ..., "exclude_namespaces":
[...]}` plus the optional settings of `agent.cni_protocol.PluginSettings`.  Files are rendered
as JSON with two-space indentation; keys keep their order.  Errors are `ConflistError` naming
the file and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from agent.cni_protocol import DEFAULT_EXCLUDED, DEFAULT_STATE_DIR

PLUGIN_TYPE = "ferry-cni"
SUFFIXES = (".conf", ".conflist")


class ConflistError(ValueError):
    """A CNI configuration file cannot be used; the message names the file and why."""


def plugin_entry(
    state_dir: str = DEFAULT_STATE_DIR,
    exclude_namespaces: Sequence[str] = DEFAULT_EXCLUDED,
    **settings: Any,
) -> dict[str, Any]:
    """Ferry's entry in a plugin list (`settings`: more `PluginSettings` keys)."""
    return {
        "type": PLUGIN_TYPE,
        "state_dir": state_dir,
        "exclude_namespaces": list(exclude_namespaces),
        **settings,
    }


def _load(name: str, content: bytes) -> dict[str, Any]:
    try:
        document = json.loads(content)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ConflistError(f"{name}: not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ConflistError(f"{name}: not a JSON object")
    return document


def _plugins(name: str, document: Mapping[str, Any]) -> list[Any]:
    plugins = document.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ConflistError(f"{name}: a .conflist needs a non-empty 'plugins' list")
    return plugins


def _usable(name: str, content: bytes) -> bool:
    try:
        document = _load(name, content)
        if name.endswith(".conflist"):
            _plugins(name, document)
            return True
    except ConflistError:
        return False
    return isinstance(document.get("type"), str) and bool(document["type"])


def primary(files: Mapping[str, bytes]) -> str | None:
    """The file the runtime uses: the first usable `.conf`/`.conflist` by name (None: none)."""
    for name in sorted(files, key=lambda n: n.encode()):
        if name.endswith(SUFFIXES) and _usable(name, files[name]):
            return name
    return None


def render(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode() + b"\n"


def is_ferry(plugin: object) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def with_plugin(name: str, content: bytes, entry: Mapping[str, Any]) -> tuple[str, bytes] | None:
    """The (file name, content) that chains `entry` into file `name`; None: already there."""
    document = _load(name, content)
    if name.endswith(".conf"):
        if not isinstance(document.get("type"), str):
            raise ConflistError(f"{name}: a .conf needs a 'type' (is it a conflist?)")
        if is_ferry(document):
            raise ConflistError(f"{name}: is {PLUGIN_TYPE} alone, not a network to chain it into")
        single = {k: v for k, v in document.items() if k != "cniVersion"}
        converted: dict[str, Any] = {
            "cniVersion": document.get("cniVersion", "0.3.1"),
            "name": document.get("name", name.removesuffix(".conf")),
            "plugins": [single, dict(entry)],
        }
        return name + "list", render(converted)
    plugins = _plugins(name, document)
    ours = [i for i, plugin in enumerate(plugins) if is_ferry(plugin)]
    if len(ours) == 1 and plugins[ours[0]] == dict(entry):
        return None
    kept = [p for p in plugins if not is_ferry(p)]
    position = ours[0] if ours else len(kept)
    kept.insert(position, dict(entry))
    return name, render({**document, "plugins": kept})


def without_plugin(name: str, content: bytes) -> bytes | None:
    """The conflist `name` with Ferry's entries removed; None when it has none (or is not one)."""
    try:
        document = _load(name, content)
    except ConflistError:
        return None
    plugins = document.get("plugins")
    if not isinstance(plugins, list) or not any(is_ferry(p) for p in plugins):
        return None
    return render({**document, "plugins": [p for p in plugins if not is_ferry(p)]})
