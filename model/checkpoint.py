"""Reading and writing model weights: safe (no unpickling of code), strict (every mismatch is an error that
lists the keys), atomic (a kill during a save leaves the previous file intact)."""
import json
import os
import re
from pathlib import Path

import torch

from .LMConfig import LMConfig
from .model import MiniMindVLM
from .tokenizer import image_token_ids


WEIGHT_SUFFIXES = (".safetensors", ".pth")


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, not a state dict, or not this model's shapes. The
    message names the file and what is wrong."""


def resolve_checkpoint(path) -> str:
    """The weights file a user means: the path as given if it exists, else the same name with .safetensors
    or .pth (in that order), so `out/512_vlm_sft` and upstream's `out/512_vlm_sft.pth` both work. A missing
    file is returned unchanged for the reader to report."""
    p = Path(path)
    if p.exists():
        return str(p)
    stem = p.with_suffix("") if p.suffix in WEIGHT_SUFFIXES else p
    for suffix in WEIGHT_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return str(candidate)
    return str(p)


def read_state_dict(path) -> dict:
    """Tensors from a .pth (torch.load with weights_only=True) or a .safetensors file."""
    path = str(path)
    if os.path.isdir(path):  # a directory written by export_model.py
        inner = os.path.join(path, "model.safetensors")
        if not os.path.isfile(inner):
            raise CheckpointError(f"{path} is a directory without model.safetensors (not an export_model.py export)")
        return {k[len("model."):] if k.startswith("model.") else k: v for k, v in read_state_dict(inner).items()}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or a pickle that wants to run code
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, damaged or not a checkpoint): "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):  # {"model": state_dict, ...} wrappers
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    # torch.compile and DDP wrappers prefix every key; the weights are the same.
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in sd.items()}


def load_strict(model, state_dict, allow_missing=(), where="checkpoint"):
    """Load every tensor; anything missing (outside the allow-listed prefixes), unexpected or of the wrong
    shape is an error naming the keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{where} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:10]))
        lines += _config_difference(model, state_dict)
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=False)  # strictness checked above, with the allow-list


def _config_difference(model, state_dict) -> list:
    """A line saying which settings the checkpoint's shapes imply and this model differs in, if it can tell."""
    own = getattr(model, "params", None)
    if not isinstance(own, LMConfig):
        return []
    try:
        theirs = infer_config(state_dict, own.image_ids)
    except (KeyError, IndexError, ValueError, ZeroDivisionError):
        return []
    fields = ("dim", "n_layers", "n_kv_heads", "vocab_size", "hidden_dim", "use_moe")
    diff = [f"{f}={getattr(theirs, f)} (model: {getattr(own, f)})" for f in fields if getattr(theirs, f) != getattr(own, f)]
    return [f"  the checkpoint was made with {', '.join(diff)}"] if diff else []


def sidecar_path(ckpt_path) -> Path:
    return Path(ckpt_path).with_suffix(".json")


def atomic_write(path, write):
    """write(tmp) to `{path}.tmp`, then rename it over path: a kill during the write leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_weights(state_dict, path):
    """Tensors as .safetensors or, for a .pth path, an upstream-style torch.save file, written atomically.
    Tied tensors (the embedding/output matrix) are stored under each of their names, as upstream's files
    have them."""
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}  # clone: untie
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(sd, tmp))


def save_checkpoint(model, path, config: LMConfig, extra=None):
    """The model's state dict (upstream names; see save_weights) plus a JSON sidecar with the config, both
    written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), path)
    meta = json.dumps({"config": config.to_dict(), **(extra or {})}, indent=2, ensure_ascii=False)
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(meta))


def infer_config(state_dict, image_ids) -> LMConfig:
    """Model shape from tensor shapes, for upstream files that have no sidecar. Upstream always uses 16 query
    heads; the KV heads follow from wk's shape."""
    dim = state_dict["tok_embeddings.weight"].shape[1] if "tok_embeddings.weight" in state_dict \
        else state_dict["output.weight"].shape[1]
    vocab = state_dict["output.weight"].shape[0]
    n_layers = len({int(m.group(1)) for k in state_dict for m in [re.match(r"layers\.(\d+)\.", k)] if m})
    n_heads = 16
    kv_rows = state_dict["layers.0.attention.wk.weight"].shape[0]
    use_moe = "layers.0.feed_forward.gate.weight" in state_dict
    ffn = "layers.0.feed_forward.experts.0.w1.weight" if use_moe else "layers.0.feed_forward.w1.weight"
    kw = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=kv_rows // (dim // n_heads),
              vocab_size=vocab, hidden_dim=state_dict[ffn].shape[0], use_moe=use_moe, image_ids=list(image_ids))
    if use_moe:
        kw["n_routed_experts"] = state_dict["layers.0.feed_forward.gate.weight"].shape[0]
        kw["n_shared_experts"] = "layers.0.feed_forward.shared_experts.w1.weight" in state_dict
    return LMConfig(**kw)


def _config(path, key) -> LMConfig:
    """The LMConfig under `key` in a JSON file (a sidecar or an export's config.json), or CheckpointError
    naming the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))[key]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the model config in {path}: {type(e).__name__}: {e}") from None
    try:
        return LMConfig.from_dict(d)
    except (TypeError, ValueError) as e:  # unknown fields or impossible values
        raise CheckpointError(f"the model config in {path} is not valid: {e}") from None


def load_vlm(ckpt_path, tokenizer, device="cpu"):
    """A MiniMindVLM from a .safetensors/.pth checkpoint (config from its sidecar JSON, else inferred from
    tensor shapes) or from a directory written by export_model.py."""
    sd = read_state_dict(ckpt_path)
    image_ids = image_token_ids(tokenizer)
    if Path(ckpt_path).is_dir():  # export_model.py's directory: LMConfig inside config.json
        cfg = _config(Path(ckpt_path) / "config.json", "lm_config")
    elif sidecar_path(ckpt_path).is_file():
        cfg = _config(sidecar_path(ckpt_path), "config")
    else:  # upstream's files have no sidecar
        try:
            cfg = infer_config(sd, image_ids)
        except (KeyError, IndexError, ZeroDivisionError) as e:
            raise CheckpointError(f"{ckpt_path} has no sidecar JSON and its tensors are not a MiniMind-V model's "
                                  f"(no {e})") from None
    if list(cfg.image_ids) != list(image_ids):
        raise CheckpointError(f"{ckpt_path} was trained with placeholder ids {cfg.image_ids[:1]}x50, but this "
                         f"tokenizer gives {image_ids[:1]}...: use the tokenizer it was trained with")
    model = MiniMindVLM(cfg)
    load_strict(model, sd, where=str(ckpt_path))
    return model.eval().to(device), cfg
