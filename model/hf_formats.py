"""MiniMind-V as stock transformers models, and back: tensors and config fields only (no transformers import, so
the servers read an export without loading transformers' modeling code).

  LLaVA  (LlavaForConditionalGeneration): CLIP vision tower + projector + Llama decoder, the whole VLM.
  Llama  (LlamaForCausalLM): the decoder alone, for text-only use and converters such as llama.cpp's.

MiniMind-V's decoder is a Llama; what differs is bridged here, in both directions:
  - names: upstream MiniMind's parameter names vs transformers' Llama names (LAYER_NAMES).
  - RoPE: MiniMind rotates adjacent pairs (x[2i], x[2i+1]) of each head, Llama rotates halves (x[i], x[i + D/2]),
    both by the angle of frequency i. Reordering each head's rows of wq and wk (even rows first, then odd) turns
    one into the other; q and k move together, so every attention score is unchanged.
  - projector: LLaVA's linear_1 -> act -> linear_2, with act the identity ("linear") and linear_2 the identity
    matrix, is MiniMind's one Linear(768 -> dim).
  - image tokens: MiniMind marks an image with a 50-token placeholder text, LLaVA with 50 copies of one token id
    (`<image>`), appended after the vocabulary. Its embedding row is zeros: the image features overwrite it where
    it is read, and with tied embeddings its logit is 0 (generation_config.json suppresses it).
  - tied embeddings: both tie the output head to the embedding; lm_head is not stored.

LLaVA files are written in the layout transformers' save_pretrained writes by default, that of the llava-hf
checkpoints (language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*); the way back also
takes the layout transformers 5 keeps in memory (model.language_model.*, lm_head.*: save_pretrained(...,
save_original_format=False)).
"""
import re

import torch

IMAGE_TOKEN = "<image>"
PROJECTOR_FILE = "minimind_v_projector.safetensors"  # beside a Llama export: its way back to a full MiniMind-V

# MiniMind name -> Llama name, inside layer i
LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
PROJ = "vision_proj.vision_proj.0."  # MiniMind's projector

# Prefixes of the LLaVA layout this module writes, and of the in-memory layout of newer transformers (read only)
LLAVA_DECODER, LLAVA_HEAD, LLAVA_PROJ, LLAVA_TOWER = ("language_model.model.", "language_model.lm_head.",
                                                      "multi_modal_projector.", "vision_tower.vision_model.")
LLAVA_RENAMES = [(r"^model\.language_model\.", LLAVA_DECODER), (r"^lm_head\.", LLAVA_HEAD),
                 (r"^model\.multi_modal_projector\.", LLAVA_PROJ), (r"^model\.vision_tower\.", "vision_tower.")]
LLAVA_SETTINGS = dict(projector_hidden_act="linear", vision_feature_layer=-1, vision_feature_select_strategy="full")


class StockFormatError(ValueError):
    """A stock export that MiniMind-V cannot represent (or config fields that are not a MiniMind-V's)."""


# -- RoPE: adjacent pairs <-> halves ------------------------------------------------------------------------

def rope_rows_to_llama(w, n_heads):
    """Rows of a q or k projection (n_heads * D, dim), each head's reordered [0, 2, 4, ..., 1, 3, 5, ...]."""
    return w.reshape(n_heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def rope_rows_from_llama(w, n_heads):
    """The inverse of rope_rows_to_llama."""
    return w.reshape(n_heads, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)


# -- the decoder ---------------------------------------------------------------------------------------------

def decoder_to_llama(sd, cfg, prefix="model.", extra_rows=0):
    """MiniMind's decoder tensors (tok_embeddings, layers.*, norm; output is the tied embedding) under Llama's
    names after `prefix`, q/k rows reordered; `extra_rows` zero rows appended to the embedding. The projector is
    left out; any other tensor (a mixture-of-experts layer's) is a StockFormatError."""
    out, unknown = {}, []
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m and m.group(2) in LAYER_NAMES:
            name = LAYER_NAMES[m.group(2)]
            if name == "self_attn.q_proj.weight":
                value = rope_rows_to_llama(value, cfg.n_heads)
            elif name == "self_attn.k_proj.weight":
                value = rope_rows_to_llama(value, cfg.n_kv_heads)
            out[f"{prefix}layers.{m.group(1)}.{name}"] = value
        elif key in TOP_NAMES:
            if key == "tok_embeddings.weight" and extra_rows:
                value = torch.cat([value, value.new_zeros(extra_rows, value.shape[1])])
            out[prefix + TOP_NAMES[key]] = value
        elif key != "output.weight" and not key.startswith(PROJ):
            unknown.append(key)
    if unknown:
        raise StockFormatError(f"a Llama decoder has no place for {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return out


def decoder_from_llama(tensors, n_heads, n_kv_heads, prefix, head, where, vocab_size=None):
    """(MiniMind decoder tensors, the keys it did not recognise) from Llama-named `tensors` under `prefix`; the
    embedding cut to `vocab_size` rows if given. An lm_head (under `head`) must equal the embedding: MiniMind
    ties them."""
    out, rest = {}, {}
    llama_names = {v: k for k, v in LAYER_NAMES.items()}
    top_names = {v: k for k, v in TOP_NAMES.items()}
    for key, value in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name or "")
        if m and m.group(2) in llama_names:
            if m.group(2) == "self_attn.q_proj.weight":
                value = rope_rows_from_llama(value, n_heads)
            elif m.group(2) == "self_attn.k_proj.weight":
                value = rope_rows_from_llama(value, n_kv_heads)
            out[f"layers.{m.group(1)}.{llama_names[m.group(2)]}"] = value
        elif name in top_names:
            out[top_names[name]] = value
        elif key != head + "weight":
            rest[key] = value
    embedding = out.get("tok_embeddings.weight")
    if embedding is not None:
        if head + "weight" in tensors and not torch.equal(tensors[head + "weight"], embedding):
            raise StockFormatError(f"{where}: {head}weight differs from the embedding; MiniMind-V ties its output "
                                   "head to the embedding (tie_word_embeddings), so an untied head cannot come back")
        if vocab_size is not None:
            embedding = embedding[:vocab_size]
        out["tok_embeddings.weight"] = out["output.weight"] = embedding
    return out, rest


# -- configs -------------------------------------------------------------------------------------------------

def llama_config_fields(cfg, vocab_size, bos_token_id, eos_token_id, pad_token_id) -> dict:
    """LlamaConfig's arguments for a MiniMind decoder (LMConfig) with `vocab_size` embedding rows."""
    return dict(vocab_size=vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.dim // cfg.n_heads, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
                bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def llava_config_fields(image_token_id, n_image_tokens) -> dict:
    """LlavaConfig's arguments besides the two sub-configs: every CLIP token (CLS kept) of the last layer, one
    linear map."""
    return dict(image_token_index=image_token_id, image_seq_length=n_image_tokens, multimodal_projector_bias=True,
                tie_word_embeddings=True, **LLAVA_SETTINGS)


def lm_config_fields(text: dict, where) -> dict:
    """LMConfig's fields (all but image_ids and the vision side) from a Llama config.json's fields, or
    StockFormatError naming what MiniMind-V's decoder cannot do."""
    try:
        dim, n_heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        fields = dict(dim=dim, n_layers=int(text["num_hidden_layers"]), n_heads=n_heads,
                      n_kv_heads=int(text.get("num_key_value_heads") or n_heads),
                      hidden_dim=int(text["intermediate_size"]), norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                      max_seq_len=int(text.get("max_position_embeddings", 2048)), vocab_size=int(text["vocab_size"]))
        rope = dict(text.get("rope_parameters") or {"rope_theta": text.get("rope_theta", 1e4)})
        fields["rope_theta"] = float(rope.get("rope_theta", 1e4))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StockFormatError(f"{where}: not a Llama text config ({type(e).__name__}: {e})") from None
    problems = [
        text.get("hidden_act", "silu") != "silu" and f"hidden_act is {text.get('hidden_act')!r}, not 'silu'",
        (text.get("attention_bias") or text.get("mlp_bias")) and "it has attention or MLP biases",
        text.get("head_dim") not in (None, dim // n_heads) and
        f"head_dim {text.get('head_dim')} is not hidden_size / num_attention_heads = {dim // n_heads}",
        (rope.get("rope_type", rope.get("type", "default")) != "default" or text.get("rope_scaling")) and
        f"its RoPE is scaled ({rope})"]
    problems = [p for p in problems if p]
    if problems:
        raise StockFormatError(f"{where}: {'; '.join(problems)}: MiniMind-V's decoder cannot represent it")
    return fields


# -- whole models --------------------------------------------------------------------------------------------

def to_llava(sd, cfg, tower_sd, image_token_id) -> dict:
    """The LLaVA tensors of a MiniMind-V state dict and its CLIP tower's (CLIPVisionModel names without
    `vision_model.`); the `<image>` row appended to the embedding at image_token_id (= cfg.vocab_size)."""
    if image_token_id != cfg.vocab_size:
        raise ValueError(f"the <image> token must follow the vocabulary (id {cfg.vocab_size}), not be {image_token_id}")
    out = decoder_to_llama(sd, cfg, LLAVA_DECODER, extra_rows=1)
    w, b = sd[PROJ + "weight"], sd[PROJ + "bias"]
    out[LLAVA_PROJ + "linear_1.weight"], out[LLAVA_PROJ + "linear_1.bias"] = w, b
    out[LLAVA_PROJ + "linear_2.weight"] = torch.eye(cfg.dim, dtype=w.dtype)
    out[LLAVA_PROJ + "linear_2.bias"] = torch.zeros(cfg.dim, dtype=b.dtype)
    out.update({LLAVA_TOWER + k: v for k, v in tower_sd.items()})
    return out


def to_llama(sd, cfg):
    """(the Llama tensors of a MiniMind-V state dict, its projector under MiniMind's names)."""
    return decoder_to_llama(sd, cfg), {k: v for k, v in sd.items() if k.startswith(PROJ)}


def from_llava(config: dict, tensors: dict, where):
    """(MiniMind-V state dict, LMConfig fields but image_ids) from a LLaVA config.json and its tensors. The
    vision tower's tensors are skipped: MiniMind-V reads its tower from --vision_model. A linear_2 that is not
    the identity (trained elsewhere) is folded into the one Linear: act is the identity, so the product is exact
    up to rounding."""
    for key, want in LLAVA_SETTINGS.items():
        if config.get(key) != want:
            raise StockFormatError(f"{where}: {key} is {config.get(key)!r}; MiniMind-V's image tokens need {want!r}")
    text = config.get("text_config") or {}
    fields = lm_config_fields(text, where)
    image_id = config.get("image_token_index", config.get("image_token_id"))
    if image_id != fields["vocab_size"] - 1:
        raise StockFormatError(f"{where}: the image token id {image_id} is not the last embedding row "
                               f"({fields['vocab_size'] - 1}), where export_model.py puts it")
    fields["vocab_size"] -= 1
    fields["vision_dim"] = int((config.get("vision_config") or {}).get("hidden_size", 768))
    tensors = {_llava_name(k): v for k, v in tensors.items()}
    sd, rest = decoder_from_llama(tensors, fields["n_heads"], fields["n_kv_heads"], LLAVA_DECODER, LLAVA_HEAD, where,
                                  vocab_size=fields["vocab_size"])
    projector = {k[len(LLAVA_PROJ):]: rest.pop(k) for k in list(rest) if k.startswith(LLAVA_PROJ)}
    for k in [k for k in rest if is_llava_tower_key(k)]:
        del rest[k]
    if projector:
        sd.update(_fold_projector(projector, where))
    sd.update(rest)  # anything unrecognised stays, under its own name, for the strict loader to report
    return sd, fields


def from_llama(config: dict, tensors: dict, where, projector=None):
    """(MiniMind-V state dict, LMConfig fields but image_ids) from a Llama config.json and its tensors, plus the
    projector file written beside it (without one, the state dict has no projector: enough to start
    1-pretrain_vlm.py, which trains it)."""
    fields = lm_config_fields(config, where)
    sd, rest = decoder_from_llama(tensors, fields["n_heads"], fields["n_kv_heads"], "model.", "lm_head.", where)
    sd.update(rest)
    sd.update(projector or {})
    return sd, fields


def is_llava_tower_key(key) -> bool:
    """A LLaVA file's vision-tower tensor (either layout)."""
    return key.startswith(("vision_tower.", "model.vision_tower."))


def _llava_name(key):
    for pattern, prefix in LLAVA_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, prefix, key)
    return key


def _fold_projector(p, where):
    """MiniMind's Linear from LLaVA's linear_1 and linear_2 (act = identity): linear_1 itself when linear_2 is
    the identity map (bit-exact), else W2 @ W1 and W2 @ b1 + b2 (computed in float64)."""
    names = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
    missing = [n for n in names if n not in p]
    if missing:
        raise StockFormatError(f"{where}: the projector lacks {missing} (MiniMind-V's has biases)")
    w1, b1, w2, b2 = (p[n] for n in names)
    if torch.equal(w2, torch.eye(w2.shape[0], dtype=w2.dtype)) and not b2.any():
        w, b = w1, b1
    else:
        w = (w2.double() @ w1.double()).to(w1.dtype)
        b = (w2.double() @ b1.double() + b2.double()).to(b1.dtype)
    return {PROJ + "weight": w, PROJ + "bias": b}
