"""Weight-only int8 for decoding on a CPU: each weight matrix of the decoder kept as int8 with one scale per
output row, multiplied by PyTorch's int8 weight-only kernel (torch._weight_int8pack_mm: bf16 inputs, fp32
accumulation, bf16 out).

Why: decoding one token multiplies one row by every weight matrix, so a token costs the time to read the weights.
int8 is a quarter of fp32's bytes (27M model: 27 MB instead of 108 MB a token), and the kernel computes each row
on its own, so a row's result never depends on how many rows share the call (model/batch_invariance.py checks).
The engine keeps such copies of a decoding step's matrices beside the model's own weights, which the prompt's
prefill (many rows at once) keeps using; model/hardware.py says when --dtype auto does this.

The arithmetic: w[n, k] ~= scale[n] * q[n, k] with scale[n] = max_k |w[n, k]| / 127 rounded to bf16 (the
kernel's scale dtype) and q = round(w / scale) in [-127, 127]: each weight is off by at most half a step, 1/254
of its row's largest weight. Everything that is not one of these products (embeddings, norms, RoPE, attention,
the KV cache) stays in the model's own dtype.
"""
import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """A bias-free linear map with int8 weights and per-row bf16 scales; input and output keep their dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        self.register_buffer("qweight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = w.shape

    def forward(self, x):
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                                      self.qweight, self.scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"
