"""The frozen vision side: load a CLIP ViT-B/32 tower, preprocess images, encode them to (50, 768) features.
(Reading image files and the pixel arithmetic itself live in model/images.py, which needs no torch.)

The tower is read from a local directory in Hugging Face layout (what `git clone` of
openai/clip-vit-base-patch32 gives: config.json + model.safetensors or pytorch_model.bin). Nothing is ever
downloaded: a missing directory is an error that says where to put the weights. A seeded random-init tower
exists for the offline demo only, is made only on request, and lives in a directory named `random-...`.
"""
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .images import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, MAX_IMAGE_PIXELS, PREPROCESS_VERSION, clip_pixels, read_image
from .LMConfig import N_IMAGE_TOKENS

DEFAULT_VISION_MODEL = "model/clip_model/clip-vit-base-patch32"
CLIP_DOWNLOAD_HINT = (
    "Download openai/clip-vit-base-patch32 into that directory, e.g.\n"
    "  git clone https://huggingface.co/openai/clip-vit-base-patch32 model/clip_model/clip-vit-base-patch32\n"
    "or, for the offline demo only, make a random tower with `python scripts/make_random_clip.py` "
    "and pass --vision_model model/clip_model/random-clip-vit-base-patch32-seed0")



@dataclass
class CLIPVisionSettings:
    """What the tower's config.json says about its shape (the fields of transformers' CLIPVisionConfig)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


def _vision_config_from_dir(path: Path) -> CLIPVisionSettings:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a Hugging Face model directory.\n{CLIP_DOWNLOAD_HINT}")
    raw = json.loads(cfg_file.read_text())
    # A full CLIPModel keeps the tower's settings under "vision_config"; a CLIPVisionModel at top level.
    vision = raw.get("vision_config", raw)
    cfg = CLIPVisionSettings(**{f.name: vision[f.name] for f in fields(CLIPVisionSettings) if f.name in vision})
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{cfg_file}: hidden_act {cfg.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    n_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    if n_tokens != N_IMAGE_TOKENS or cfg.image_size != IMAGE_SIZE:
        raise ValueError(f"{path}: a {cfg.image_size}px / patch {cfg.patch_size} tower gives {n_tokens} tokens; "
                         f"MiniMind-V v1 needs CLIP ViT-B/32 at 224px ({N_IMAGE_TOKENS} tokens)")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# The tower: CLIP's vision transformer, with the parameter names of transformers' CLIPVisionModel so that
# openai/clip-vit-base-patch32's files load strictly. Written here rather than imported: importing
# transformers' modeling code costs ~90 MB of resident memory and a second of start-up, for ~50 lines.

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionSettings):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, 7, 7)
        patches = patches.flatten(2).transpose(1, 2)  # (N, 49, D)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPVisionSettings):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(4))

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = (p(x).view(N, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(N, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPVisionSettings):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionSettings):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionSettings):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    """pixels (N, 3, 224, 224) -> (N, 50, 768): the encoder's last hidden state (CLS + 49 patch tokens), before
    the post-LayerNorm, as transformers' CLIPVisionModel(...).last_hidden_state. post_layernorm is kept only so
    the file's weights load strictly; MiniMind-V does not use it."""

    def __init__(self, cfg: CLIPVisionSettings):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # (sic: CLIP's own name)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            h = layer(h)
        return h


def _read_tower_state_dict(path: Path, dtype=torch.float32):
    """Vision-tower tensors, in `dtype`, from model.safetensors (preferred; read one tensor at a time with
    checkpoint.read_safetensors, so a full CLIPModel's text half, an fp32 copy of a bf16 tower and the file's
    pages are never in memory) or pytorch_model.bin (weights_only: no code runs)."""
    st, binf = path / "model.safetensors", path / "pytorch_model.bin"
    if st.is_file():
        from .checkpoint import read_safetensors
        text_half = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # a full CLIPModel's
        sd = read_safetensors(st, dtype, keep=lambda k: not k.startswith(text_half))
    elif binf.is_file():
        sd = {k: v.to(dtype) for k, v in torch.load(binf, map_location="cpu", weights_only=True).items()}
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin.\n{CLIP_DOWNLOAD_HINT}")
    if any(k.startswith("vision_model.") for k in sd):  # a full CLIPModel, or a transformers-4 CLIPVisionModel
        sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    sd.pop("embeddings.position_ids", None)  # an index buffer some older files carry
    return sd


def load_vision_model(path: str = DEFAULT_VISION_MODEL, device="cpu", dtype=torch.float32) -> CLIPVisionTower:
    """A frozen, eval-mode CLIP vision tower read strictly from a local directory, its weights in `dtype`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP vision model directory {path} does not exist.\n{CLIP_DOWNLOAD_HINT}")
    cfg = _vision_config_from_dir(path)
    from .checkpoint import weightless
    with weightless():  # no random init to overwrite: the file's tensors become the weights (one copy)
        model = CLIPVisionTower(cfg)
    sd = _read_tower_state_dict(path, dtype)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(v.shape)} vs tower {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: weights do not match a CLIP vision tower.\n  missing: {missing}\n"
                         f"  unexpected: {unexpected}\n  shape mismatches: {shapes}")
    model.load_state_dict(sd, assign=True)
    model.requires_grad_(False)
    return model.eval().to(device)


def make_random_vision_model(out_dir: str, seed: int = 0):
    """Write a seeded, randomly initialised CLIP ViT-B/32 vision tower (the standard architecture and
    transformers' default init) to out_dir. Only for the offline demo: it has never seen an image."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    if "random" not in Path(out_dir).name:
        raise ValueError(f"refusing to write a random tower to {out_dir}: its directory name must say 'random'")
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=IMAGE_SIZE, patch_size=32, projection_dim=512)
    model = CLIPVisionModel(cfg)
    os.makedirs(out_dir, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    d = cfg.to_dict()
    d["architectures"] = ["CLIPVisionModel"]
    d["random_init_seed"] = seed
    Path(out_dir, "config.json").write_text(json.dumps(d, indent=2))
    Path(out_dir, "README.md").write_text(
        f"Randomly initialised CLIP ViT-B/32 vision tower (seed {seed}), made by scripts/make_random_clip.py for\n"
        "the offline demo. It has never been trained; it is NOT openai/clip-vit-base-patch32.\n")
    return out_dir


def preprocess_image(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> (3, 224, 224) float tensor (images.clip_pixels: upright RGB, shortest side to
    224, centre crop, CLIP mean/std, like CLIPProcessor)."""
    return torch.from_numpy(clip_pixels(image))


def load_image(path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """(3, 224, 224) pixels of an image file, or BadImage saying what is wrong with it."""
    return preprocess_image(read_image(path, f"image {path}", max_pixels))


@torch.no_grad()
def encode_images(vision_model, pixel_values: torch.Tensor, dtype=None) -> torch.Tensor:
    """(N, 3, 224, 224) pixels -> (N, 50, 768) float32 features: the encoder's last hidden state, before the
    post-LayerNorm (CLS + 49 patches). One batched call, under autocast when dtype is given."""
    device = next(vision_model.parameters()).device
    pixel_values = pixel_values.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        features = vision_model(pixel_values)
    return features.float()


def pixels_of(images) -> torch.Tensor:
    """(n, 3, 224, 224) pixels of a list of PIL images (see preprocess_image)."""
    return torch.stack([preprocess_image(im) for im in images])


def cached_features(vision_model, keys, cache, new_keys=(), new_pixels=None, dtype=None) -> torch.Tensor:
    """(len(keys), 50, 768) features of the images named by `keys`, through a feature cache (anything with
    `in`, get and put, such as trainer/feature_cache.py's): each of `new_pixels` (aligned with `new_keys`)
    whose key is not cached yet is encoded and added; then every feature is read from the cache, fp16 as it
    stores them (kept aside as such if the cache had no room for it)."""
    fresh = {}
    todo = [i for i, k in enumerate(new_keys) if k not in cache]
    if todo:
        for i, f in zip(todo, encode_images(vision_model, new_pixels[todo], dtype)):
            cache.put(new_keys[i], f)
            fresh[new_keys[i]] = f.to("cpu", torch.float16)
    return torch.stack([cache.get(k) if k in cache else fresh[k] for k in keys]).float()


def vision_fingerprint(path: str) -> str:
    """Identifies the encoder for the feature cache: a hash of its config and weight bytes plus the
    preprocessing. A copy of the same weights elsewhere shares cached features; any changed byte does not."""
    import hashlib
    h = hashlib.blake2b(digest_size=8)
    h.update(f"size{IMAGE_SIZE}|{PREPROCESS_VERSION}|".encode() + CLIP_MEAN.tobytes() + CLIP_STD.tobytes())
    p = Path(path)
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        f = p / name
        if f.is_file():
            h.update(name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()
