"""Request fields that constrain the output -> `StructuredOutputsParams`; tool calls.

Sources (at most one per request; two is a 400): chat `tools` with
`tool_choice` "required" or a named function; `response_format`
(`json_object`, `json_schema`); vLLM's `structured_outputs`; and its older
aliases `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`.
`tool_choice` "none" ignores the tools; "auto" (the default with tools) stays
plain text: the default model has no tool-call format to detect.

Forced tool calls: a named function constrains the output to that function's
parameters schema (the text is the call's `arguments`); "required" constrains
it to a JSON array of `{"name": ..., "arguments": {...}}` over the tools
(`parallel_tool_calls: false` caps it at one call).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import ParamError
from engine.structured.params import StructuredOutputsParams
from server.errors import bad_request
from server.protocol import (ChatCompletionRequest, FunctionCall, NamedToolChoice, SamplingRequest,
                             ToolCall)

ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolMode:
    """How the output of a forced tool call is read back."""
    named: str | None  # the function's name (output = its arguments), or None: "required" array

    def parse(self, text: str) -> list[ToolCall] | None:
        """The tool calls in a finished output, or None when the text is not one."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.named is not None:
            return [_call(self.named, value)]
        if not isinstance(value, list):
            return None
        try:
            return [_call(item["name"], item["arguments"]) for item in value]
        except (KeyError, TypeError):
            return None


def _call(name: str, arguments: Any) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                    function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)))


def _spec(param: str, flexible: bool = False, open_objects: bool = False, **kind: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(param=param, whitespace_flexible=flexible,
                                       allow_additional_properties=open_objects, **kind)
    except ParamError as exc:
        raise bad_request(str(exc), exc.param or param) from None


def _from_response_format(req: SamplingRequest) -> StructuredOutputsParams | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _spec("response_format", json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
    return _spec("response_format", json=fmt.json_schema.schema_)


def _from_structured_outputs(req: SamplingRequest) -> StructuredOutputsParams | None:
    so = req.structured_outputs
    if so is None:
        return None
    kind = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                              ("grammar", so.grammar)) if v is not None}
    if so.json_object:
        kind["json_object"] = True
    return _spec("structured_outputs", bool(so.whitespace_flexible), bool(so.allow_additional_properties),
                 **kind)


def _from_guided(req: SamplingRequest) -> list[StructuredOutputsParams]:
    out = []
    for field, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                        ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, field)
        if value is not None:
            out.append(_spec(field, **{kind: value}))
    return out


def _from_tools(req: ChatCompletionRequest) -> tuple[StructuredOutputsParams | None, ToolMode | None]:
    choice = req.tool_choice
    if not req.tools or choice in (None, "none", "auto"):
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise bad_request("tool_choice names a tool but no tools were given", "tool_choice")
        return None, None
    tools = {t.function.name: t.function for t in req.tools}
    if isinstance(choice, NamedToolChoice):
        fn = tools.get(choice.function.name)
        if fn is None:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools",
                              "tool_choice")
        return _spec("tools", json=fn.parameters or ANY_OBJECT), ToolMode(fn.name)
    calls = [{"type": "object", "properties": {"name": {"const": name},
                                               "arguments": fn.parameters or ANY_OBJECT},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, fn in tools.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return _spec("tools", json=schema), ToolMode(None)


def structured_outputs_of(req: SamplingRequest) -> tuple[StructuredOutputsParams | None, ToolMode | None]:
    """The request's one output constraint (and, for forced tool calls, how to read it)."""
    found: list[StructuredOutputsParams] = []
    mode = None
    if isinstance(req, ChatCompletionRequest):
        spec, mode = _from_tools(req)
        found += [spec] if spec is not None else []
    for spec in (_from_response_format(req), _from_structured_outputs(req), *_from_guided(req)):
        if spec is not None:
            found.append(spec)
    if len(found) > 1:
        raise bad_request("give at most one of tools (with tool_choice required or named), "
                          "response_format, structured_outputs and guided_*: got "
                          + ", ".join(s.param for s in found), found[1].param)
    return (found[0] if found else None), mode
