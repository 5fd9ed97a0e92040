"""What this machine computes fast, and so what each workload runs in when a script is given --dtype auto.

One rule for every script. Decoding (the inference engine) reads every weight once per token, so its speed is
the speed of reading weights; training and image encoding multiply large matrices, so theirs is matmul
throughput. Measured with scripts/benchmark.py (one section per machine kind in BENCHMARKS.md):

  machine (lscpu flags)             decoder weights when decoding     training / image encoder
  CUDA                              bf16                              bf16 autocast (fp16 without bf16)
  x86 CPU with AMX (amx_bf16)       int8 (weight-only)                bf16 autocast
  x86 CPU with AVX512-BF16, no AMX  int8 (weight-only)                bf16 autocast
  other CPUs (AVX2, ...)            int8 (weight-only)                fp32

Decoding on a CPU, 27M model, one stream (Intel Xeon with AMX, 2 cores, 128 tokens): the weight products of a
token take ~4.1 ms in fp32 and ~3 ms in bf16 (oneDNN's one-row bf16 kernel reads memory at half fp32's rate),
but ~1 ms with int8 weights (torch._weight_int8pack_mm; model/quant.py). The same held with oneDNN, MKL and
ATen capped at AVX512-BF16 and at AVX2 on that machine (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
ATEN_CPU_CAPABILITY), which stands in for the other kinds until they are measured there. int8 weights change
answers only within rounding: the demo's held-out accuracy is the same as with fp32 (BENCHMARKS.md). Pass
--dtype float32 (or bfloat16) to decode with unquantized weights.

Without AMX or AVX512-BF16, PyTorch emulates bf16 matmuls ~100x slower than fp32 (measured on an AVX2-only AMD
EPYC: 0.9 vs 112 GFLOP/s), so training and the image encoder stay fp32 there.
"""
from functools import lru_cache
from pathlib import Path

import torch

INFERENCE_DTYPES = ("float32", "bfloat16", "int8")


@lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{'model': CPU model name, 'flags': the lscpu flags this project's rule reads, 'kind': 'amx' |
    'avx512_bf16' | 'avx2' | 'other'} from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    kind = ("amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags
            else "avx2" if "avx2" in flags else "other")
    shown = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni"})
    return {"model": fields.get("model name", "unknown"), "flags": shown, "kind": kind}


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX or AVX512-BF16)."""
    return cpu_info()["kind"] in ("amx", "avx512_bf16")


def autocast_dtype(device_type: str, dtype: str):
    """Training and the image encoder: resolve a --dtype flag ('auto', 'bfloat16', 'float16', 'float32') to the
    autocast dtype, or None (fp32)."""
    if dtype == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if dtype in ("float32", "fp32"):
        return None
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype in ("float16", "fp16"):
        if device_type != "cuda":
            raise ValueError("--dtype float16 needs a CUDA device (it trains with a GradScaler); use bfloat16 or float32")
        return torch.float16
    raise ValueError(f"unknown dtype {dtype!r}")


def decoder_weights(device_type: str, dtype: str) -> str:
    """Decoding: the decoder's weight format for a --dtype flag, one of INFERENCE_DTYPES ('int8' = weight-only int8
    products, model/quant.py). 'auto' follows the table above; 'float16' keeps fp32 decoder weights (it only
    autocasts the image encoder)."""
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "int8"
    if dtype == "int8":
        if device_type != "cpu":
            raise ValueError("--dtype int8 (weight-only int8 products) is a CPU path; on CUDA use bfloat16")
        return "int8"
    autocast = autocast_dtype(device_type, dtype)
    return "bfloat16" if autocast == torch.bfloat16 else "float32"


def encoder_autocast(device_type: str, dtype: str):
    """The image encoder's dtype when decoding with --dtype `dtype` (int8 applies to the decoder only)."""
    return autocast_dtype(device_type, "auto" if dtype == "int8" else dtype)
