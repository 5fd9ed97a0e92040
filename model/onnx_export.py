"""MiniMind-V as ONNX graphs, for runtimes without PyTorch (`export_model.py --onnx`; scripts/onnx_chat.py runs
them with onnxruntime, numpy, pillow and the tokenizers library only). Written into `{export}/onnx/`:

  vision.onnx       pixel_values (N, 3, 224, 224) -> image_embeds (N, 50, dim): the CLIP tower and the projector
  decoder.onnx      inputs_embeds (B, T, dim), past_keys / past_values (n_layers, B, P, n_kv_heads, head_dim)
                    -> logits (B, T, vocab), present_keys / present_values (n_layers, B, P + T, ...): the prompt
                    with an empty past (P = 0), then one token at a time with the returned present
  embeddings.npy    the token embedding matrix (the output head's, tied), to build inputs_embeds: a prompt's
                    token rows, with image_embeds written over each 50-token placeholder
  onnx_config.json  sizes, placeholder ids and the end-of-answer id

The decoder graph is MiniMindVLM's own blocks traced with a cache that takes the past as tensors and hands the
present back (PastCache), so the arithmetic is model.py's.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ONNX_OPSET = 18


class PastCache:
    """model.py's KVCache interface over explicit tensors: each layer's past (B, P, n_kv_heads, head_dim) is
    extended by this step's keys/values, and the extended ones are kept to be returned as the present."""

    def __init__(self, past_keys, past_values):
        self.past_keys, self.past_values = past_keys, past_values
        self.keys, self.values = [], []

    def update(self, layer, k, v):
        k = torch.cat([self.past_keys[layer], k], dim=1)
        v = torch.cat([self.past_values[layer], v], dim=1)
        self.keys.append(k)
        self.values.append(v)
        return k, v


class DecoderWithPast(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, past_keys, past_values):
        m = self.model
        T, P = inputs_embeds.shape[1], past_keys.shape[2]
        rope = m.rope(slice(P, P + T))
        # query t (position P + t) sees every key up to its own position
        mask = torch.arange(P + T, device=inputs_embeds.device)[None, :] <= (
            torch.arange(T, device=inputs_embeds.device)[:, None] + P)
        cache = PastCache(past_keys, past_values)
        h = inputs_embeds
        for layer in m.layers:
            h = layer(h, rope, mask, cache)
        return m.output(m.norm(h)), torch.stack(cache.keys), torch.stack(cache.values)


class VisionWithProjector(nn.Module):
    def __init__(self, tower, model):
        super().__init__()
        self.tower, self.vision_proj = tower, model.vision_proj

    def forward(self, pixel_values):
        return self.vision_proj(self.tower(pixel_values))


@torch.no_grad()
def export_onnx(model, tower, tokenizer, out_dir) -> Path:
    """Write the graphs, the embedding matrix and their config into out_dir (fp32, CPU)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tower = model.float().cpu().eval(), tower.float().cpu().eval()
    cfg = model.params
    L, kv, hd = cfg.n_layers, cfg.n_kv_heads, cfg.dim // cfg.n_heads
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
    past = torch.export.Dim("past", min=0, max=cfg.max_seq_len)
    example = (torch.randn(1, 5, cfg.dim), torch.randn(L, 1, 3, kv, hd), torch.randn(L, 1, 3, kv, hd))
    torch.onnx.export(DecoderWithPast(model).eval(), example, str(out / "decoder.onnx"), dynamo=True,
                      input_names=["inputs_embeds", "past_keys", "past_values"],
                      output_names=["logits", "present_keys", "present_values"],
                      dynamic_shapes=({0: batch, 1: seq}, {1: batch, 2: past}, {1: batch, 2: past}),
                      opset_version=ONNX_OPSET, external_data=False)
    images = torch.export.Dim("images", min=1, max=64)
    torch.onnx.export(VisionWithProjector(tower, model).eval(), (torch.randn(2, 3, 224, 224),),
                      str(out / "vision.onnx"), dynamo=True, input_names=["pixel_values"],
                      output_names=["image_embeds"], dynamic_shapes=({0: images},), opset_version=ONNX_OPSET,
                      external_data=False)
    np.save(out / "embeddings.npy", model.tok_embeddings.weight.numpy())
    (out / "onnx_config.json").write_text(json.dumps({
        "dim": cfg.dim, "n_layers": L, "n_kv_heads": kv, "head_dim": hd, "max_seq_len": cfg.max_seq_len,
        "image_ids": list(cfg.image_ids), "eos_token_id": tokenizer.eos_token_id}, indent=2))
    return out
