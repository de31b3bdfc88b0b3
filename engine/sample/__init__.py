"""Vectorized batch sampling: penalties, greedy/temperature/top-k/top-p/min-p,
seeded noise keyed by (seed, position) and raw logprobs. See sampler.py for the order."""
from engine.sample.metadata import (
    GREEDY_EPS,
    SamplingMetadata,
    SamplingRow,
    build_sampling_metadata,
)
from engine.sample.sampler import Sampler, SamplerOutput, apply_penalties, position_seed

__all__ = [
    "GREEDY_EPS",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
    "apply_penalties",
    "build_sampling_metadata",
    "position_seed",
]
