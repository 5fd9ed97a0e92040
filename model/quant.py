"""Weight-only int8 for decoding on a CPU: each weight matrix of the decoder kept as int8 with one scale per
output row, multiplied by PyTorch's int8 weight-only kernel (torch._weight_int8pack_mm: bf16 inputs, fp32
accumulation, bf16 out).

Why: decoding one token multiplies one row by every weight matrix, so a token costs the time to read the weights.
int8 is a quarter of fp32's bytes (27M model: 27 MB instead of 108 MB a token), and the kernel computes each row
on its own, so a row's result never depends on how many rows share the call (model/batch_invariance.py checks).
See model/hardware.py for when --dtype auto uses it.

The arithmetic: w[n, k] ~= scale[n] * q[n, k] with scale[n] = max_k |w[n, k]| / 127 rounded to bf16 (the
kernel's scale dtype) and q = round(w / scale) in [-127, 127]: each weight is off by at most half a step, 1/254
of its row's largest weight. Everything that is not one of these products (embeddings, norms, RoPE, attention,
the KV cache, the projector) stays in the model's own dtype.
"""
import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 with per-row bf16 scales; input and output keep their dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias=None):
        super().__init__()
        self.register_buffer("qweight", qweight)  # (out_features, in_features) int8
        self.register_buffer("scale", scale)  # (out_features,) bf16
        self.register_buffer("bias", bias)  # (out_features,) or None
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def stacked(cls, layers) -> "Int8Linear":
        """One Int8Linear computing several (same in_features) at once, their outputs side by side."""
        assert all(l.bias is None for l in layers)
        return cls(torch.cat([l.qweight for l in layers]), torch.cat([l.scale for l in layers]))

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight these products multiply by."""
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x):
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                                      self.qweight, self.scale)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(model) -> int:
    """Replace every nn.Linear of the model (attention, feed-forward and experts in every block, the projector and
    the output head) by Int8Linear, in place; the token embedding keeps the head's float matrix. Returns how
    many. (The MoE router is a plain matrix, kept.)"""
    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]
    for parent, name, child in todo:
        setattr(parent, name, Int8Linear.from_linear(child))
    return len(todo)
