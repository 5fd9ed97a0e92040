"""What this machine computes fast: which dtype each workload runs in (--dtype auto)."""
from pathlib import Path

import torch


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX or AVX512-BF16). Without them PyTorch emulates
    bf16 and a bf16 matmul runs ~100x slower than fp32 (measured on an AVX2-only AMD EPYC: 0.9 vs 112 GFLOP/s)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device_type: str, dtype: str):
    """Resolve a --dtype flag ('auto', 'bfloat16', 'float16', 'float32') to the autocast dtype, or None."""
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
