#!/usr/bin/env python
"""Generate an offline demo dataset of coloured shapes in LLaVA JSON-lines format.

Every image shows exactly ONE large shape (circle, square, triangle or cross) in one
of six clearly distinct colours on a light background.  The dataset is meant for a
tiny vision-language model that looks at images through a frozen, randomly
initialised CLIP ViT-B/32, so colour and shape are made easy to see at the 32 px
patch level: big solid shapes, saturated colours, pale low-contrast backgrounds.

Files written to ``out_dir``::

    images/train_000000.jpg ...   training images (shared by pretrain and SFT)
    images/eval_000000.jpg ...    held-out images (only used by the eval files)
    images/eval_000000_mask.png   each held-out image's shape mask (where the object is, for evaluation)
    pretrain.jsonl                one caption record per training image
    sft.jsonl                     one 2-turn colour + shape QA record per training image
    eval_color.jsonl              one colour question per held-out image (its "mask" names the shape's mask)
    eval_shape.jsonl              one shape question per held-out image (likewise)
    meta.json                     counts, vocabularies, seed

plus up to 8 held-out sample images copied into ``eval_images_dir`` with
human-readable names (``01_red_circle.jpg``) for the terminal chat demo.

Usage::

    python scripts/make_demo_data.py --out_dir dataset/demo --n_train 10000 --n_eval 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.cli import HelpFormatter  # noqa: E402

try:  # tqdm is a soft dependency: fall back to a plain iterator.
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it, **_kw):  # type: ignore
        return it


# ---------------------------------------------------------------------------
# Vocabularies (importable by other code, e.g. the demo report / evaluation)
# ---------------------------------------------------------------------------

IMAGE_TOKEN = "<image>"

# Base RGB values; each image jitters every channel by up to +-COLOR_JITTER.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 215),
    "yellow": (235, 220, 30),
    "purple": (135, 40, 175),
    "orange": (240, 120, 20),
}
COLOR_NAMES: List[str] = list(COLORS)
COLOR_ZH: Dict[str, str] = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
}
COLOR_JITTER = 20

SHAPES: List[str] = ["circle", "square", "triangle", "cross"]
SHAPE_ZH: Dict[str, str] = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "cross": "十字形",
}

LANGS: List[str] = ["en", "zh"]

# Canonical short answers per language (what SFT / eval answers are exactly equal to).
COLOR_ANSWERS: Dict[str, Dict[str, str]] = {
    "en": {c: c for c in COLOR_NAMES},
    "zh": dict(COLOR_ZH),
}
SHAPE_ANSWERS: Dict[str, Dict[str, str]] = {
    "en": {s: s for s in SHAPES},
    "zh": dict(SHAPE_ZH),
}
CANONICAL_ANSWERS = frozenset(
    list(COLOR_ANSWERS["en"].values()) + list(COLOR_ANSWERS["zh"].values())
    + list(SHAPE_ANSWERS["en"].values()) + list(SHAPE_ANSWERS["zh"].values())
)

# Shape size (in px at 224 px image size): circle radius, square / triangle
# circumradius, cross half-size (centre to arm tip).  Scaled with image_size.
# The defaults keep shapes large, upright and near the centre, because shape is what a small decoder finds
# hard to read through the frozen *random* CLIP tower (colour is 100% in every setting tried). Measured with
# the demo's training (README, "What the demo shows"): shapes anywhere, any rotation, 40-90 px: 38% shape
# accuracy; 55-95 px, within 40 px of the centre, rotation up to 15 degrees: 56-84% depending on the seed.
SIZE_RANGE = (60.0, 95.0)
MAX_ROTATION_DEG = 0.0        # non-circles are rotated uniformly in [-max, +max] degrees
MAX_OFFSET = 24.0             # shape centre at most this far (px at 224) from the image centre
CROSS_ARM_WIDTH = 1.0 / 3.0   # arm width as a fraction of the full cross size (2 * half-size)
NOISE_STD = 4.0               # mild Gaussian pixel noise (0..255 scale)
JPEG_QUALITY = 90
# What the held-out records' masks are; meta.json records it, so that scripts/demo.py makes the data again when a
# dataset was generated without them (or in another format).
MASK_FORMAT = "eval_NNNNNN_mask.png: greyscale PNG at the image's size, 255 on the shape, anti-aliased edge"
N_EVAL_SAMPLES = 8            # images copied to eval_images_dir

# ---------------------------------------------------------------------------
# Prompt / caption / question templates
# ---------------------------------------------------------------------------

CAPTION_PROMPTS: Dict[str, List[str]] = {
    "en": [
        "Describe this image.",
        "What is in this picture?",
        "Give a short description of the image.",
        "What do you see in this image?",
        "Write a caption for this image.",
        "Briefly describe the picture.",
    ],
    "zh": [
        "请描述这张图片。",
        "图片里有什么？",
        "简要描述一下这张图片。",
        "你在图中看到了什么？",
        "请为这张图片写一句描述。",
        "这张图片的内容是什么？",
    ],
}

# {color} / {shape} are filled with the English words or the Chinese words.
CAPTION_TEMPLATES: Dict[str, List[str]] = {
    "en": [
        "A {color} {shape} on a light background.",
        "There is a {color} {shape} in the image.",
        "The image shows a single {color} {shape}.",
        "A single {color} {shape} on a pale background.",
        "This picture contains one {color} {shape}.",
        "One large {color} {shape} on a plain light background.",
    ],
    "zh": [
        "浅色背景上有一个{color}的{shape}。",
        "图中有一个{color}的{shape}。",
        "这张图片展示了一个{color}{shape}。",
        "画面中是一个{color}的{shape}，背景是浅色的。",
        "一个{color}的{shape}位于浅色背景上。",
        "图片里只有一个较大的{color}{shape}。",
    ],
}

COLOR_QUESTIONS: Dict[str, List[str]] = {
    "en": [
        "What colour is the shape?",
        "What color is the shape in the image?",
        "Which colour is the object?",
        "What is the color of the shape? Answer with one word.",
        "Name the colour of the shape.",
    ],
    "zh": [
        "图中形状是什么颜色？",
        "这个形状是什么颜色的？",
        "图片中物体的颜色是什么？",
        "请说出图形的颜色。",
        "这个图形是什么颜色？用一个词回答。",
    ],
}

SHAPE_QUESTIONS: Dict[str, List[str]] = {
    "en": [
        "What shape is it?",
        "What shape is shown in the image?",
        "Which shape is in the picture?",
        "What is the shape of the object? Answer with one word.",
        "Name the shape in the image.",
    ],
    "zh": [
        "这是什么形状？",
        "图中是什么形状？",
        "图片里的物体是什么形状的？",
        "请说出图中的形状。",
        "这个图形是什么形状？用一个词回答。",
    ],
}

_SPLIT_IDS = {"train": 1, "eval": 2}


# ---------------------------------------------------------------------------
# Image rendering
# ---------------------------------------------------------------------------

def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]], dtype=np.float64)
    return points @ rot.T


def shape_polygon(shape: str, size: float, angle: float) -> Optional[np.ndarray]:
    """Vertices (N, 2) centred on the origin, or None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        # circumradius = size -> half-side = size / sqrt(2)
        h = size / math.sqrt(2.0)
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif shape == "triangle":
        # equilateral, circumradius = size
        a = np.deg2rad([-90.0, 30.0, 150.0])
        pts = np.stack([np.cos(a) * size, np.sin(a) * size], axis=1)
    elif shape == "cross":
        # plus sign: half-size = size (centre to arm tip), arm width = (2*size)/3
        L, w = size, size * CROSS_ARM_WIDTH
        pts = np.array([
            [-w, -L], [w, -L], [w, -w], [L, -w], [L, w], [w, w],
            [w, L], [-w, L], [-w, w], [-L, w], [-L, -w], [-w, -w],
        ])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _rotate(pts, angle)


def _pale_color(rng: np.random.Generator) -> np.ndarray:
    """A light grey or pale tint with every channel in [190, 255]."""
    if rng.random() < 0.5:  # light grey
        level = rng.uniform(195.0, 248.0)
        return np.clip(np.full(3, level) + rng.uniform(-2.0, 2.0, size=3), 190.0, 255.0)
    level = rng.uniform(220.0, 252.0)  # pale tint
    return np.clip(level - rng.uniform(0.0, 30.0, size=3), 190.0, 255.0)


def _background(rng: np.random.Generator, n: int) -> Image.Image:
    """Light background (all channels >= 190 before noise): flat colour or soft gradient."""
    c1 = _pale_color(rng)
    if rng.random() < 0.5:
        return Image.new("RGB", (n, n), tuple(int(round(v)) for v in c1))
    c2 = _pale_color(rng)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    coords = np.arange(n, dtype=np.float32)
    t = coords[None, :] * np.float32(math.cos(theta)) + coords[:, None] * np.float32(math.sin(theta))
    t -= t.min()
    t *= np.float32(1.0 / max(float(t.max()), 1e-6))
    bg = c1.astype(np.float32) + 0.5 + (c2 - c1).astype(np.float32) * t[..., None]
    return Image.fromarray(bg.astype(np.uint8), mode="RGB")


_NOISE_BANKS: Dict[int, Image.Image] = {}


def _noise_bank(n: int) -> Image.Image:
    """A fixed (2n x 2n) RGB field of Gaussian noise stored as uint8 with offset 128.

    Each image adds a random n x n crop of it (cheap, and deterministic because the
    bank itself comes from a fixed seed and the crop offset from the image's rng).
    """
    bank = _NOISE_BANKS.get(n)
    if bank is None:
        g = np.random.default_rng(20240607)
        noise = np.round(g.standard_normal((2 * n, 2 * n, 3)) * NOISE_STD) + 128.0
        bank = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), mode="RGB")
        _NOISE_BANKS[n] = bank
    return bank


def _shape_extent(shape: str, size: float, angle: float):
    poly = shape_polygon(shape, size, angle)
    if poly is None:
        return poly, np.array([-size, -size]), np.array([size, size])
    return poly, poly.min(axis=0), poly.max(axis=0)


def render_image(rng: np.random.Generator, color: str, shape: str, image_size: int = 224,
                 size_range: Tuple[float, float] = SIZE_RANGE,
                 max_rotation: float = MAX_ROTATION_DEG,
                 max_offset: Optional[float] = MAX_OFFSET) -> Tuple[Image.Image, dict]:
    """Render one image with a single shape.  Returns (PIL image, info): the geometry (size, angle, centre), the
    colour drawn and "mask", the shape's anti-aliased pixel mask (mode L, 255 on the shape)."""
    n = int(image_size)
    scale = n / 224.0
    size = rng.uniform(*size_range) * scale
    angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-max_rotation, max_rotation))
    poly, lo, hi = _shape_extent(shape, size, angle)
    margin = 2.0
    # Centre anywhere the shape fits, or within max_offset px (at 224) of the image centre.
    x0, x1 = margin - lo[0], n - margin - hi[0]
    y0, y1 = margin - lo[1], n - margin - hi[1]
    if max_offset is not None:
        off = max_offset * scale
        x0, x1 = max(x0, n / 2 - off), min(x1, n / 2 + off)
        y0, y1 = max(y0, n / 2 - off), min(y1, n / 2 + off)
    cx = rng.uniform(x0, max(x0, x1))
    cy = rng.uniform(y0, max(y0, y1))

    # Anti-aliased mask: draw at 2x, box-downsample.
    ss = 2
    mask = Image.new("L", (n * ss, n * ss), 0)
    draw = ImageDraw.Draw(mask)
    if poly is None:
        r = size * ss
        draw.ellipse([cx * ss - r, cy * ss - r, cx * ss + r, cy * ss + r], fill=255)
    else:
        pts = (poly + np.array([cx, cy])) * ss
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    mask = mask.reduce(ss)

    base = np.array(COLORS[color], dtype=np.int64)
    fg = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    fg_rgb = tuple(int(v) for v in fg)

    img = _background(rng, n)
    img.paste(fg_rgb, (0, 0, n, n), mask)
    ox, oy = (int(v) for v in rng.integers(0, n + 1, size=2))
    noise = _noise_bank(n).crop((ox, oy, ox + n, oy + n))
    img = ImageChops.add(img, noise, scale=1.0, offset=-128)
    info = {"size": float(size), "angle": float(angle), "center": (float(cx), float(cy)),
            "rgb": list(fg_rgb), "mask": mask}
    return img, info


# ---------------------------------------------------------------------------
# Text records
# ---------------------------------------------------------------------------

def _words(lang: str, color: str, shape: str) -> Tuple[str, str]:
    return COLOR_ANSWERS[lang][color], SHAPE_ANSWERS[lang][shape]


def _pick(rng: np.random.Generator, items: List[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _pick_lang(rng: np.random.Generator) -> str:
    return LANGS[int(rng.integers(len(LANGS)))]


def make_pretrain_record(rng, idx: int, image: str, color: str, shape: str) -> dict:
    lang = _pick_lang(rng)
    c, s = _words(lang, color, shape)
    prompt = _pick(rng, CAPTION_PROMPTS[lang])
    caption = _pick(rng, CAPTION_TEMPLATES[lang]).format(color=c, shape=s)
    return {
        "id": f"pretrain_{idx:06d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
            {"from": "gpt", "value": caption},
        ],
    }


def make_sft_record(rng, idx: int, image: str, color: str, shape: str) -> dict:
    lang = _pick_lang(rng)
    c, s = _words(lang, color, shape)
    qa = [(_pick(rng, COLOR_QUESTIONS[lang]), c), (_pick(rng, SHAPE_QUESTIONS[lang]), s)]
    if rng.random() < 0.5:
        qa.reverse()
    conv = []
    for turn, (q, a) in enumerate(qa):
        conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if turn == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": f"sft_{idx:06d}", "image": image, "conversations": conv}


def make_eval_record(rng, kind: str, idx: int, image: str, color: str, shape: str, mask: str) -> dict:
    lang = _pick_lang(rng)
    c, s = _words(lang, color, shape)
    if kind == "color":
        q, a = _pick(rng, COLOR_QUESTIONS[lang]), c
    else:
        q, a = _pick(rng, SHAPE_QUESTIONS[lang]), s
    return {
        "id": f"eval_{kind}_{idx:06d}",
        "image": image,
        "mask": mask,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"},
            {"from": "gpt", "value": a},
        ],
        "lang": lang,
        "color": color,
        "shape": shape,
        "answer": a,
    }


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

def _image_rng(seed: int, split: str, idx: int) -> np.random.Generator:
    """Independent deterministic stream per (seed, split, index)."""
    return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(idx)])


def _sample_label(rng: np.random.Generator) -> Tuple[str, str]:
    color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return color, shape


def _write_jsonl(path: str, records: List[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _choose_samples(labels: List[Tuple[str, str]], k: int) -> List[int]:
    """Greedily pick up to k eval indices covering as many colours/shapes/combos as possible."""
    chosen: List[int] = []
    seen_c, seen_s, seen_pair = set(), set(), set()
    while len(chosen) < min(k, len(labels)):
        best, best_score = None, None
        for i, (c, s) in enumerate(labels):
            if i in chosen:
                continue
            score = (c not in seen_c) + (s not in seen_s) + 0.5 * ((c, s) not in seen_pair)
            if best_score is None or score > best_score:
                best, best_score = i, score
        chosen.append(best)
        c, s = labels[best]
        seen_c.add(c)
        seen_s.add(s)
        seen_pair.add((c, s))
    return chosen


_GEN_IMAGE_RE = re.compile(r"^(train|eval)_\d+(\.jpg|_mask\.png)$")
_SAMPLE_RE = re.compile(r"^\d{2}_(%s)_(%s)\.jpg$" % ("|".join(COLOR_NAMES), "|".join(SHAPES)))


def make_demo_data(out_dir: str = "dataset/demo", n_train: int = 10000, n_eval: int = 300,
                   eval_images_dir: Optional[str] = "dataset/eval_images", seed: int = 0,
                   image_size: int = 224, progress: bool = True,
                   size_range: Tuple[float, float] = SIZE_RANGE,
                   max_rotation: float = MAX_ROTATION_DEG, max_offset: Optional[float] = MAX_OFFSET) -> dict:
    """Generate the whole demo dataset.  Returns a summary dict.

    The summary includes ``train_labels`` / ``eval_labels``: lists of
    ``{"image", "color", "shape"}`` (generator ground truth, handy for tests).
    """
    t0 = time.time()
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    # Remove stale generated images (e.g. from a previous, larger run).
    for name in os.listdir(img_dir):
        if _GEN_IMAGE_RE.match(name):
            os.remove(os.path.join(img_dir, name))

    pretrain, sft, eval_color, eval_shape = [], [], [], []
    train_labels, eval_labels = [], []
    jobs = [("train", i) for i in range(n_train)] + [("eval", i) for i in range(n_eval)]
    for split, i in tqdm(jobs, desc="demo images", unit="img", disable=not progress):
        rng = _image_rng(seed, split, i)
        color, shape = _sample_label(rng)
        img, info = render_image(rng, color, shape, image_size, size_range, max_rotation, max_offset)
        name = f"{split}_{i:06d}.jpg"
        img.save(os.path.join(img_dir, name), format="JPEG", quality=JPEG_QUALITY)
        mask = f"{split}_{i:06d}_mask.png"  # held-out images only: where the shape is, for evaluation
        if split == "eval":
            info["mask"].save(os.path.join(img_dir, mask), format="PNG")
        label = {"image": name, "color": color, "shape": shape}
        if split == "train":
            train_labels.append(label)
            pretrain.append(make_pretrain_record(rng, i, name, color, shape))
            sft.append(make_sft_record(rng, i, name, color, shape))
        else:
            eval_labels.append(label)
            eval_color.append(make_eval_record(rng, "color", i, name, color, shape, mask))
            eval_shape.append(make_eval_record(rng, "shape", i, name, color, shape, mask))

    files = {
        "pretrain": os.path.join(out_dir, "pretrain.jsonl"),
        "sft": os.path.join(out_dir, "sft.jsonl"),
        "eval_color": os.path.join(out_dir, "eval_color.jsonl"),
        "eval_shape": os.path.join(out_dir, "eval_shape.jsonl"),
        "meta": os.path.join(out_dir, "meta.json"),
    }
    _write_jsonl(files["pretrain"], pretrain)
    _write_jsonl(files["sft"], sft)
    _write_jsonl(files["eval_color"], eval_color)
    _write_jsonl(files["eval_shape"], eval_shape)

    samples: List[str] = []
    if eval_images_dir and n_eval > 0:
        os.makedirs(eval_images_dir, exist_ok=True)
        for name in os.listdir(eval_images_dir):
            if _SAMPLE_RE.match(name):
                os.remove(os.path.join(eval_images_dir, name))
        picks = _choose_samples([(l["color"], l["shape"]) for l in eval_labels], N_EVAL_SAMPLES)
        for k, i in enumerate(picks):
            lab = eval_labels[i]
            dst = os.path.join(eval_images_dir, f"{k + 1:02d}_{lab['color']}_{lab['shape']}.jpg")
            shutil.copyfile(os.path.join(img_dir, lab["image"]), dst)
            samples.append(dst)

    meta = {
        "n_train": n_train,
        "n_eval": n_eval,
        "n_pretrain_records": len(pretrain),
        "n_sft_records": len(sft),
        "n_eval_color_records": len(eval_color),
        "n_eval_shape_records": len(eval_shape),
        "image_size": image_size,
        "seed": seed,
        "colors": COLOR_NAMES,
        "colors_zh": COLOR_ZH,
        "color_rgb": {k: list(v) for k, v in COLORS.items()},
        "shapes": SHAPES,
        "shapes_zh": SHAPE_ZH,
        "languages": LANGS,
        "size_range_px_at_224": list(size_range),
        "max_rotation_deg": max_rotation,
        "max_offset_px_at_224": max_offset,
        "image_dir": "images",
        "eval_masks": MASK_FORMAT,
        "eval_image_samples": [os.path.basename(p) for p in samples],
    }
    with open(files["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)

    return {
        "out_dir": out_dir,
        "files": files,
        "eval_samples": samples,
        "train_labels": train_labels,
        "eval_labels": eval_labels,
        "meta": meta,
        "seconds": time.time() - t0,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate the offline coloured-shapes demo dataset (LLaVA JSON-lines).", formatter_class=HelpFormatter)
    p.add_argument("--out_dir", default="dataset/demo",
                   help="output directory for images/, *.jsonl and meta.json (default: %(default)s)")
    p.add_argument("--n_train", type=int, default=10000,
                   help="number of training images; each gets one pretrain and one SFT record "
                        "(default: %(default)s)")
    p.add_argument("--n_eval", type=int, default=300,
                   help="number of held-out eval images; each gets one eval_color and one "
                        "eval_shape record (default: %(default)s)")
    p.add_argument("--eval_images_dir", default="dataset/eval_images",
                   help="directory that receives %d held-out sample images with readable names "
                        "(e.g. 01_red_circle.jpg) for the chat demo; '' to skip "
                        "(default: %%(default)s)" % N_EVAL_SAMPLES)
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the output is deterministic for a given seed "
                        "(default: %(default)s)")
    p.add_argument("--image_size", type=int, default=224,
                   help="square image side in pixels; shape sizes scale with it "
                        "(default: %(default)s)")
    p.add_argument("--min_size", type=float, default=SIZE_RANGE[0],
                   help="smallest shape size in px at 224 (circle radius, polygon circumradius, "
                        "cross centre-to-tip) (default: %(default)s)")
    p.add_argument("--max_size", type=float, default=SIZE_RANGE[1],
                   help="largest shape size in px at 224 (default: %(default)s)")
    p.add_argument("--max_rotation", type=float, default=MAX_ROTATION_DEG,
                   help="non-circles are rotated by a uniform angle in [-max, +max] degrees "
                        "(default: %(default)s)")
    p.add_argument("--max_offset", type=float, default=MAX_OFFSET,
                   help="shape centre at most this many px (at 224) from the image centre; a negative "
                        "value: anywhere the shape fits (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = make_demo_data(out_dir=args.out_dir, n_train=args.n_train, n_eval=args.n_eval,
                             eval_images_dir=args.eval_images_dir or None, seed=args.seed,
                             image_size=args.image_size, size_range=(args.min_size, args.max_size),
                             max_rotation=args.max_rotation,
                             max_offset=args.max_offset if args.max_offset >= 0 else None)
    m = summary["meta"]
    print(f"Wrote demo dataset to {args.out_dir} in {summary['seconds']:.1f}s")
    print(f"  images:     {m['n_train']} train + {m['n_eval']} eval "
          f"({args.image_size}x{args.image_size} JPEG) in {os.path.join(args.out_dir, 'images')}")
    print(f"  pretrain:   {m['n_pretrain_records']} records  -> {summary['files']['pretrain']}")
    print(f"  sft:        {m['n_sft_records']} records  -> {summary['files']['sft']}")
    print(f"  eval_color: {m['n_eval_color_records']} records  -> {summary['files']['eval_color']}")
    print(f"  eval_shape: {m['n_eval_shape_records']} records  -> {summary['files']['eval_shape']}")
    print(f"  meta:       {summary['files']['meta']}")
    if summary["eval_samples"]:
        print(f"  samples:    {len(summary['eval_samples'])} images in {args.eval_images_dir}: "
              + ", ".join(os.path.basename(p) for p in summary["eval_samples"]))
    print(f"  colours: {', '.join(COLOR_NAMES)} | shapes: {', '.join(SHAPES)} | seed: {args.seed}")
    return summary


if __name__ == "__main__":
    main()
