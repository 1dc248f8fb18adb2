"""One JSON encoding for typed messages: dataclasses in, plain JSON values out, and back (pure).

`to_json` turns a dataclass (nested dataclasses, tuples, dicts, scalars) into JSON values;
`from_json` checks decoded JSON against a type annotation and builds the dataclass, so a field of
the wrong type, a missing field or an unknown one is a `WireError` naming the field path and the
value (`add.listeners[0].direction: 'sideways' is not one of [...]`), never a half-read dict.
A type with its own `to_json` / `from_json` (a directory update, say) encodes itself.

Supported annotations: str, int (not bool), float (ints accepted), bool, Literal[...],
`X | None`, tuple[X, ...], dict[str, X] and dataclasses of those.  Used by the agent <-> proxy
protocol (`agent.control.protocol`) and the supervisor <-> worker messages
(`agent.proxy.messages`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class WireError(ValueError):
    """Decoded JSON does not fit the message type; the text names the field and the value."""


_KINDS: dict[Any, str] = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
_HINTS: dict[type[Any], dict[str, Any]] = {}


def to_json(value: Any) -> Any:
    encode = getattr(value, "to_json", None)
    if encode is not None and not isinstance(value, type):
        return encode()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def from_json(tp: Any, raw: Any, where: str) -> Any:
    """Check `raw` against the annotation `tp` and build the value (see the module doc)."""
    parse = getattr(tp, "from_json", None)
    if parse is not None:
        try:
            return parse(raw)
        except ValueError as exc:
            raise WireError(f"{where}: {exc}") from None
    origin = get_origin(tp)
    if origin is Literal:
        if raw not in get_args(tp) or isinstance(raw, bool):
            raise WireError(f"{where}: {raw!r:.80} is not one of {list(get_args(tp))}")
        return raw
    if origin in (Union, types.UnionType):
        if raw is None and type(None) in get_args(tp):
            return None
        (kind,) = [arg for arg in get_args(tp) if arg is not type(None)]
        return from_json(kind, raw, where)
    if origin is tuple:
        if not isinstance(raw, list):
            raise WireError(f"{where}: expected a list, got {raw!r:.80}")
        item = get_args(tp)[0]
        return tuple(from_json(item, x, f"{where}[{i}]") for i, x in enumerate(raw))
    if origin is dict:
        if not isinstance(raw, dict):
            raise WireError(f"{where}: expected an object, got {raw!r:.80}")
        item = get_args(tp)[1]
        return {str(k): from_json(item, v, f"{where}.{k}") for k, v in raw.items()}
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, raw, where)
    if tp is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif isinstance(raw, tp):
        return raw
    raise WireError(f"{where}: {raw!r:.80} is not {_KINDS.get(tp, tp)}")


def _dataclass(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise WireError(f"{where}: expected an object, got {raw!r:.80}")
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = from_json(hints[f.name], raw[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise WireError(f"{where}: missing {f.name!r}")
    unknown = set(raw) - set(values)
    if unknown:
        raise WireError(f"{where}: unknown field(s) {sorted(unknown)}")
    return cls(**values)
