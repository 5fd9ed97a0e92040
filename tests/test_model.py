"""The decoder, the splice and generation.

- Both released sizes have exactly upstream v1's parameter names, shapes and counts (27,272,192 and
  109,340,160), tied embeddings and no saved buffers; MoE parameter names, auxiliary loss and gradients;
  config inference from tensor shapes.
- The splice replaces exactly the placeholder positions, images in order, text untouched; batches mix rows
  with and without images; a mismatch between placeholders and images is an error with a clear message; an
  incomplete placeholder stays text.
- The loss ignores -100 labels, and the loss-only output path gives the same loss and gradients.
- Generation: KV-cached equals recomputation, left padding does not change a row's answer, each row stops
  at </s>; the repetition penalty on negative logits; top-k and top-p; the KV cache is written in place
  (same storage before and after a step, logits equal to a full forward) and refuses to overflow.
- Strict loading names missing, unexpected and mis-shaped keys; `_orig_mod.` prefixes are stripped and a
  checkpoint that would run code is refused.
"""

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, infer_config, load_strict, load_vlm, save_checkpoint
from model.LMConfig import IMAGE_PLACEHOLDER, LMConfig
from model.model import MiniMindVLM, sample_next_token
from model.tokenizer import image_token_ids


def upstream_v1_keys(n_layers, use_moe=False, n_experts=4):
    """The parameter names of upstream MiniMind-V v1's state dicts, written out independently of our model."""
    keys = ["tok_embeddings.weight"]
    for i in range(n_layers):
        keys += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
        if use_moe:
            keys += [f"layers.{i}.feed_forward.experts.{e}.{w}.weight" for e in range(n_experts) for w in ("w1", "w2", "w3")]
            keys += [f"layers.{i}.feed_forward.gate.weight"]
            keys += [f"layers.{i}.feed_forward.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        else:
            keys += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    return set(keys + ["norm.weight", "output.weight", "vision_proj.vision_proj.0.weight",
                       "vision_proj.vision_proj.0.bias"])


@pytest.mark.parametrize("dim,n_layers,expected", [(512, 8, 27_272_192), (768, 16, 109_340_160)])
def test_released_sizes_names_shapes_counts(image_ids, dim, n_layers, expected):
    model = MiniMindVLM(LMConfig(dim=dim, n_layers=n_layers, image_ids=image_ids))
    sd = model.state_dict()
    assert set(sd) == upstream_v1_keys(n_layers)
    assert model.num_parameters() == expected
    hidden = {512: 1408, 768: 2048}[dim]
    assert sd["layers.0.attention.wq.weight"].shape == (dim, dim)
    assert sd["layers.0.attention.wk.weight"].shape == (dim // 2, dim)  # 8 of 16 heads are KV heads
    assert sd["layers.0.feed_forward.w1.weight"].shape == (hidden, dim)
    assert sd["layers.0.feed_forward.w2.weight"].shape == (dim, hidden)
    assert sd["vision_proj.vision_proj.0.weight"].shape == (dim, 768)
    assert sd["vision_proj.vision_proj.0.bias"].shape == (dim,)
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()  # tied
    buffers = {n for n, _ in model.named_buffers()}
    assert buffers and not buffers & set(sd)  # RoPE tables and image ids are not saved


def test_default_config_builds_like_upstream(tokenizer, tmp_path):
    """MiniMindVLM(LMConfig(dim=512, n_layers=8)) builds, as upstream's does: the placeholder ids default to
    upstream v1's, which the shipped tokenizer gives too; a checkpoint whose ids the tokenizer does not give
    is refused with a message that says so."""
    cfg = LMConfig(dim=512, n_layers=8)
    assert cfg.image_ids == [30] * 25 + [32] * 25 == image_token_ids(tokenizer)
    assert MiniMindVLM(cfg).num_parameters() == 27_272_192
    other = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, image_ids=[7] * 50)
    save_checkpoint(MiniMindVLM(other), tmp_path / "m.safetensors", other)
    with pytest.raises(CheckpointError, match=r"placeholder ids \[7\]x50.*use the tokenizer it was trained with"):
        load_vlm(str(tmp_path / "m.safetensors"), tokenizer)


def test_moe_names_and_training_step(image_ids):
    cfg = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, use_moe=True, image_ids=image_ids)
    model = MiniMindVLM(cfg)
    assert set(model.state_dict()) == upstream_v1_keys(2, use_moe=True)
    assert model.state_dict()["layers.1.feed_forward.gate.weight"].shape == (4, 64)
    ids = torch.randint(3, 6400, (2, 12))
    out = model(ids, labels=ids)
    assert out.aux_loss > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.layers[0].feed_forward.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids).aux_loss == 0  # the balancing loss is a training-time term


def test_infer_config_from_shapes(image_ids):
    for kw in (dict(dim=512, n_layers=8), dict(dim=64, n_layers=3, use_moe=True, n_routed_experts=3)):
        cfg = LMConfig(**kw, image_ids=image_ids)
        got = infer_config(MiniMindVLM(cfg).state_dict(), image_ids)
        for f in ("dim", "n_layers", "n_kv_heads", "hidden_dim", "use_moe", "n_routed_experts", "vocab_size"):
            assert getattr(got, f) == getattr(cfg, f), f


def _prompt(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_splice_replaces_exactly_the_placeholder(tokenizer, tiny_cfg):
    model = MiniMindVLM(tiny_cfg()).eval()
    ids = torch.tensor([_prompt(tokenizer, f"<s>user\nlook {IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}x</s>")])
    feats = torch.randn(1, 2, 50, 768)
    emb = model.tok_embeddings(ids)
    spliced = model.splice_images(ids, emb, feats)
    mask, counts = model.placeholder_mask(ids)
    assert counts.tolist() == [2] and mask.sum() == 100
    proj = model.vision_proj(feats[0].reshape(100, 768))
    assert torch.allclose(spliced[0][mask[0]], proj, atol=1e-6)  # images in order, one token each
    assert torch.equal(spliced[0][~mask[0]], emb[0][~mask[0]])  # text untouched
    # the first placeholder holds image 0, the second image 1
    first = mask[0].nonzero().squeeze(1)[:50]
    assert torch.allclose(spliced[0, first], model.vision_proj(feats[0, 0]), atol=1e-6)


def test_splice_mixed_batch_and_errors(tokenizer, tiny_cfg):
    model = MiniMindVLM(tiny_cfg()).eval()
    with_img = _prompt(tokenizer, f"<s>user\n{IMAGE_PLACEHOLDER}\nwhat?</s>")
    text_only = _prompt(tokenizer, "<s>user\nhello there, how are you?</s>")
    T = max(len(with_img), len(text_only))
    ids = torch.zeros(2, T, dtype=torch.long)
    ids[0, :len(with_img)] = torch.tensor(with_img)
    ids[1, :len(text_only)] = torch.tensor(text_only)
    f = torch.randn(50, 768)
    out = model(ids, [f, None]).logits
    # row 1 is text-only: same logits as running it alone without images
    alone = model(ids[1:2]).logits
    assert torch.allclose(out[1], alone[0], atol=1e-5)
    # and row 0 really depends on its image
    assert not torch.allclose(out[0], model(ids, [torch.randn(50, 768), None]).logits[0], atol=1e-3)
    # batch of one, tensor layout (B, 50, 768)
    assert model(ids[:1], f[None]).logits.shape == (1, T, 6400)
    with pytest.raises(ValueError, match=r"row 0 has 1 placeholder\(s\) but 0 image"):
        model(ids, None)
    with pytest.raises(ValueError, match=r"row 1 has 0 placeholder\(s\) but 1 image"):
        model(ids, [f, f])
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        model(ids[:1], [f, None])


def test_partial_placeholder_is_text(tokenizer, tiny_cfg):
    model = MiniMindVLM(tiny_cfg()).eval()
    ids = torch.tensor([_prompt(tokenizer, "<" * 25 + ">" * 24 + " and <<<>>>")])
    mask, counts = model.placeholder_mask(ids)
    assert counts.tolist() == [0] and not mask.any()


def test_loss_ignores_masked_labels(tiny_cfg):
    model = MiniMindVLM(tiny_cfg()).eval()
    ids = torch.randint(3, 6400, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, 6:] = ids[:, 6:]
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, 5:-1].reshape(-1, 6400), ids[:, 6:].reshape(-1))
    assert torch.allclose(model(ids, labels=labels).loss, expected, atol=1e-5)
    # changing a target that is masked out changes nothing
    labels2 = labels.clone()
    labels2[:, :6] = -100
    assert torch.allclose(model(ids, labels=labels2).loss, expected, atol=1e-5)
    # the training path that runs the output head only on labelled positions gives the same loss and grads
    fast = model(ids, labels=labels, loss_only=True)
    assert fast.logits is None and torch.allclose(fast.loss, expected, atol=1e-5)
    g_full = torch.autograd.grad(model(ids, labels=labels).loss, model.output.weight)[0]
    g_fast = torch.autograd.grad(model(ids, labels=labels, loss_only=True).loss, model.output.weight)[0]
    assert torch.allclose(g_full, g_fast, atol=1e-6)


def _image_prompts(tokenizer):
    a = _prompt(tokenizer, f"<s>user\n{IMAGE_PLACEHOLDER}\nWhat colour is it?</s>\n<s>assistant\n")
    b = _prompt(tokenizer, f"<s>user\n{IMAGE_PLACEHOLDER}\nShape?</s>\n<s>assistant\n")
    return a, b


def left_pad(seqs, pad_id=0):
    """(ids, attention_mask), left-padded so every row's last prompt token sits in the last column."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


def test_kv_cache_generation_equals_recompute(tokenizer, tiny_cfg):
    model = MiniMindVLM(tiny_cfg()).eval()
    a, b = _image_prompts(tokenizer)
    ids, mask = left_pad([a, b])
    feats = [torch.randn(50, 768), torch.randn(50, 768)]
    kw = dict(max_new_tokens=12, eos_token_id=-1, attention_mask=mask)
    cached = model.generate(ids, feats, use_cache=True, **kw)
    recomputed = model.generate(ids, feats, use_cache=False, **kw)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, recomputed)
    # left padding does not change a row's answer: row 1 alone gives the same tokens
    alone = model.generate(torch.tensor([b]), [feats[1]], max_new_tokens=12, eos_token_id=-1)
    assert torch.equal(alone[0], cached[1])


def test_kv_cache_is_preallocated_and_written_in_place(tiny_cfg):
    from model.model import KVCache
    model = MiniMindVLM(tiny_cfg()).eval()
    ids = torch.randint(3, 6400, (2, 7))
    cache = KVCache(len(model.layers), 2, 10)
    with torch.no_grad():
        full = model(ids).logits
        model(ids[:, :5], past_key_values=cache)
        storage = cache.k.data_ptr()
        step = model(ids[:, 5:6], past_key_values=cache).logits
        last = model(ids[:, 6:7], past_key_values=cache).logits
    assert cache.length == 7 and cache.k.data_ptr() == storage  # no reallocation, no concatenation
    assert torch.allclose(step[:, 0], full[:, 5], atol=1e-5) and torch.allclose(last[:, 0], full[:, 6], atol=1e-5)
    with pytest.raises(ValueError, match="holds 10 positions; this step needs 11"):
        model(torch.randint(3, 6400, (2, 4)), past_key_values=cache)


def test_streaming_stops_at_eos_per_row(tiny_cfg):
    model = MiniMindVLM(tiny_cfg()).eval()
    ids = torch.randint(3, 6400, (2, 5))
    first = model.generate(ids, max_new_tokens=1)[:, 0]
    # make row 0's first greedy token the EOS: that row finishes at once, the other continues
    out = model.generate(ids, max_new_tokens=4, eos_token_id=int(first[0]))
    assert out[0].tolist() == [int(first[0])] * out.shape[1]
    steps = list(model.stream_generate(ids, max_new_tokens=4, eos_token_id=-1))
    assert len(steps) == 4 and all(s.shape == (2,) for s in steps)


def test_repetition_penalty_handles_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.5, -3.0]])
    seen = torch.tensor([[0, 1]])
    # token 0 (positive, seen) drops below token 2; token 1 (negative, seen) must become *less* likely
    out = logits.clone()
    pen = 2.0
    got = sample_next_token(out, seen, temperature=0, repetition_penalty=pen)
    assert got.item() == 2
    probs_before = logits.softmax(-1)[0, 1]
    adjusted = torch.tensor([[1.0, -4.0, 1.5, -3.0]]).softmax(-1)[0, 1]
    assert adjusted < probs_before
    # sampling with top_k=1 is greedy; top_p tiny keeps only the best token
    for _ in range(5):
        assert sample_next_token(logits, seen[:, :0], temperature=1.0, top_k=1).item() == 0
        assert sample_next_token(logits, seen[:, :0], temperature=1.0, top_p=0.01).item() == 0


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, logits.new_zeros(1, 0, dtype=torch.long), 1.0, top_p=0.7,
                               generator=g).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn


def test_strict_load_lists_keys(tiny_cfg):
    model = MiniMindVLM(tiny_cfg())
    sd = dict(model.state_dict())
    ok = {k: v for k, v in sd.items() if not k.startswith("vision_proj.")}
    load_strict(model, ok, allow_missing=("vision_proj.",))  # an LLM file has no projector: fine
    with pytest.raises(ValueError, match=r"missing keys \(2\).*vision_proj\.vision_proj\.0\.weight"):
        load_strict(model, ok)
    bad = dict(sd, **{"layers.9.attention.wq.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*layers\.9\.attention\.wq\.weight"):
        load_strict(model, bad)
    wrong = dict(sd, **{"norm.weight": torch.zeros(65)})
    with pytest.raises(ValueError, match=r"norm\.weight: checkpoint \(65,\) vs model \(64,\)"):
        load_strict(model, wrong)


def test_checkpoint_prefixes_and_unsafe_pickle(tmp_path, tiny_cfg):
    from model.checkpoint import read_state_dict
    model = MiniMindVLM(tiny_cfg())
    p = tmp_path / "c.pth"
    torch.save({"_orig_mod." + k: v for k, v in model.state_dict().items()}, p)
    load_strict(MiniMindVLM(tiny_cfg()), read_state_dict(p))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot read checkpoint .*evil.pth"):
        read_state_dict(tmp_path / "evil.pth")


def rope_pairs_real(x, cos, sin):
    """RoPE as written before the complex form: (x0 cos - x1 sin, x0 sin + x1 cos) over adjacent pairs."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def test_complex_rope_is_the_pairwise_rotation(tiny_cfg):
    from model.model import apply_rope
    model = MiniMindVLM(tiny_cfg())
    x = torch.randn(2, 7, 4, 16)
    got = apply_rope(x, model.rope(slice(3, 10)))
    want = rope_pairs_real(x, model.rope_cos[3:10], model.rope_sin[3:10])
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    rows = torch.stack([x[0, :1], x[1, 6:7]])  # a position per row, as the engine does: 3 and 9
    per_row = apply_rope(rows, model.rope(torch.tensor([[3], [9]])))
    assert torch.equal(per_row[0], got[0, :1]) and torch.equal(per_row[1], got[1, 6:7])


def test_cpu_attention_in_fp32_keeps_bf16_training_logits_and_gradients(tiny_cfg, monkeypatch):
    """On a CPU, attention runs in fp32 whatever autocast says (model.attention: PyTorch's bf16 CPU flash kernel is
    2-5x slower). Its logits and gradients under bf16 autocast equal, within bf16's rounding, those of the path it
    replaced: scaled_dot_product_attention autocast to bf16. Stated tolerance: 2% of the largest value."""
    import model.model as mm
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_cfg(dim=128, n_heads=4, n_kv_heads=2)).train()
    ids = torch.randint(10, 6000, (4, 80))
    ids[:, 3:3 + model.image_ids.numel()] = model.image_ids
    labels = ids.clone()
    labels[:, :60] = -100
    feats = torch.randn(4, 1, 50, 768)

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, feats, labels=labels)
        out.loss.backward()
        return out.logits.float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def bf16_sdpa(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):  # the previous path
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                           is_causal=is_causal, dropout_p=dropout_p, enable_gqa=q.shape[2] != k.shape[2])
        assert y.dtype == torch.bfloat16  # autocast's
        return y.transpose(1, 2)
    logits, grads = run()
    monkeypatch.setattr(mm, "attention", bf16_sdpa)
    old_logits, old_grads = run()
    assert not torch.equal(logits, old_logits)  # really another path
    assert (logits - old_logits).abs().max() <= 0.02 * old_logits.abs().max()
    for name, g in grads.items():
        assert (g - old_grads[name]).abs().max() <= 0.02 * old_grads[name].abs().max(), name
