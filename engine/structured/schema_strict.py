"""Close JSON-schema objects that leave additional properties unspecified.

JSON Schema allows any extra property unless told otherwise, and a small model
free to invent keys loops on them until max_tokens (measured on the
JSONSchemaBench dev schemas). Like XGrammar's default strict mode (vLLM's
default backend), an object subschema with `properties`, no
`additionalProperties` / `patternProperties` / `unevaluatedProperties`, all of
its `required` keys declared, and no `allOf` / `$ref` beside it (whose
properties would be shut out) gets `additionalProperties: false`. Every
output is still valid against the original schema; only the set of outputs
the grammar allows shrinks. `allow_additional_properties` turns this off.
"""
from __future__ import annotations

import copy
from typing import Any

_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "allOf")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "then", "else", "if", "not")
MAX_DEPTH = 64


def close_objects(schema: Any) -> Any:
    """A copy of `schema` with unspecified additional properties closed (see module doc)."""
    out = copy.deepcopy(schema)
    _walk(out, closable=True, depth=0)
    return out


def _closable_here(node: dict) -> bool:
    props = node.get("properties")
    if not isinstance(props, dict) or any(k in node for k in _OPEN_KEYS):
        return False
    if "allOf" in node or "$ref" in node or "if" in node or "dependentSchemas" in node:
        return False
    required = node.get("required", [])
    return isinstance(required, list) and all(k in props for k in required)


def _walk(node: Any, closable: bool, depth: int) -> None:
    if not isinstance(node, dict) or depth > MAX_DEPTH:
        return
    if closable and _closable_here(node):
        node["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for sub in value.values():
                _walk(sub, True, depth + 1)
    for key in _SCHEMA_LISTS:
        value = node.get(key)
        if isinstance(value, list):
            for sub in value:  # allOf members are combined: none may close itself
                _walk(sub, key != "allOf", depth + 1)
    for key in _SCHEMA_VALUES:
        _walk(node.get(key), key not in ("if", "not"), depth + 1)
