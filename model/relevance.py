"""Where did it look? For one answer, the share of the answer's evidence that each image token carries, and the
picture of it: a 7x7 heatmap over the image plus the CLS token's share.

The method: gradient x input on the projected image tokens. An image enters the decoder as 50 vectors x_i (CLS
+ 7x7 patches, each CLIP token through the projector); the answer a_1..a_m is scored by its log-probability
given the conversation, f = sum_t log p(a_t | conversation, a_<t) (the tokens the model wrote, not the closing
</s>: when to stop is not what the heatmap is asked about). One backward pass gives g_i = df/dx_i, and token i's
evidence is the L2 norm of g_i * x_i (elementwise): the first-order Taylor term of f along x_i, aggregated over
the embedding's width as is usual for token attributions (Shrikumar et al. 2017, "Learning important features
through propagating activation differences"; Ancona et al. 2018 on gradient x input; the L2 aggregation is the
default of the inseq toolkit). Each image's 50 evidences are divided by their sum: the shares add up to 1.

Why this one, over attention rollout (Abnar & Zuidema 2020), the other standard choice: rollout multiplies
attention maps and so ignores what the values, the feed-forward layers and the output head do with the image,
and assumes the residual stream weighs as much as attention at every layer; gradient x input follows the
model's actual arithmetic from the image tokens to the answer's probability, in one forward and one backward
pass (about three prompt prefills: ~15-20 ms for the demo model on a CPU core). It is local (a first-order
Taylor term, not a full account of a non-linear model) and measures tokens, not pixels: the frozen CLIP tower
has already mixed every patch's token with the others through 12 layers of attention, so a patch token's share
is the evidence the decoder took from that token, which carries mostly, not only, its own 32x32 pixels.

Deterministic: no sampling, dropout must be off (model.eval()), and the same inputs give the same shares on the
same machine (on CUDA the attention runs in PyTorch's plain kernel for this: see _deterministic_attention). The model's own weights run in their own dtype (bf16 where the engine holds bf16); the
log-probabilities are computed in fp32 (the model's loss does that) and so are the gradient x input products.
No weight changes and no .grad is left behind: only the substituted image tokens receive a gradient
(torch.autograd.grad). It runs only when asked, after the answer: ChatEngine.explain hands it to the engine's
own thread like an image encode (model/engine.py says why tensor work stays on that thread).

For datasets that know where the object is, `evidence_on_target` compares the share of the patches' evidence
that falls on the patches the object covers (more than TARGET_COVERAGE of a patch) with the share of the image
they make up: a model that looks at the object puts more there than the area alone would.
"""
import contextlib
import textwrap
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .images import IMAGE_SIZE, PATCH_SIZE
from .LMConfig import N_IMAGE_TOKENS

GRID = IMAGE_SIZE // PATCH_SIZE  # 7: the image tokens after CLS are a 7x7 grid of patches, row by row
TARGET_COVERAGE = 0.2  # a patch is on the object when the object covers more than this share of its pixels


@dataclass(frozen=True)
class ImageRelevance:
    """One image's share of an answer's evidence: `cls` on the CLS token (the tower's summary of the whole
    image), `grid` (7, 7) on the patches, row by row as the image is read; cls + grid.sum() == 1. `share`: this
    image's part of the evidence all of the conversation's images carry (1.0 for a single image)."""
    cls: float
    grid: np.ndarray
    share: float = 1.0

    @classmethod
    def from_token_scores(cls, scores, share: float = 1.0) -> "ImageRelevance":
        """From 50 non-negative evidences (CLS first, then the patches row by row). An image that carries no
        evidence at all (every score 0) gets equal shares: no token stands out."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (N_IMAGE_TOKENS,) or not np.all(scores >= 0):
            raise ValueError(f"expected {N_IMAGE_TOKENS} non-negative token scores, got shape {scores.shape}")
        total = scores.sum()
        shares = scores / total if total > 0 else np.full(N_IMAGE_TOKENS, 1.0 / N_IMAGE_TOKENS)
        return cls(float(shares[0]), shares[1:].reshape(GRID, GRID), float(share))

    def to_json(self, digits: int = 5) -> dict:
        """{"cls": float, "grid": 7 rows of 7 floats, "share": float}, rounded to `digits` decimals."""
        return {"cls": round(self.cls, digits), "grid": np.round(self.grid, digits).tolist(),
                "share": round(self.share, digits)}

    def describe(self) -> str:
        """One line for people: where the evidence is."""
        row, col = np.unravel_index(int(self.grid.argmax()), self.grid.shape)
        return (f"{self.grid.sum():.0%} of the evidence on the {GRID * GRID} patches (the most, "
                f"{self.grid.max():.0%}, on row {row + 1}, column {col + 1}), {self.cls:.0%} on the CLS token")


def answer_relevance(model, input_ids: List[int], image_features: torch.Tensor,
                     answer_start: int) -> List[ImageRelevance]:
    """Gradient x input relevance (see the module docstring) of each image in a conversation for its answer.

    input_ids: the prompt's ids (with one 50-id placeholder per image) followed by the answer's ids;
    answer_start: where the answer begins (input_ids[answer_start:] is scored; at least one id);
    image_features: (n_images, 50, vision_dim) CLIP features, in the placeholders' order.
    Returns one ImageRelevance per image. Raises ValueError for inputs that cannot be explained."""
    if model.training:
        raise ValueError("the model is in training mode: dropout would make the relevance random (call .eval())")
    if image_features is None or image_features.dim() != 3 or image_features.shape[0] == 0:
        raise ValueError("no image to explain: image_features must be (n_images >= 1, 50, vision_dim)")
    if not 0 < answer_start < len(input_ids):
        raise ValueError(f"no answer to explain: the answer must start inside the {len(input_ids)} ids "
                         f"after the prompt (answer_start={answer_start})")
    device = model.output.weight.device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    labels = torch.full_like(ids, -100)  # the loss is taken on the answer's ids only
    labels[0, answer_start:] = ids[0, answer_start:]
    # A plain copy: features made under inference_mode cannot take part in autograd.
    features = image_features.detach().to(device, torch.float32).clone()
    tokens = []

    def substitute(module, inputs, projected):
        """The projector's output, replaced by a leaf tensor that collects the gradient (in fp32)."""
        leaf = projected.detach().float().requires_grad_(True)
        tokens.append(leaf)
        return leaf.to(projected.dtype)

    hook = model.vision_proj.register_forward_hook(substitute)
    try:
        with torch.inference_mode(False), torch.enable_grad(), _deterministic_attention(device):
            out = model(ids, [features], labels=labels, loss_only=True)
            n_answer = len(input_ids) - answer_start
            log_prob = -out.loss * n_answer  # the loss is the mean negative log-probability of the answer's ids
            (grad,) = torch.autograd.grad(log_prob, tokens[0])
    finally:
        hook.remove()
    scores = (grad * tokens[0].detach()).norm(dim=-1).double().cpu().numpy()  # (n_images, 50)
    per_image = scores.sum(axis=1)
    total = per_image.sum()
    return [ImageRelevance.from_token_scores(s, float(p / total) if total > 0 else 1.0 / len(scores))
            for s, p in zip(scores, per_image)]


def _deterministic_attention(device):
    """On CUDA, attention through PyTorch's plain (math) kernel: the flash and memory-efficient kernels' backward
    passes may add their partial sums in a different order from run to run. A prompt is short, so the cost is
    small. (The CPU kernels repeat exactly: tests/test_relevance.py. The CUDA path was not run for this change.)"""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def target_patches(coverage: np.ndarray) -> np.ndarray:
    """(7, 7) booleans: the patches an object covers by more than TARGET_COVERAGE (coverage from
    model.images.patch_coverage)."""
    coverage = np.asarray(coverage)
    if coverage.shape != (GRID, GRID):
        raise ValueError(f"patch coverage must be {GRID}x{GRID}, got {coverage.shape}")
    return coverage > TARGET_COVERAGE


def evidence_on_target(relevance: ImageRelevance, coverage: np.ndarray) -> Optional[dict]:
    """{"evidence": share of the patches' evidence on the object's patches, "area": their share of the 49
    patches} for one image and its object's patch coverage; None when no patch counts as the object's (too small
    to locate at this resolution). The CLS token is left out of both: it is no place in the image."""
    target = target_patches(coverage)
    if not target.any():
        return None
    patches = relevance.grid.sum()
    evidence = float(relevance.grid[target].sum() / patches) if patches > 0 else float(target.mean())
    return {"evidence": round(evidence, 5), "area": round(float(target.mean()), 5)}


def summarize_evidence(pairs) -> dict:
    """The mean over images of {"evidence", "area"} dicts (evidence_on_target's), with how many images
    ("located"), the ratio of the means ("ratio": evidence per unit of area; 1.0 is no preference for the object)
    and the share of images whose evidence is at least twice their area ("at_2x")."""
    pairs = [p for p in pairs if p is not None]
    if not pairs:
        return {"located": 0}
    evidence = float(np.mean([p["evidence"] for p in pairs]))
    area = float(np.mean([p["area"] for p in pairs]))
    at_2x = float(np.mean([p["evidence"] >= 2 * p["area"] for p in pairs]))
    return {"located": len(pairs), "evidence_on_target": round(evidence, 4), "area_of_target": round(area, 4),
            "ratio": round(evidence / area, 3), "at_2x": round(at_2x, 4)}


# -- the picture -------------------------------------------------------------------------------------------

# Fonts with Chinese glyphs, used where installed (matplotlib falls back through the list per character); without
# one, Chinese text in a caption shows as boxes.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "Microsoft YaHei", "PingFang SC", "SimHei", "Heiti SC", "AR PL UMing CN")


def _font_families():
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in CJK_FONTS if name in installed]


def draw_heatmap(image, relevance: ImageRelevance, caption: Optional[str] = None, target=None, alpha: float = 0.8):
    """The picture of one image's relevance, as an RGB PIL image: on the left the image as the model sees it (its
    224x224 centre square); on the right the same square in grey with the 7x7 patch shares laid over it,
    semi-transparent (the more evidence, the redder and the more opaque, up to `alpha`), the CLS token's share above it and a
    colour scale in percent beside it; `caption` (the question and answer, say) below; `target` ((7, 7) booleans,
    see target_patches), where the object is, outlined on the evidence. The overlay goes on grey
    because the shapes come in every hue of a colour scale: an orange shape under orange evidence would be
    unreadable. The scale runs from 0 to the largest patch share, but at least twice the share each patch would
    get if none stood out (2/49), so that an even spread does not look like a hot spot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from PIL import Image

    from .images import clip_square, to_rgb
    square = clip_square(to_rgb(image))
    grey = np.asarray(square.convert("L").convert("RGB"), dtype=np.float64)
    vmax = max(float(relevance.grid.max()), 2.0 / relevance.grid.size)
    scale = ScalarMappable(Normalize(0.0, vmax), "YlOrRd")
    # Each patch's colour is its share on the scale, and so is its opacity: a patch without evidence shows the
    # image as it is, the patch with the most is `alpha` opaque (the square root lets a quarter of the top share
    # show at half of that). Blended here, pixel by pixel: matplotlib's resampling would smear the patch borders.
    colour = scale.to_rgba(relevance.grid)[..., :3] * 255.0
    opacity = (alpha * np.sqrt(np.clip(relevance.grid / vmax, 0.0, 1.0)))[..., None]
    per_pixel = lambda patches: patches.repeat(PATCH_SIZE, axis=0).repeat(PATCH_SIZE, axis=1)  # noqa: E731
    overlay = (grey * (1.0 - per_pixel(opacity)) + per_pixel(colour * opacity)).round().astype(np.uint8)

    lines = []
    for paragraph in (caption or "").splitlines():
        lines += textwrap.wrap(paragraph, 80) or [""]
    panel, line = 3.2, 0.24  # inches: the height of the image row, of a caption line
    width, height = 7.4, panel + 0.5 + line * len(lines)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fonts = _font_families()
    bottom = (line * len(lines) + 0.1) / height  # the images sit above the caption
    extent = (0, IMAGE_SIZE, IMAGE_SIZE, 0)
    for k, (picture, title) in enumerate([(np.asarray(square), "the image"),
                                          (overlay, f"the answer's evidence (CLS token: {relevance.cls:.0%})")]):
        ax = fig.add_axes((0.02 + 0.44 * k, bottom, 0.42, panel / height))
        ax.imshow(picture, extent=extent, interpolation="bilinear")
        ax.set_axis_off()
        ax.set_title(title, fontsize=10, fontfamily=fonts)
    for edge in range(PATCH_SIZE, IMAGE_SIZE, PATCH_SIZE):  # the patch borders, on the evidence
        ax.axhline(edge, color="white", linewidth=0.4, alpha=0.4)
        ax.axvline(edge, color="white", linewidth=0.4, alpha=0.4)
    if target is not None:  # the outline of the object's patches: each side a target patch shares with a non-target
        inside = np.pad(np.asarray(target, dtype=bool), 1)
        for row, col in zip(*np.nonzero(inside)):
            x, y = (col - 1) * PATCH_SIZE, (row - 1) * PATCH_SIZE
            for (dr, dc), (xs, ys) in [((-1, 0), ([0, 1], [0, 0])), ((1, 0), ([0, 1], [1, 1])),
                                       ((0, -1), ([0, 0], [0, 1])), ((0, 1), ([1, 1], [0, 1]))]:
                if not inside[row + dr, col + dc]:
                    ax.plot([x + PATCH_SIZE * v for v in xs], [y + PATCH_SIZE * v for v in ys], color="#1565c0",
                            linewidth=1.6, solid_capstyle="projecting")
        ax.set_xlim(0, IMAGE_SIZE)
        ax.set_ylim(IMAGE_SIZE, 0)
    bar = fig.colorbar(scale, cax=fig.add_axes((0.89, bottom + 0.03 * panel / height, 0.02, 0.94 * panel / height)))
    bar.ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    bar.ax.tick_params(labelsize=8)
    bar.set_label("share per patch", fontsize=8)
    for k, text in enumerate(lines):
        fig.text(0.02, (len(lines) - k - 0.6) * line / height, text, fontsize=10, fontfamily=fonts)
    # Chinese text without a CJK font warns once per glyph; only a caption can hold any (and the web demo, which
    # draws from several threads, gives none: catch_warnings changes process-wide state)
    if lines:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.canvas.draw()
    else:
        fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())
