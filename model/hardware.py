"""What this machine computes fast, and so what each workload runs in when a script is given --dtype auto.

One rule for every script. Decoding (the inference engine) reads every weight once per token, so its speed is
the speed of reading weights; training and image encoding multiply large matrices, so theirs is matmul
throughput. Measured with benchmarks/benchmark.py (one section per machine kind in BENCHMARKS.md):

  machine (lscpu flags)             decoding step's products   prefill, image encoder, training
  CUDA                              bf16                       bf16 (fp16 autocast without bf16)
  x86 CPU with AMX (amx_bf16)       int8 (weight-only)         bf16
  x86 CPU with AVX512-BF16, no AMX  int8 (weight-only)         bf16
  other CPUs (AVX2, ...)            int8 (weight-only)         fp32

Decoding on a CPU, 27M model, one stream (Intel Xeon with AMX, 2 cores, 128 tokens): the weight products of a
token take ~4.1 ms in fp32 and ~3 ms in bf16 (oneDNN's one-row bf16 kernel reads memory at half fp32's rate),
but ~1 ms with int8 weights (torch._weight_int8pack_mm; model/quant.py). The same held with oneDNN, MKL and
ATen capped at AVX512-BF16 and at AVX2 on that machine (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
ATEN_CPU_CAPABILITY), which stands in for the other kinds until they are measured there. int8 weights change
answers only within rounding: the demo's held-out accuracy is the same as with fp32 (BENCHMARKS.md). Pass
--dtype float32 (or bfloat16) to decode with unquantized weights. (Batches of many requests favour bf16 on
AMX: its one-row kernel is slow, but 8 rows cost about what one does, where int8's cost grows with the rows;
BENCHMARKS.md has both.)

Without AMX or AVX512-BF16, PyTorch emulates bf16 matmuls ~100x slower than fp32 (measured on an AVX2-only AMD
EPYC: 0.9 vs 112 GFLOP/s), so training and the image encoder stay fp32 there.
"""
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

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


@dataclass
class InferencePlan:
    """What an inference --dtype means on this machine: the decoder's own weights (the prompt's prefill and the
    image projection run in this dtype), whether each decoding step's weight products use int8 copies of them
    (model/quant.py), and the image encoder's autocast dtype (None: fp32)."""
    dense: torch.dtype
    int8_decoding: bool
    encoder: Optional[torch.dtype]

    def describe(self) -> str:
        dense = str(self.dense).replace("torch.", "")
        return f"int8 decoding, {dense} prefill" if self.int8_decoding else dense


def inference_plan(device_type: str, dtype: str) -> InferencePlan:
    """The table in the module docstring, for ChatEngine.load's --dtype: 'auto', 'int8' (CPU), 'bfloat16',
    'float32' or 'float16' (autocasts the image encoder only; CUDA). Prefill multiplies many rows at once, so
    it runs on the dense weights (bf16 where the CPU has native bf16: 14 ms for a 70-token prompt of the 27M
    model on the AMX Xeon, against 36 ms through the int8 kernel, which computes row by row)."""
    if dtype in ("auto", "int8") and device_type == "cpu":
        native = cpu_has_fast_bf16()
        return InferencePlan(torch.bfloat16 if native else torch.float32, True, torch.bfloat16 if native else None)
    if dtype == "int8":
        raise ValueError("--dtype int8 (int8 decoding products) is a CPU path; on CUDA use bfloat16")
    encoder = autocast_dtype(device_type, dtype)
    return InferencePlan(torch.bfloat16 if encoder == torch.bfloat16 else torch.float32, False, encoder)


def _mallopt(**settings) -> bool:
    """glibc's mallopt for each setting (trim_threshold, mmap_threshold, in bytes); False where there is no glibc."""
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    codes = {"trim_threshold": -1, "mmap_threshold": -3}  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    return all(bool(mallopt(codes[name], int(value))) for name, value in settings.items())


def return_freed_memory() -> bool:
    """Make glibc's malloc give large freed blocks back to the kernel, for a server that runs for hours. A
    server allocates blocks of every size that live as long as their answer (KV caches: one per answer, its
    prompt plus max_tokens long) between short-lived ones (a step's activations); by default glibc raises its
    mmap threshold to the largest block freed so far (up to 32 MB), after which such blocks come from the heap and
    fragment it: in a 10-minute soak of the 27M model (scripts/soak_api.py, context 2048) the API's resident
    memory grew by 1.5 MB a second without a plateau (937 -> 1575 MB after warm-up), with no Python object
    left behind. A fixed threshold of 1 MB maps every larger block on its own and unmaps it on free: resident
    memory then stayed within 620-740 MB under the same load, and one stream decoded within noise of the
    default (1% slower; 4.5% with 128 KB). Linux glibc only (elsewhere nothing happens); returns whether it
    applied."""
    return _mallopt(mmap_threshold=1 << 20)


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees for the next step, instead of returning each
    large block to the kernel and faulting fresh pages in again. A step allocates and frees its activations and
    gradients (blocks of 1-30 MB); by default glibc maps blocks above a threshold with mmap and unmaps them on
    free, and trims its heap's top, so every step touches hundreds of thousands of new pages: on the 2-core AMX
    Xeon a 27M step took 476 ms with ~900K page faults a run and 425 ms with ~325K once blocks up to 32 MB come
    from the heap and the heap is not trimmed below 1 GB. The cost: resident memory stays at the step's peak.
    Linux glibc only (elsewhere nothing happens); returns whether it applied."""
    return _mallopt(mmap_threshold=32 << 20, trim_threshold=1 << 30)
