"""Our AVX2 CPU extension (`kernels/cpu/*.cpp`) as torch custom ops, built at first use.

`available()` compiles the extension with torch's cpp_extension (ninja, cached in
`build_dir()`, so only the first process pays the ~1 min build) and loads it,
registering `torch.ops.strix_gguf.linear` / `.embedding` (GGUF blocks, here) and
`torch.ops.strix_cpu.*` (fused decoder ops, `kernels/decoder_cpu.py`).
It returns False, after one log line, when the CPU lacks AVX2/FMA/F16C, no
compiler is found or the build fails: callers then keep dequantized fp32
weights. Never built during `pip install` (its isolated build would pull
another torch).

Torch references (`dequantize`, `reference_linear`) use gguf-py's
dequantization: the kernels must match them up to fp32 summation order.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "cpu" / name for name in ("gguf_linear.cpp", "gguf_q8.cpp", "gguf_q8_tiles.cpp", "decoder_ops.cpp", "paged_attention.cpp")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
# ggml type id -> block (weights, bytes); the formats the kernels run natively.
BLOCKS = {2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 14: (256, 210)}  # Q4_0 Q4_1 Q8_0 Q4_K Q6_K
Q8_ACTIVATION_TYPES = (2, 3, 8)  # formats with integer kernels for q8 activations

_lock = threading.Lock()
_loaded: bool | None = None


def build_dir() -> Path:
    """Cache of the compiled extension per torch version and source: a checkout with other
    kernel sources builds beside it instead of relinking a library other processes map."""
    files = SOURCES + sorted(SOURCES[0].parent.glob("*.h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files) + " ".join(FLAGS).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "strix" / "kernels" / f"torch-{torch.__version__}-{digest}"


def cpu_supported() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def available() -> bool:
    """Build (once, cached) and load the extension; False when it cannot be used here."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load() -> bool:
    if not cpu_supported():
        log.info("native GGUF kernels off: this CPU has no AVX2 (capability %s); weights are dequantized",
                 torch.backends.cpu.get_cpu_capability())
        return False
    if shutil.which("c++") is None and shutil.which("g++") is None:
        log.warning("native GGUF kernels off: no C++ compiler found; weights are dequantized to fp32")
        return False
    try:
        from torch.utils.cpp_extension import load

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "build.flock", "w") as guard:
            # torch's build baton is a plain file (`lock`) that a build killed midway leaves
            # behind, and every later load waits on it forever (a bench killed while it
            # rebuilt hung the next one). Our flock dies with its holder: while we hold it no
            # process of ours is building, so a `lock` still there is stale.
            fcntl.flock(guard, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)
            load(name="strix_gguf", sources=[str(p) for p in SOURCES], extra_cflags=FLAGS,
                 extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as exc:  # a failed build must not stop the model from loading
        log.warning("native GGUF kernels off: build failed (%s); weights are dequantized to fp32", exc)
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 contiguous, weight [N, row_bytes] uint8 -> [M, N] fp32."""
    return torch.ops.strix_gguf.linear(x, weight, qtype, out_features)


def set_avx512(on: bool) -> bool:
    """Use the AVX-512 variants of the GEMV / small-M kernels where the CPU has them (the
    default) or force AVX2; returns whether AVX-512 is now on."""
    return torch.ops.strix_gguf.set_avx512(on)


def linear_q8(x: torch.Tensor, weight: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    """x [1, K] fp32 quantized per 32-block to int8, integer dots -> [1, N] (not exact: q8 mode)."""
    return torch.ops.strix_gguf.linear_q8(x, weight, qtype, out_features)


def pack_q8_tiles(weight: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """weight [N, row_bytes] -> the 16-row interleaved layout of `linear_q8_tiles`
    (kernels/cpu/gguf_q8_tiles.cpp); a copy: the original blocks stay for other calls."""
    return torch.ops.strix_gguf.pack_q8_tiles(weight, qtype, in_features)


def linear_q8_tiles(x: torch.Tensor, packed: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    """x [M, K] fp32 quantized per 32-block to int8, against packed weights -> [M, N] (q8 mode)."""
    return torch.ops.strix_gguf.linear_q8_tiles(x, packed, qtype, out_features)


def q8_tiles_fast() -> bool:
    """Whether `linear_q8_tiles` runs on AVX-512 VNNI here (else its portable scalar code)."""
    return torch.ops.strix_gguf.q8_tiles_fast()


def quantize_q8_reference(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> the q8 activations the kernel multiplies, dequantized: d * round(x * 127 / max|x|)
    per block of 32 (fp32 scale, ties to even), as fp32 [M, K]."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127.0)).reshape(x.shape)


def reference_linear_q8(x: torch.Tensor, weight: torch.Tensor, qtype: int, dim: int) -> torch.Tensor:
    """The q8 kernel's math in float64: quantized activations times the dequantized weights."""
    return (quantize_q8_reference(x).double() @ dequantize(weight, qtype, dim).double().T).float()


def embedding(ids: torch.Tensor, weight: torch.Tensor, qtype: int, dim: int) -> torch.Tensor:
    """ids (int64, any shape) -> [ids.numel(), dim] fp32 rows of the quantized table."""
    return torch.ops.strix_gguf.embedding(ids, weight, qtype, dim)


def dequantize(weight: torch.Tensor, qtype: int, dim: int) -> torch.Tensor:
    """gguf-py's dequantization of weight [N, row_bytes] -> fp32 [N, dim] (the reference)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    data = gguf_dequantize(weight.numpy(), GGMLQuantizationType(qtype))
    return torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(weight.shape[0], dim).copy())


def reference_linear(x: torch.Tensor, weight: torch.Tensor, qtype: int, dim: int) -> torch.Tensor:
    return x @ dequantize(weight, qtype, dim).T
