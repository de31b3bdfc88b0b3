"""Several offline engines stepped in token lockstep: relative throughput that a VM's drift cannot tilt.

The engines (one per configuration) run the same greedy requests in one process. The
next step always goes to the engine with the fewest committed output tokens (ties: the
one that stepped least), so every engine moves through the same workload at the same
time, and a slowdown of the machine (this VM's speed swung by up to 2x between minutes)
falls on all of them alike. Best-of-rounds over runs taken one after another could not
resolve 3% under that drift.

An engine's rate is its committed tokens over the wall time of its own steps; the
`decode` rate is the same over its steps without prefill tokens. Greedy outputs are
identical across configurations (speculation is lossless), so every engine ends at
the same token count and the lockstep holds to the end.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Lane:
    """One engine's run: its steps' time and tokens, and its requests' outputs."""
    label: str
    llm: Any
    ids: list[str]
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    finished: dict = field(default_factory=dict)  # request id -> token ids

    def step(self) -> None:
        t0 = time.perf_counter()
        outputs, stats = self.llm.core.step()
        dt = time.perf_counter() - t0
        self.steps += 1
        self.tokens += stats.num_generation_tokens
        self.seconds += dt
        if not stats.num_prompt_tokens:
            self.decode_tokens += stats.num_generation_tokens
            self.decode_seconds += dt
        for out in outputs:
            if out.finished:
                self.finished[out.request_id] = list(out.outputs[0].token_ids)

    @property
    def outputs(self) -> list[list[int]]:
        return [self.finished[i] for i in self.ids]

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def decode_rate(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else None


def run_lockstep(engines: dict[str, Any], prompts: list[str], params) -> list[Lane]:
    """Every engine (label -> `engine.LLM`) runs `prompts` with `params`, stepped in
    token lockstep; returns one Lane per engine, in the order given."""
    from engine.sampling_params import OutputKind

    params = dataclasses.replace(params, output_kind=OutputKind.FINAL)
    lanes = []
    for label, llm in engines.items():
        ids = [f"lockstep-{label}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            llm.core.add_request(rid, prompt, params)
        lanes.append(Lane(label, llm, ids))
    while True:
        active = [lane for lane in lanes if lane.llm.core.has_unfinished()]
        if not active:
            return lanes
        min(active, key=lambda lane: (lane.tokens, lane.steps)).step()
