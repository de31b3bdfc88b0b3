"""StructuredOutputsParams: what a request constrains its output to (model-free checks).

Exactly one of `json` (a JSON Schema, dict or JSON text), `json_object` (any
JSON object), `regex`, `choice` (one of a list of strings) or `grammar` (a
Lark grammar, llguidance's dialect) is set. `whitespace_flexible` lets JSON
carry free whitespace between tokens; off by default because a small model
left free to emit whitespace often loops on it; for the same reason objects
that leave additional properties unspecified are closed unless
`allow_additional_properties`. `param` names the request
field the constraint came from (`response_format`, `structured_outputs`,
`tools`, ...) so compile errors point the client at it; it is not part of
the grammar's identity (`key`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.sampling_params import ParamError, check_text

MAX_SPEC_CHARS = 1 << 20  # 1 MiB of schema / grammar / regex text
MAX_CHOICES = 1024


KINDS = ("json", "regex", "choice", "grammar", "json_object")  # the `kind` metric label values


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_flexible: bool = False
    # False (default): objects that leave additional properties unspecified are closed
    # (engine/structured/schema_strict.py); outputs stay valid against the schema.
    allow_additional_properties: bool = False
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, tuple):
            if not isinstance(self.choice, list):
                raise ParamError("choice must be a list of strings", self.param)
            object.__setattr__(self, "choice", tuple(self.choice))
        self.validate()

    @property
    def kind(self) -> str:
        """json | json_object | regex | choice | grammar (metric label)."""
        for name in KINDS[:-1]:
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def validate(self) -> None:
        given = [n for n in KINDS[:-1] if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ParamError("exactly one of json, json_object, regex, choice or grammar must be "
                             f"given (got {given or 'none'})", self.param)
        if not all(isinstance(v, bool) for v in (self.whitespace_flexible, self.json_object,
                                                 self.allow_additional_properties)):
            raise ParamError("whitespace_flexible, allow_additional_properties and json_object "
                             "must be booleans", self.param)
        if self.json is not None:
            self._check_json()
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                self._check_string(value, name)
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise ParamError(f"choice must list 1 to {MAX_CHOICES} strings", self.param)
            for option in self.choice:
                self._check_string(option, "choice")
            if sum(len(c) for c in self.choice) > MAX_SPEC_CHARS:
                raise ParamError("choice is too large", self.param)

    def _check_string(self, value: object, name: str) -> None:
        if not isinstance(value, str) or (name != "choice" and not value):
            raise ParamError(f"{name} must be a non-empty string", self.param)
        if len(value) > MAX_SPEC_CHARS:
            raise ParamError(f"{name} is longer than {MAX_SPEC_CHARS} characters", self.param)
        check_text(value, self.param)

    def _check_json(self) -> None:
        schema = self.json
        if isinstance(schema, str):
            self._check_string(schema, "json")
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ParamError(f"the JSON schema is not valid JSON: {exc}", self.param) from None
        if not isinstance(schema, (dict, bool)):
            raise ParamError("the JSON schema must be an object", self.param)

    def schema_text(self) -> str | None:
        """The JSON schema as compact text (property order kept: it is the output order), or None."""
        if self.json is None:
            return None
        schema = json.loads(self.json) if isinstance(self.json, str) else self.json
        try:
            text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ParamError(f"the JSON schema cannot be serialised: {exc}", self.param) from None
        if len(text) > MAX_SPEC_CHARS:
            raise ParamError(f"the JSON schema is longer than {MAX_SPEC_CHARS} characters", self.param)
        return text

    def key(self) -> tuple:
        """The grammar's identity for the compile cache."""
        return (self.kind, self.schema_text(), self.regex, self.choice, self.grammar,
                self.whitespace_flexible, self.allow_additional_properties)
