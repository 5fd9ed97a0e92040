"""Model configuration. Field names follow upstream MiniMind(-V) v1 so their configs and checkpoints map 1:1."""
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

# Each image is N_IMAGE_TOKENS tokens: the CLIP ViT-B/32 sequence at 224px, 7x7 patches + CLS.
N_IMAGE_TOKENS = 50
# The prompt marker that a dataset writes where the image goes, and the 50-character text that replaces it.
IMAGE_MARKER = "<image>"
IMAGE_PLACEHOLDER = "<" * (N_IMAGE_TOKENS // 2) + ">" * (N_IMAGE_TOKENS // 2)
# The ids MiniMind's tokenizer gives the placeholder (25 x '<', 25 x '>'), upstream v1's default. Training and
# loading take them from the tokenizer in use (model/tokenizer.py) and refuse one that disagrees.
UPSTREAM_IMAGE_IDS = [30] * (N_IMAGE_TOKENS // 2) + [32] * (N_IMAGE_TOKENS // 2)


@dataclass
class LMConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 16
    n_kv_heads: Optional[int] = 8
    vocab_size: int = 6400
    hidden_dim: Optional[int] = None  # None: 2/3 * 4 * dim rounded up to multiple_of (SwiGLU convention)
    multiple_of: int = 64
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    rope_theta: float = 1e4
    dropout: float = 0.0
    flash_attn: bool = True  # kept for upstream compatibility; attention always uses F.scaled_dot_product_attention
    # Mixture of experts (used when use_moe=True)
    use_moe: bool = False
    num_experts_per_tok: int = 2
    n_routed_experts: int = 4
    n_shared_experts: bool = True
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.1
    seq_aux: bool = True
    norm_topk_prob: bool = True
    # Vision side
    vision_dim: int = 768  # CLIP ViT-B/32 hidden size
    image_special_token: str = IMAGE_PLACEHOLDER
    image_ids: List[int] = field(default_factory=lambda: list(UPSTREAM_IMAGE_IDS))  # ids of image_special_token

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim} must divide by n_heads={self.n_heads}, "
                             f"and n_heads by n_kv_heads={self.n_kv_heads}")
        if self.scoring_func != "softmax":
            raise ValueError(f"scoring_func={self.scoring_func!r}: only 'softmax' is supported")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LMConfig fields: {unknown}")
        return cls(**d)

