"""Reading and writing model weights: safe (no unpickling of code), strict (every mismatch is an error that
lists the keys), atomic (a kill during a save leaves the previous file intact)."""
import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch

from .hf_formats import PROJECTOR_FILE, StockFormatError, from_llama, from_llava, is_llava_tower_key
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path, dtype=None, keep=None) -> dict:
    """Tensors of a .safetensors file, read one at a time with plain file reads and floating-point ones
    converted to `dtype` as they are read; `keep(name)` chooses which. Unlike safetensors' own memory-mapped
    loader, the file's pages never count in this process's resident memory, and an fp32 file becomes bf16
    weights without an fp32 copy of the whole: what the 0.6 GB inference footprint needs. The format is a
    little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    size = os.path.getsize(path)
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(size - 8, 100 * 2 ** 20):
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__" or (keep is not None and not keep(name)):
                continue
            begin, end = info["data_offsets"]
            src = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            if not 0 <= begin <= end <= size - base or end - begin != math.prod(shape) * src.itemsize:
                raise ValueError(f"tensor {name}: data_offsets {info['data_offsets']} do not fit its shape "
                                 f"{list(shape)} or the file")
            f.seek(base + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"tensor {name}: the file ends inside its data")
            t = torch.frombuffer(buf, dtype=src) if buf else torch.empty(0, dtype=src)
            t = t.reshape(shape)
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


@contextlib.contextmanager
def weightless():
    """Build modules on the meta device with torch.nn.init's in-place initialisers turned off: shapes only, for
    weights that a file then supplies (load_state_dict(..., assign=True)). Initialising meta tensors would
    load torch's symbolic machinery (sympy, dynamo: ~75 MB resident) to compute nothing."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def read_state_dict(path, dtype=None) -> dict:
    """Tensors from a .pth (torch.load with weights_only=True) or a .safetensors file; floating-point ones
    in `dtype` if given."""
    path = str(path)
    if os.path.isdir(path):  # a directory written by export_model.py
        return read_export(path, dtype)[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            sd = read_safetensors(path, dtype)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if dtype is not None and isinstance(sd, dict):
                sd = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in sd.items()}
    except Exception as e:  # truncated file, not a checkpoint, or a pickle that wants to run code
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, damaged or not a checkpoint): "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):  # {"model": state_dict, ...} wrappers
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    # torch.compile and DDP wrappers prefix every key; the weights are the same.
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in sd.items()}


def read_export(path, dtype=None):
    """(state dict under MiniMind-V's names, LMConfig fields) of a directory export_model.py wrote, in any
    --format, or that transformers saved from one (a LLaVA or Llama model fine-tuned elsewhere comes home): the
    stock formats converted back by hf_formats (their fields carry no image_ids: the tokenizer gives them)."""
    path = Path(path)
    config = _read_json(path / "config.json", f"{path} is a directory without config.json (not an export_model.py "
                        "export)")
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in ("minimind_v", "llava", "llama"):
        raise CheckpointError(f"{path / 'config.json'}: model_type {kind!r} is none of the formats export_model.py "
                              "writes (llava, llama, minimind_v)")
    keep = (lambda k: not is_llava_tower_key(k)) if kind == "llava" else None  # --vision_model's is used
    tensors = _read_weights_dir(path, dtype, keep)
    try:
        if kind == "minimind_v":
            if not isinstance(config.get("lm_config"), dict):
                raise CheckpointError(f"{path / 'config.json'} has no lm_config (MiniMind-V's settings)")
            return {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()}, \
                config["lm_config"]
        if kind == "llava":
            return from_llava(config, tensors, str(path))
        projector = path / PROJECTOR_FILE
        return from_llama(config, tensors, str(path), read_state_dict(projector, dtype)
                          if projector.is_file() else None)
    except StockFormatError as e:
        raise CheckpointError(str(e)) from None


def _read_json(path, missing_message):
    if not Path(path).is_file():
        raise CheckpointError(missing_message)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _read_weights_dir(path: Path, dtype=None, keep=None) -> dict:
    """The tensors of a transformers directory: model.safetensors, or the shards model.safetensors.index.json
    lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} is a directory without model.safetensors (not an export_model.py export)")
    tensors = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} (listed in {index}) does not exist")
        try:
            tensors.update(read_safetensors(f, dtype, keep))
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {f} (truncated, damaged or not safetensors): "
                                  f"{type(e).__name__}: {e}") from None
    return tensors


def load_strict(model, state_dict, allow_missing=(), where="checkpoint", assign=False):
    """Load every tensor; anything missing (outside the allow-listed prefixes), unexpected or of the wrong
    shape is an error naming the keys. assign=True makes the tensors themselves the parameters (for a model
    built on the meta device)."""
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
    model.load_state_dict(state_dict, strict=False, assign=assign)  # strictness checked above, with the allow-list


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
    """The LMConfig under `key` in a JSON file (a sidecar), or CheckpointError naming the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))[key]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the model config in {path}: {type(e).__name__}: {e}") from None
    return _lm_config(d, path)


def _lm_config(d: dict, path) -> LMConfig:
    try:
        return LMConfig.from_dict(d)
    except (TypeError, ValueError) as e:  # unknown fields or impossible values
        raise CheckpointError(f"the model config in {path} is not valid: {e}") from None


UPSTREAM_TRAINED_LEN = 200  # upstream v1 trains both stages at its LMConfig.max_seq_len, 200 tokens


def trained_context(ckpt_path):
    """(tokens, how it is known): the sequence length a checkpoint was trained with, which is what serving admits
    as prompt + answer (RoPE positions beyond it were never trained). From the training script's sidecar JSON (the
    run's --max_seq_len), or an export's config (max_position_embeddings; lm_config.max_seq_len for --format
    minimind, both written from the trained length); (None, why) where the file does not say (upstream's .pth)."""
    p = Path(ckpt_path)
    try:
        if p.is_dir():
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
            text = config.get("text_config", config)
            n = text.get("max_position_embeddings") or (config.get("lm_config") or {}).get("max_seq_len")
            return (int(n), f"{p / 'config.json'}") if n else (None, f"{p / 'config.json'} gives no length")
        if sidecar_path(p).is_file():
            meta = json.loads(sidecar_path(p).read_text(encoding="utf-8"))
            n = (meta.get("args") or {}).get("max_seq_len")
            return (int(n), f"the training run's --max_seq_len ({sidecar_path(p)})") if n else (
                None, f"{sidecar_path(p)} records no training length")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        return None, f"its config could not be read ({type(e).__name__}: {e})"
    return None, f"{p} has no sidecar JSON (upstream's files do not record their training length)"


def load_vlm(ckpt_path, tokenizer, device="cpu", dtype=torch.float32):
    """A MiniMindVLM, its weights in `dtype`, from a .safetensors/.pth checkpoint (config from its sidecar
    JSON, else inferred from tensor shapes) or from a directory written by export_model.py in any --format (a
    stock LLaVA or Llama one takes its placeholder ids from `tokenizer`). The model is built on the meta device
    and takes the file's tensors as its weights: no random init, no second copy."""
    image_ids = image_token_ids(tokenizer)
    if Path(ckpt_path).is_dir():
        sd, fields = read_export(ckpt_path, dtype)
        cfg = _lm_config({"image_ids": image_ids, **fields}, Path(ckpt_path) / "config.json")
    else:
        sd = read_state_dict(ckpt_path, dtype)
        if sidecar_path(ckpt_path).is_file():
            cfg = _config(sidecar_path(ckpt_path), "config")
        else:  # upstream's files have no sidecar
            try:
                cfg = infer_config(sd, image_ids)
            except (KeyError, IndexError, ZeroDivisionError) as e:
                raise CheckpointError(f"{ckpt_path} has no sidecar JSON and its tensors are not a MiniMind-V "
                                      f"model's (no {e})") from None
    if list(cfg.image_ids) != list(image_ids):
        raise CheckpointError(f"{ckpt_path} was trained with placeholder ids {cfg.image_ids[:1]}x50, but this "
                         f"tokenizer gives {image_ids[:1]}...: use the tokenizer it was trained with")
    with weightless():
        model = MiniMindVLM(cfg)
    load_strict(model, sd, where=str(ckpt_path), assign=True)
    model.tok_embeddings.weight = model.output.weight  # assign replaced each by its own tensor: tie them again
    model.init_buffers()  # RoPE tables and placeholder ids (not in the file)
    return model.eval().to(device), cfg
