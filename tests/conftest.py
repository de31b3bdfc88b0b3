"""Shared fixtures: the embedded SmolLM2 model (ours and HF's), loaded once per session."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineArgs


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_loaded():
    from engine.setup import load_model
    return load_model(EngineArgs())


@pytest.fixture(scope="session")
def smol_gguf():
    from engine.models.loader import resolve_model
    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="session")
def hf_smol(smol_gguf):
    """HF transformers' own GGUF load of the same file: an independent oracle for
    our dequantization, q/k un-permutation and model code."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture
def make_llm(smol_loaded):
    """LLM on the shared SmolLM2 weights with the given engine args."""
    from engine.llm import LLM

    def make(**kwargs):
        return LLM(loaded=smol_loaded, **kwargs)
    return make
