"""scripts/make_demo_data.py on tiny generated sets: records parse and their images exist (224x224 RGB
JPEG); file names hide the labels; held-out images never appear in training; SFT answers and captions match
the drawn colour and shape; each held-out image's mask covers its shape; the metadata; the output is
deterministic per seed.
"""

import hashlib
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(ROOT, "scripts", "make_demo_data.py")
_spec = importlib.util.spec_from_file_location("make_demo_data", _SCRIPT)
mdd = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("make_demo_data", mdd)
_spec.loader.exec_module(mdd)

N_TRAIN, N_EVAL = 24, 8
JSONL_FILES = ["pretrain.jsonl", "sft.jsonl", "eval_color.jsonl", "eval_shape.jsonl"]


def _generate(root, seed=0):
    out = os.path.join(str(root), "demo")
    ev = os.path.join(str(root), "eval_images")
    summary = mdd.make_demo_data(out_dir=out, n_train=N_TRAIN, n_eval=N_EVAL,
                                 eval_images_dir=ev, seed=seed, image_size=224,
                                 progress=False)
    return out, ev, summary


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _digest(out_dir):
    h = hashlib.sha256()
    for name in JSONL_FILES + ["meta.json"]:
        with open(os.path.join(out_dir, name), "rb") as f:
            h.update(f.read())
    img_dir = os.path.join(out_dir, "images")
    for name in sorted(os.listdir(img_dir)):
        h.update(name.encode())
        with open(os.path.join(img_dir, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("demo_a"), seed=0)


def test_records_parse_and_images_exist(generated):
    out, _, _ = generated
    counts = {"pretrain.jsonl": N_TRAIN, "sft.jsonl": N_TRAIN,
              "eval_color.jsonl": N_EVAL, "eval_shape.jsonl": N_EVAL}
    for name in JSONL_FILES:
        recs = _read_jsonl(os.path.join(out, name))
        assert len(recs) == counts[name]
        ids = [r["id"] for r in recs]
        assert len(set(ids)) == len(ids)
        for r in recs:
            conv = r["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            for k, turn in enumerate(conv):
                assert turn["from"] == ("human" if k % 2 == 0 else "gpt")
                assert isinstance(turn["value"], str) and turn["value"]
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            path = os.path.join(out, "images", r["image"])
            assert os.path.isfile(path), path
            with Image.open(path) as im:
                assert im.size == (224, 224)
                assert im.mode == "RGB"
                assert im.format == "JPEG"


def test_image_names_hide_labels(generated):
    out, _, _ = generated
    for name in os.listdir(os.path.join(out, "images")):
        low = name.lower()
        assert not any(c in low for c in mdd.COLOR_NAMES), name
        assert not any(s in low for s in mdd.SHAPES), name


def test_eval_images_held_out(generated):
    out, _, _ = generated
    train_imgs = {r["image"] for n in ("pretrain.jsonl", "sft.jsonl")
                  for r in _read_jsonl(os.path.join(out, n))}
    eval_imgs = {r["image"] for n in ("eval_color.jsonl", "eval_shape.jsonl")
                 for r in _read_jsonl(os.path.join(out, n))}
    assert train_imgs and eval_imgs
    assert not train_imgs & eval_imgs
    assert all(i.startswith("train_") for i in train_imgs)
    assert all(i.startswith("eval_") for i in eval_imgs)
    # pretrain and SFT share the same images
    pre = [r["image"] for r in _read_jsonl(os.path.join(out, "pretrain.jsonl"))]
    sft = [r["image"] for r in _read_jsonl(os.path.join(out, "sft.jsonl"))]
    assert pre == sft


def test_sft_answers_canonical(generated):
    out, _, summary = generated
    labels = {l["image"]: l for l in summary["train_labels"]}
    for r in _read_jsonl(os.path.join(out, "sft.jsonl")):
        conv = r["conversations"]
        assert len(conv) == 4
        assert not conv[2]["value"].startswith("<image>")
        answers = [conv[1]["value"], conv[3]["value"]]
        for a in answers:
            assert a in mdd.CANONICAL_ANSWERS, a
        lab = labels[r["image"]]
        lang = "zh" if any(a in mdd.COLOR_ZH.values() or a in mdd.SHAPE_ZH.values()
                           for a in answers) else "en"
        assert sorted(answers) == sorted([mdd.COLOR_ANSWERS[lang][lab["color"]],
                                          mdd.SHAPE_ANSWERS[lang][lab["shape"]]])


def test_pretrain_captions_name_color_and_shape(generated):
    out, _, summary = generated
    labels = {l["image"]: l for l in summary["train_labels"]}
    for r in _read_jsonl(os.path.join(out, "pretrain.jsonl")):
        lab = labels[r["image"]]
        cap = r["conversations"][1]["value"]
        en = lab["color"] in cap and lab["shape"] in cap
        zh = mdd.COLOR_ZH[lab["color"]] in cap and mdd.SHAPE_ZH[lab["shape"]] in cap
        assert en or zh, (cap, lab)
        # no other colour / shape is mentioned
        for c in mdd.COLOR_NAMES:
            if c != lab["color"]:
                assert c not in cap and mdd.COLOR_ZH[c] not in cap
        for s in mdd.SHAPES:
            if s != lab["shape"]:
                assert s not in cap and mdd.SHAPE_ZH[s] not in cap


def test_eval_records(generated):
    out, ev, summary = generated
    labels = {l["image"]: l for l in summary["eval_labels"]}
    for kind in ("color", "shape"):
        for r in _read_jsonl(os.path.join(out, f"eval_{kind}.jsonl")):
            assert r["lang"] in ("en", "zh")
            lab = labels[r["image"]]
            assert r["color"] == lab["color"] and r["shape"] == lab["shape"]
            table = mdd.COLOR_ANSWERS if kind == "color" else mdd.SHAPE_ANSWERS
            assert r["conversations"][1]["value"] == table[r["lang"]][r[kind]]
    samples = sorted(os.listdir(ev))
    assert len(samples) == min(8, N_EVAL)
    for name in samples:
        _, color, shape = name[:-4].split("_")
        assert color in mdd.COLOR_NAMES and shape in mdd.SHAPES


def test_eval_masks_cover_the_shape(generated):
    """Each held-out record names its shape's mask: where it is white the image has the record's colour, where it is
    black the pale background; training images have none."""
    out, _, _ = generated
    for kind in ("color", "shape"):
        for r in _read_jsonl(os.path.join(out, f"eval_{kind}.jsonl")):
            assert r["mask"] == r["image"].replace(".jpg", "_mask.png")
            with Image.open(os.path.join(out, "images", r["mask"])) as m:
                assert m.format == "PNG" and m.mode == "L" and m.size == (224, 224)
                mask = np.asarray(m)
            with Image.open(os.path.join(out, "images", r["image"])) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
            inside, outside = mask == 255, mask == 0
            assert 0.05 < inside.mean() < 0.6 and inside.mean() + outside.mean() > 0.95  # only the edge is grey
            colour = pixels[inside].mean(axis=0)
            assert np.abs(colour - mdd.COLORS[r["color"]]).max() < 30, (r["image"], colour)
            assert pixels[outside].min(axis=1).mean() > 170  # pale
    for name in ("pretrain.jsonl", "sft.jsonl"):
        assert all("mask" not in r for r in _read_jsonl(os.path.join(out, name)))
    assert not [n for n in os.listdir(os.path.join(out, "images")) if n.startswith("train_") and "mask" in n]


def test_meta(generated):
    out, _, _ = generated
    with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["n_train"] == N_TRAIN and meta["n_eval"] == N_EVAL
    assert meta["seed"] == 0
    assert meta["colors"] == mdd.COLOR_NAMES and meta["shapes"] == mdd.SHAPES
    assert meta["eval_masks"] == mdd.MASK_FORMAT  # scripts/demo.py makes data without masks again


def test_deterministic(generated, tmp_path):
    out_a, _, _ = generated
    out_b, _, _ = _generate(tmp_path / "same", seed=0)
    out_c, _, _ = _generate(tmp_path / "other", seed=1)
    assert _digest(out_a) == _digest(out_b)
    assert _digest(out_a) != _digest(out_c)


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        mdd.parse_args(["--help"])
    assert e.value.code == 0
