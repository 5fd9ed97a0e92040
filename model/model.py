"""MiniMind-V in one file: a small decoder LLM that sees through a frozen CLIP ViT-B/32.

Read top to bottom:
  1. the decoder's pieces: RMSNorm, rotary position embedding (RoPE), grouped-query attention, SwiGLU FFN,
     and the optional mixture-of-experts FFN;
  2. the projector: one Linear(768 -> dim) applied to the 50 CLIP tokens of each image;
  3. MiniMindVLM.forward: embed the prompt, splice projected image tokens over the 50-token placeholder
     (one masked assignment), run the blocks, tie the output head to the embedding;
  4. generation with a preallocated key/value cache that the caller holds.

Parameter names are upstream MiniMind-V v1's, so its released .pth state dicts load with strict=True.
The vision encoder itself lives outside this module (model/vision.py): it is frozen, so the model
takes its output, `image_features` of shape (..., 50, 768), not pixels.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .LMConfig import LMConfig



class KVCache:
    """Keys and values of every layer, preallocated for `capacity` positions. A decoding step writes its one
    new key/value into the next free slot; concatenating onto the history instead would copy all of it at
    every step (quadratic in the answer's length). The caller holds it; the modules keep no state."""

    def __init__(self, n_layers: int, batch_size: int, capacity: int, dtype: Optional[torch.dtype] = None):
        self.n_layers, self.batch_size, self.capacity = n_layers, batch_size, capacity
        self.dtype = dtype  # of the stored keys/values (None: the first write's)
        self.k = self.v = None  # (n_layers, B, capacity, n_kv_heads, head_dim), allocated on first write
        self.length = 0  # positions filled (the same in every layer once a forward pass is complete)

    def update(self, layer: int, k, v):
        """Write this step's (B, T, n_kv_heads, head_dim) keys/values; return all of them so far."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; this step needs {end}")
        if self.k is None:
            shape = (self.n_layers, self.batch_size, self.capacity) + tuple(k.shape[2:])
            self.k = k.new_empty(shape, dtype=self.dtype or k.dtype)
            self.v = v.new_empty(shape, dtype=self.dtype or v.dtype)
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int):
        self.length += n


# ----------------------------------------------------------------------------------------------------------
# 1. Decoder building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * weight, in one kernel that accumulates in fp32 whatever x's dtype
        # (the mean of squares in bf16 would lose too much precision).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def precompute_rope(head_dim: int, max_len: int, theta: float):
    """cos/sin tables of shape (max_len, head_dim // 2): the angle of each adjacent pair at each position."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, rope):
    """Rotate each adjacent pair (x[2i], x[2i+1]), read as the complex number x[2i] + i x[2i+1], by multiplying it
    with rope = cos + i sin (as upstream does); in fp32, and fp32 out. x: (B, T, H, D); rope: complex (T, 1, D/2),
    or (B, T, 1, D/2) for a position per row, broadcast over the heads (MiniMindVLM.rope). One complex product is
    ~3x faster forward and backward than the same rotation written with real tensors (a training step's q and k:
    1.6 vs 5.3 ms)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2)


def attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    """softmax(q k^T / sqrt(d)) v for (B, T, H, D) queries and (B, S, H_kv, D) keys and values; each KV head
    serves n_heads // n_kv_heads consecutive query heads (grouped-query attention). On a CPU it runs in fp32
    whatever autocast says: PyTorch's CPU flash-attention kernel takes 35 ms forward and backward in bf16 but
    8.4 ms in fp32 for one 27M layer at batch 16 x 96 tokens (94 vs 17 ms at the demo's head_dim 8), and fp32
    is the more precise. Elsewhere it runs in v's dtype (autocast's, on CUDA)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw = dict(attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1])
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, **kw).transpose(1, 2)
    with torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, attn_mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:  # keys/values of the earlier positions, plus this step's (in the cache's dtype)
            k, v = cache.update(layer, k, v)
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None and T > 1,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(y.reshape(B, T, -1).to(x.dtype)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MoEGate(nn.Module):
    """Top-k softmax router with the load-balancing auxiliary loss (per sequence or per batch)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        B, T, _ = x.shape
        cfg, E, k = self.cfg, self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        scores = F.linear(x.reshape(-1, x.shape[-1]), self.weight).float().softmax(dim=-1)  # (B*T, E)
        topk_weight, topk_idx = torch.topk(scores, k, dim=-1)
        if k > 1 and cfg.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = scores.new_zeros(())
        if self.training and cfg.aux_loss_alpha > 0:
            if cfg.seq_aux:  # balance within each sequence
                load = torch.zeros(B, E, device=x.device).scatter_add_(
                    1, topk_idx.view(B, -1), torch.ones(B, T * k, device=x.device)) / (T * k / E)
                aux_loss = (load * scores.view(B, T, E).mean(dim=1)).sum(dim=1).mean() * cfg.aux_loss_alpha
            else:  # balance over the whole batch
                load = F.one_hot(topk_idx.view(-1), E).float().mean(0) * E
                aux_loss = (scores.mean(0) * load).sum() * cfg.aux_loss_alpha
        return topk_idx, topk_weight, aux_loss


class MOEFeedForward(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_routed_experts))
        self.gate = MoEGate(cfg)
        self.shared_experts = FeedForward(cfg) if cfg.n_shared_experts else None
        self.aux_loss = None

    def forward(self, x):
        topk_idx, topk_weight, self.aux_loss = self.gate(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(topk_idx == e)  # tokens routed to expert e, and which of their k slots
            if token_idx.numel():
                y = expert(flat[token_idx]) * topk_weight[token_idx, slot, None].to(flat.dtype)
                out.index_add_(0, token_idx, y.to(out.dtype))
        out = out.view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class MiniMindBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: LMConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MOEFeedForward(cfg) if cfg.use_moe else FeedForward(cfg)

    def forward(self, x, rope, attn_mask, cache=None):
        h = x + self.attention(self.attention_norm(x), rope, attn_mask, cache, self.layer_id)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------------------------------------
# 2. The projector


class VisionProj(nn.Module):
    """CLIP token (768) -> decoder embedding (dim). Wrapped in a Sequential so the keys read
    `vision_proj.vision_proj.0.{weight,bias}`, as in upstream's v1 checkpoints."""

    def __init__(self, ve_dim: int, lm_dim: int):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(ve_dim, lm_dim))

    def forward(self, image_features):
        return self.vision_proj(image_features)


# ----------------------------------------------------------------------------------------------------------
# 3. The VLM


@dataclass
class VLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None


ImageFeatures = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


class MiniMindVLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        if len(cfg.image_ids) == 0:
            raise ValueError("LMConfig.image_ids is empty: set it from the tokenizer "
                             "(model.tokenizer.image_token_ids(tokenizer)) before building the model")
        self.params = cfg  # upstream's attribute name
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight  # tied: one matrix reads and writes tokens
        self.vision_proj = VisionProj(cfg.vision_dim, cfg.dim)
        # Buffers are derived, never saved: a state dict holds parameters only.
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("image_ids", None, persistent=False)
        self.init_buffers()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style: shrink the residual projections with depth
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def init_buffers(self, device=None):
        """(Re)compute the RoPE tables and placeholder ids from the config (also after a loader that
        creates the model on the 'meta' device, as transformers' from_pretrained does)."""
        cfg = self.params
        with torch.device("cpu"):  # real tables even inside a meta-device build (and no symbolic meta kernels)
            cos, sin = precompute_rope(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
            image_ids = torch.tensor(cfg.image_ids, dtype=torch.long)
        self.rope_cos, self.rope_sin, self.image_ids = cos.to(device), sin.to(device), image_ids.to(device)

    def rope(self, positions):
        """RoPE rotations for `positions` (a slice, or an index tensor of any shape): complex, (..., 1, head_dim // 2)
        (the 1 broadcasts over the heads)."""
        return torch.complex(self.rope_cos[positions].float().unsqueeze(-2), self.rope_sin[positions].float().unsqueeze(-2))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Unique parameters (the tied embedding/output matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    # -- image splice -------------------------------------------------------------------------------------

    def placeholder_mask(self, input_ids):
        """(mask, counts): mask[b, t] is True on every token of a complete 50-token placeholder;
        counts[b] is the number of placeholders in row b."""
        B, T = input_ids.shape
        n = self.image_ids.numel()
        if T < n:
            return torch.zeros_like(input_ids, dtype=torch.bool), torch.zeros(B, dtype=torch.long)
        starts = (input_ids.unfold(1, n, 1) == self.image_ids).all(dim=-1)  # (B, T-n+1): a placeholder begins here
        # A token is inside a placeholder iff a start lies within the n positions ending at it.
        c = F.pad(starts.long(), (0, n - 1)).cumsum(dim=1)
        mask = (c - F.pad(c, (n, 0))[:, :T]) > 0
        return mask, starts.sum(dim=1).cpu()

    @staticmethod
    def _flatten_images(image_features: ImageFeatures, batch_size: int):
        """Normalise the accepted layouts to (N, 50, vision_dim) plus images per row:
        None | tensor (B, 50, D) one image per row | tensor (B, n, 50, D) | list of B items, each None or
        (n_i, 50, D) or (50, D)."""
        if image_features is None:
            return None, [0] * batch_size
        if isinstance(image_features, torch.Tensor):
            if image_features.dim() == 3:
                image_features = image_features.unsqueeze(1)
            if image_features.dim() != 4 or image_features.shape[0] != batch_size:
                raise ValueError(f"image_features tensor must be (B, 50, D) or (B, n, 50, D) with B={batch_size}, "
                                 f"got {tuple(image_features.shape)}")
            return image_features.flatten(0, 1), [image_features.shape[1]] * batch_size
        if len(image_features) != batch_size:
            raise ValueError(f"image_features list has {len(image_features)} entries for a batch of {batch_size}")
        rows = [f if f is None or f.dim() == 3 else f.unsqueeze(0) for f in image_features]
        counts = [0 if f is None else f.shape[0] for f in rows]
        present = [f for f in rows if f is not None and f.shape[0] > 0]
        return (torch.cat(present) if present else None), counts

    def splice_images(self, input_ids, h, image_features: ImageFeatures):
        mask, found = self.placeholder_mask(input_ids)
        feats, given = self._flatten_images(image_features, input_ids.shape[0])
        bad = [b for b in range(len(given)) if found[b].item() != given[b]]
        if bad:
            raise ValueError("image placeholders and images disagree: " + "; ".join(
                f"row {b} has {found[b].item()} placeholder(s) but {given[b]} image(s)" for b in bad[:8]))
        if feats is None:
            return h
        image_embeds = self.vision_proj(feats.to(h.dtype))
        # One masked assignment: placeholder positions, in row-major order, take the image tokens in order.
        return h.masked_scatter(mask.unsqueeze(-1), image_embeds.to(h.dtype))

    # -- forward ------------------------------------------------------------------------------------------

    def _attention_mask(self, attention_mask, B, T, past_len, device):
        """None (plain causal, fast path) or a boolean (B, 1, T, past_len + T) mask that also hides padding."""
        if attention_mask is None and (past_len == 0 or T == 1):  # causal via is_causal, or one query: no mask
            return None
        S = past_len + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past_len)
        mask = causal[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask must be (B, past+T) = {(B, S)}, got {tuple(attention_mask.shape)}")
            mask = mask & attention_mask[:, None, None, :].bool()
            # A padding query would otherwise see no key at all (NaN); let it see itself. Its output is unused.
            mask = mask | _diagonal(T, S, past_len, device)[None, None]
        return mask

    def forward(self, input_ids, image_features: ImageFeatures = None, labels=None,
                past_key_values: Optional[KVCache] = None, use_cache: bool = False, attention_mask=None,
                loss_only: bool = False, last_only: bool = False):
        """logits (B, T, vocab) and, given labels (B, T) with -100 where no loss is taken, the mean next-token
        loss over labelled positions (+ the MoE balancing loss). loss_only=True skips the full logits and runs
        the output head only where a label is: in VLM training most positions are image or prompt tokens.
        last_only=True gives logits (B, 1, vocab) for the last position only (what a prompt's prefill needs).
        use_cache=True fills past_key_values (a KVCache; one just big enough for this input if none is given)
        and returns it; the next call passes it back with only the new tokens."""
        B, T = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = KVCache(len(self.layers), B, T)
        past_len = past_key_values.length if past_key_values is not None else 0
        if past_len + T > self.params.max_seq_len:
            raise ValueError(f"sequence of {past_len + T} tokens exceeds max_seq_len={self.params.max_seq_len}")
        h = self.splice_images(input_ids, self.tok_embeddings(input_ids), image_features)
        h = self.dropout(h)
        rope = self.rope(slice(past_len, past_len + T))
        mask = self._attention_mask(attention_mask, B, T, past_len, input_ids.device)
        for layer in self.layers:
            h = layer(h, rope, mask, past_key_values)
        if past_key_values is not None:
            past_key_values.advance(T)
        h = self.norm(h[:, -1:] if last_only else h)
        aux_loss = sum((l.feed_forward.aux_loss for l in self.layers if self.params.use_moe
                        and l.feed_forward.aux_loss is not None), h.new_zeros((), dtype=torch.float32))
        if labels is not None and loss_only:
            logits = None
            # Position t predicts token t+1; -100 marks tokens that carry no loss (prompt, image, padding).
            keep = labels[:, 1:] != -100
            ce = F.cross_entropy(self.output(h[:, :-1][keep]).float(), labels[:, 1:][keep], reduction="sum")
            loss = ce / keep.sum().clamp(min=1) + aux_loss
        else:
            logits = self.output(h)
            loss = None
            if labels is not None:
                targets = labels[:, 1:].reshape(-1)
                ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                                     ignore_index=-100, reduction="sum")
                loss = ce / (targets != -100).sum().clamp(min=1) + aux_loss
        return VLMOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                         past_key_values=past_key_values)

    # ------------------------------------------------------------------------------------------------------
    # 4. Generation

    @torch.inference_mode()
    def stream_generate(self, input_ids, image_features: ImageFeatures = None, attention_mask=None,
                        max_new_tokens: int = 256, temperature: float = 0.0, top_k: Optional[int] = None,
                        top_p: Optional[float] = None, repetition_penalty: float = 1.0, eos_token_id: int = 2,
                        use_cache: bool = True, generator: Optional[torch.Generator] = None):
        """Yield the next token id of every row, a (B,) tensor per step, until every row has produced
        eos_token_id or max_new_tokens is reached. Rows that finished keep yielding eos_token_id.
        Batched prompts of different lengths are left-padded with attention_mask 0 on the padding.
        temperature <= 0 means greedy decoding."""
        B, T = input_ids.shape
        max_new_tokens = max(0, min(max_new_tokens, self.params.max_seq_len - T))
        # Prompt + answer ids and their attention mask live in buffers filled one column per step.
        ids = input_ids.new_empty((B, T + max_new_tokens))
        ids[:, :T] = input_ids
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = None
        if padded:  # left padding: every later position is real, so the mask only matters for padded rows
            mask = attention_mask.new_ones((B, T + max_new_tokens))
            mask[:, :T] = attention_mask
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        cache = KVCache(len(self.layers), B, T + max_new_tokens) if use_cache else None
        out = self(input_ids, image_features, attention_mask=None if mask is None else mask[:, :T],
                   past_key_values=cache, last_only=True)
        for n in range(T, T + max_new_tokens):
            next_id = sample_next_token(out.logits[:, -1, :].float(), ids[:, :n], temperature, top_k, top_p,
                                        repetition_penalty, generator)
            next_id = torch.where(finished, torch.full_like(next_id, eos_token_id), next_id)
            finished |= next_id == eos_token_id
            yield next_id
            if bool(finished.all()) or n + 1 == T + max_new_tokens:
                return
            ids[:, n] = next_id
            step_mask = None if mask is None else mask[:, :n + 1]
            if use_cache:
                out = self(ids[:, n:n + 1], attention_mask=step_mask, past_key_values=cache)
            else:  # recompute everything: slow, kept as the reference the cache is tested against
                out = self(ids[:, :n + 1], image_features, attention_mask=step_mask)

    def generate(self, input_ids, image_features: ImageFeatures = None, **kwargs):
        """(B, n_new) tensor of generated ids (eos included where reached; finished rows padded with eos)."""
        steps = list(self.stream_generate(input_ids, image_features, **kwargs))
        if not steps:
            return input_ids.new_zeros((input_ids.shape[0], 0))
        return torch.stack(steps, dim=1)


def _diagonal(T, S, past_len, device):
    """(T, S) boolean with True where query t (absolute position past_len + t) meets its own key."""
    return torch.arange(S, device=device)[None, :] == (torch.arange(T, device=device)[:, None] + past_len)


def sample_next_token(logits, seen_ids, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
                      generator=None):
    """Pick one token per row from (B, V) logits."""
    logits = logits.clone()
    if repetition_penalty != 1.0:
        # Make every already-seen token less likely: shrink positive logits, grow negative ones
        # (dividing a negative logit would make it *more* likely).
        prev = logits.gather(1, seen_ids)
        logits.scatter_(1, seen_ids, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already reached p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
