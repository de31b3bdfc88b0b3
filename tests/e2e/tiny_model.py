"""A tiny random-initialised Llama model directory for fast real-server tests.

    from tests.e2e.tiny_model import build_tiny_model
    model_dir = build_tiny_model(Path("/tmp/strix-tiny-llama"))   # once; later calls reuse it
    ServerProcess(["--max-model-len", "128"], model=str(model_dir)).start()

or from a shell (prints the directory):

    python -m tests.e2e.tiny_model /tmp/strix-tiny-llama

The directory is a plain Hugging Face checkpoint (`--model <dir>`): a
transformers `LlamaConfig` (hidden 64, 2 layers, 4 heads / 2 KV heads,
intermediate 128, max_position_embeddings 512, tied embeddings), weights from
a fixed torch seed saved as safetensors, and the real SmolLM2 tokenizer (with
its chat template) taken from the embedded GGUF model, so the vocabulary,
special tokens and chat rendering are exactly the default model's. Nothing is
downloaded. The weights are random, so the text is gibberish; the point is a
model whose forward pass costs almost nothing, so API-level tests (fuzzing,
soak) measure the server rather than the matmuls.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 1234
SPEC = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
STAMP = ".strix-tiny-model.json"  # written last: its presence means the directory is complete


def _stamp(vocab_size: int, spec: dict) -> dict:
    return {"spec": spec, "seed": SEED, "vocab_size": vocab_size, "source": "smollm2-135m"}


def is_built(directory: Path, spec: dict | None = None) -> bool:
    stamp = directory / STAMP
    if not stamp.exists():
        return False
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return data.get("spec") == (spec or SPEC) and data.get("seed") == SEED


def build_tiny_model(directory: str | os.PathLike[str], **overrides) -> Path:
    """Build the tiny model into `directory` unless it is already there; return it.

    Built in a sibling temporary directory and renamed into place, so a
    half-written directory is never mistaken for a model (and two concurrent
    builders do not mix their files)."""
    directory = Path(directory).expanduser().resolve()
    spec = {**SPEC, **overrides}  # LlamaConfig fields, e.g. num_hidden_layers
    if is_built(directory, spec):
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models.loader import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the SmolLM2 tokenizer has no chat template")
    vocab_size = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **spec)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    staging.chmod(0o755)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = LlamaForCausalLM(config).eval()
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if not (staging / "config.json").exists() or not list(staging.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no config/safetensors into {staging}")
        (staging / STAMP).write_text(json.dumps(_stamp(vocab_size, spec), indent=2))
        if directory.exists():
            if is_built(directory, spec):  # another builder won the race
                shutil.rmtree(staging, ignore_errors=True)
                return directory
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tests.e2e.tiny_model DIR", file=sys.stderr)
        return 2
    print(build_tiny_model(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
