"""Offline API: `LLM(model=..., **engine_args).generate(prompts, sampling_params)`."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from engine.config import DEFAULT_MODEL, EngineArgs
from engine.core import EngineCore
from engine.outputs import RequestOutput
from engine.sampling_params import OutputKind, SamplingParams
from engine.setup import LoadedModel, build_parts


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, loaded: LoadedModel | None = None,
                 draft_loaded: LoadedModel | None = None, **engine_args):
        """`loaded` (from engine.setup.load_model) reuses weights already in memory, and
        `draft_loaded` the draft model's (speculative_method="draft")."""
        self.args = EngineArgs(model=model, **engine_args)
        self.core = EngineCore(build_parts(self.args, loaded=loaded, draft=draft_loaded))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.core.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or token-id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params_list):
                rid = f"offline-{next(self._ids)}"
                if p.output_kind is not OutputKind.FINAL:
                    p = dataclasses.replace(p, output_kind=OutputKind.FINAL)
                self.core.add_request(rid, prompt, p)
                ids.append(rid)
        except BaseException:  # all or none: a bad prompt leaves nothing queued
            for rid in ids:
                self.core.abort(rid)
            self.core.step()  # drains the abort outputs
            raise
        return self._run(ids)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        """Step until every request finished; a request that failed in the engine comes
        back with `error` set and finish_reason "error" (the others are unaffected)."""
        final: dict[str, RequestOutput] = {}
        while self.core.has_unfinished():
            outputs, _ = self.core.step()
            for out in outputs:
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
