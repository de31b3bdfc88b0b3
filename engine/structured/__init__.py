"""Structured outputs: grammar specs, the backend ABC + registry (llguidance), the
compile cache, and bitmask fill/apply for the sampler."""
from engine.structured.backend import (CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher,
                                       create_backend, register_backend)
from engine.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams", "GrammarBackend", "GrammarMatcher", "CompiledGrammar",
           "GrammarError", "create_backend", "register_backend"]
