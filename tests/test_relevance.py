"""Where did it look (model/relevance.py, ChatEngine.explain, 3-eval_chat.py --explain).

- Each image's relevance is a 7x7 grid plus the CLS share, non-negative, summing to 1; the images' own shares sum
  to 1; the same inputs give the same numbers, in fp32 and in bf16; no weight changes and no .grad is left.
- A hand-set model whose answer provably depends on one image token (its attention reads that token alone, and
  changing any other token leaves the answer's probability as it was) puts the most relevance on that token,
  though every other token is larger: for a patch and for the CLS token.
- ChatEngine.explain runs on the thread that serves the engine, not the caller's; no image or no answer is an
  InputError.
- A mask's patch coverage follows the image's own centre crop; evidence on target against area.
- 3-eval_chat.py --explain writes one PNG per answered image in gallery mode, and in batch mode a 7x7 grid per
  prediction, the evidence on target in the summary, and PNGs for the first --explain_pngs records; a record
  whose mask is missing is named (kind bad_mask) and, under --on_bad_sample skip, left out.
"""
import importlib
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model.checkpoint import save_checkpoint
from model.engine import ChatEngine, InputError
from model.images import patch_coverage, read_mask
from model.model import MiniMindVLM
from model.relevance import GRID, ImageRelevance, answer_relevance, evidence_on_target, summarize_evidence
from model.tokenizer import build_prompt

QUESTION = "<image>\nWhat is it?"


def prompt_ids(tokenizer, question=QUESTION):
    return tokenizer(build_prompt([{"role": "user", "content": question}]), add_special_tokens=False).input_ids


def tiny_model(tiny_cfg, dtype=torch.float32):
    return MiniMindVLM(tiny_cfg(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grids_sum_to_one_and_repeat(tokenizer, tiny_cfg, dtype):
    model = tiny_model(tiny_cfg, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = prompt_ids(tokenizer, "<image>\n<image>\nWhich one is red?")
    answer = tokenizer("the second one", add_special_tokens=False).input_ids
    features = torch.randn(2, 50, 768)
    first = answer_relevance(model, ids + answer, features, len(ids))
    again = answer_relevance(model, ids + answer, features, len(ids))
    assert len(first) == 2
    for r in first:
        assert r.grid.shape == (GRID, GRID) == (7, 7)
        assert r.cls >= 0 and (r.grid >= 0).all()
        assert r.cls + r.grid.sum() == pytest.approx(1.0, abs=1e-9)
        assert len(np.unique(r.grid)) > 40  # a real spread, not the even fallback
    assert sum(r.share for r in first) == pytest.approx(1.0, abs=1e-9)
    for a, b in zip(first, again):
        assert a.cls == b.cls and np.array_equal(a.grid, b.grid) and a.share == b.share
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    js = first[0].to_json()
    assert len(js["grid"]) == 7 and all(len(row) == 7 for row in js["grid"])


def test_bad_inputs_are_refused(tokenizer, tiny_cfg):
    model = tiny_model(tiny_cfg)
    ids = prompt_ids(tokenizer)
    with pytest.raises(ValueError, match="no answer"):
        answer_relevance(model, ids, torch.randn(1, 50, 768), len(ids))
    with pytest.raises(ValueError, match="no image"):
        answer_relevance(model, ids + [300], None, len(ids))
    with pytest.raises(ValueError, match="placeholders and images disagree"):
        answer_relevance(model, ids + [300], torch.randn(2, 50, 768), len(ids))
    with pytest.raises(ValueError, match="training mode"):
        answer_relevance(model.train(), ids + [300], torch.randn(1, 50, 768), len(ids))


# -- a model whose answer depends on one image token ---------------------------------------------------------

TEXT, QUERY, KEY, VALUE = 15, 14, 13, 12  # embedding dims: text flag; query/key pair (14, 15); the value read
DISTRACT = slice(0, 12)  # dims every image token fills and nothing reads


def one_token_model(tiny_cfg, answer_id):
    """dim 16, one layer, one head. Every text token's embedding is e_TEXT, so every query is along QUERY; an
    image token's key is its dim KEY, which only the chosen token has, so attention reads that token alone (score
    ~40 against 0). Its dim VALUE is carried to the last position, where the output head's row for `answer_id`
    reads it: the answer's probability follows that one token. RoPE's slowest pair (14, 15) turns by ~6e-6 rad a
    position (rope_theta 1e6), so positions do not matter. The feed-forward network is zero."""
    cfg = tiny_cfg(dim=16, n_layers=1, n_heads=1, n_kv_heads=1, rope_theta=1e6, max_seq_len=128)
    model = MiniMindVLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.norm, model.layers[0].attention_norm, model.layers[0].ffn_norm]:
            norm.weight.fill_(1.0)
        model.tok_embeddings.weight[:, TEXT] = 1.0
        model.tok_embeddings.weight[answer_id, VALUE] = 1.0  # tied: the head's row for the answer reads VALUE
        proj = model.vision_proj.vision_proj[0].weight  # (16, 768): feature 0 -> KEY, 1 -> VALUE, 2..13 -> 0..11
        proj[KEY, 0] = proj[VALUE, 1] = 1.0
        proj[DISTRACT, 2:14] = torch.eye(12)
        att = model.layers[0].attention
        att.wq.weight[QUERY, TEXT] = 5.0
        att.wk.weight[QUERY, KEY] = 5.0
        att.wv.weight[VALUE, VALUE] = 1.0
        att.wo.weight[VALUE, VALUE] = 1.0
    return model


def one_token_features(chosen, seed=0):
    """50 image tokens whose unread dims are large (3x for the others, 1x for the chosen one: a method that
    followed the tokens' size would pick another), and the chosen one also carries the key and the value."""
    g = torch.Generator().manual_seed(seed)
    features = torch.zeros(1, 50, 768)
    features[0, :, 2:14] = 3.0 * torch.randn(50, 12, generator=g)
    features[0, chosen, 2:14] /= 3.0
    features[0, chosen, 0] = features[0, chosen, 1] = 1.0
    return features


@pytest.mark.parametrize("chosen", [1 + 3 * GRID + 5, 0])  # the patch at row 3, column 5; the CLS token
def test_the_token_the_answer_depends_on_gets_the_most(tokenizer, tiny_cfg, chosen):
    answer_id = tokenizer("yes", add_special_tokens=False).input_ids[0]
    model = one_token_model(tiny_cfg, answer_id)
    ids = prompt_ids(tokenizer)
    features = one_token_features(chosen)

    def log_prob(f):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), [f[0]]).logits[0, -1].float()
        return float(logits.log_softmax(-1)[answer_id])

    # The premise: the answer follows the chosen token, and no other.
    other = 7 if chosen != 7 else 8
    for token, changes in [(chosen, True), (other, False)]:
        moved = features.clone()
        moved[0, token, 1] += 2.0
        moved[0, token, 2:14] *= -1.0
        assert (abs(log_prob(moved) - log_prob(features)) > 1e-2) == changes
    assert max(features[0, t].norm() for t in range(50) if t != chosen) > features[0, chosen].norm()

    (relevance,) = answer_relevance(model, ids + [answer_id], features, len(ids))
    shares = np.concatenate([[relevance.cls], relevance.grid.ravel()])
    assert int(shares.argmax()) == chosen
    assert shares[chosen] > 0.99
    if chosen:
        assert np.unravel_index(int(relevance.grid.argmax()), (GRID, GRID)) == (3, 5)


# -- the engine: on its own thread ----------------------------------------------------------------------------

def test_engine_explains_on_the_serving_thread(tokenizer, tiny_cfg):
    """A request thread asks; the thread in serve_forever (a server's main thread) computes; bad requests are
    InputErrors."""
    engine = ChatEngine(tiny_model(tiny_cfg), tokenizer, vision_model=None, max_batch=2)
    features = torch.randn(1, 50, 768)
    messages = [{"role": "user", "content": QUESTION}]
    computed_on = []
    engine.model.register_forward_pre_hook(lambda module, args: computed_on.append(threading.current_thread()))
    answers = {}

    def ask():
        try:
            answers["relevance"] = engine.explain(messages, features, "a red circle")
        except Exception as e:  # re-raised below, on the test's thread
            answers["error"] = e
    asker = threading.Thread(target=ask)

    def until():  # first called once serve_forever holds the engine: the request comes to a running server
        if asker.ident is None:
            asker.start()
        return not asker.is_alive()
    engine.scheduler().serve_forever(until=until)
    asker.join()
    assert "error" not in answers, answers.get("error")
    (relevance,) = answers["relevance"]
    assert relevance.cls + relevance.grid.sum() == pytest.approx(1.0)
    assert computed_on and set(computed_on) == {threading.main_thread()}
    # without a server, the caller's own thread runs it: the same numbers
    (alone,) = engine.explain(messages, features, "a red circle")
    assert np.array_equal(alone.grid, relevance.grid)
    with pytest.raises(InputError, match="no image"):
        engine.explain(messages, None, "a red circle")
    with pytest.raises(InputError, match="empty"):
        engine.explain(messages, features, "")
    with pytest.raises(InputError, match="must end with the question"):
        engine.explain(messages + [{"role": "assistant", "content": "a red circle"}], features, "a red circle")


# -- where the object is ------------------------------------------------------------------------------------

def test_mask_coverage_follows_the_centre_crop(tmp_path):
    mask = Image.new("L", (224, 224), 0)
    ImageDraw.Draw(mask).rectangle([32, 64, 32 * 5 - 1, 32 * 4 - 1], fill=255)  # patches rows 2-3, columns 1-4
    coverage = patch_coverage(mask)
    expected = np.zeros((7, 7))
    expected[2:4, 1:5] = 1.0
    assert np.allclose(coverage, expected, atol=1e-6)
    # a 448x224 image is cut to its centre square, x from 112 to 335: its left quarter is not in it
    wide = Image.new("L", (448, 224), 0)
    ImageDraw.Draw(wide).rectangle([0, 0, 111, 223], fill=255)
    ImageDraw.Draw(wide).rectangle([112 + 96, 0, 112 + 159, 63], fill=255)  # the square's rows 0-1, columns 3-4
    expected = np.zeros((7, 7))
    expected[0:2, 3:5] = 1.0
    assert np.allclose(patch_coverage(wide), expected, atol=1e-6)
    # resized too: a 896x448 mask is halved first (bilinear), then cut alike
    assert np.allclose(patch_coverage(wide.resize((896, 448), Image.NEAREST)), expected, atol=0.02)
    # a mask of another size than its image, or in colour, is refused with its name
    path = tmp_path / "m.png"
    mask.save(path)
    assert read_mask(path, (224, 224)).mode == "L"
    with pytest.raises(ValueError, match="is 224x224, its image 300x200"):
        read_mask(path, (300, 200), "the mask")
    mask.convert("RGB").save(path)
    with pytest.raises(ValueError, match="a mask is greyscale"):
        read_mask(path, (224, 224))


def test_evidence_on_target_against_area():
    grid = np.zeros((7, 7))
    grid[3, 3], grid[0, 0] = 0.6, 0.2
    relevance = ImageRelevance(cls=0.2, grid=grid)
    coverage = np.zeros((7, 7))
    coverage[2:5, 2:5] = 0.5  # 9 patches, half covered: on target
    coverage[6, 6] = 0.1  # a sliver: not
    result = evidence_on_target(relevance, coverage)
    assert result["evidence"] == pytest.approx(0.75)  # 0.6 of the patches' 0.8; the CLS token is no place
    assert result["area"] == pytest.approx(9 / 49, abs=1e-5)
    assert evidence_on_target(relevance, np.full((7, 7), 0.1)) is None  # nothing locatable
    summary = summarize_evidence([result, None, {"evidence": 0.2, "area": 0.5}])
    assert summary["located"] == 2 and summary["at_2x"] == 0.5
    assert summary["evidence_on_target"] == pytest.approx(0.475)


# -- 3-eval_chat.py --explain -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_chat():
    return importlib.import_module("3-eval_chat")


@pytest.fixture
def random_ckpt(tokenizer, tiny_cfg, tmp_path):
    cfg = tiny_cfg(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    path = tmp_path / "32_vlm_sft.safetensors"
    save_checkpoint(MiniMindVLM(cfg), path, cfg, extra={"args": {"max_seq_len": 256}})
    return path


def test_explain_writes_a_png_per_answered_image(eval_chat, random_ckpt, random_tower, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "masks").mkdir(parents=True)
    for k, rgb in enumerate([(220, 30, 30), (30, 60, 220), (30, 170, 50)]):
        image = Image.new("RGB", (224, 224), (235, 235, 235))
        ImageDraw.Draw(image).ellipse([40 + 10 * k, 40, 180, 180], fill=rgb)
        image.save(images / f"shape_{k}.png")
        mask = Image.new("L", (224, 224), 0)
        ImageDraw.Draw(mask).ellipse([40 + 10 * k, 40, 180, 180], fill=255)
        mask.save(images / "masks" / f"shape_{k}.png")
    # a random model with tied embeddings repeats the prompt's last token, a newline, which strips to nothing: the
    # repetition penalty makes it say something
    model = ["--ckpt", str(random_ckpt), "--vision_model", str(random_tower), "--device", "cpu", "--dtype", "float32",
             "--max_new_tokens", "3", "--temperature", "0", "--repetition_penalty", "100"]

    explain = tmp_path / "gallery"
    eval_chat.main(model + ["--image_dir", str(images), "--prompt", "What is it?", "--explain", str(explain)])
    assert sorted(p.name for p in explain.iterdir()) == ["shape_0.png", "shape_1.png", "shape_2.png"]
    for p in explain.iterdir():
        with Image.open(p) as picture:
            assert picture.format == "PNG" and picture.width > 2 * 224
    assert capsys.readouterr().out.count("[where it looked: ") == 3

    data = tmp_path / "eval.jsonl"
    with open(data, "w") as f:
        for k, mask in enumerate(["masks/shape_0.png", "masks/shape_1.png", "masks/shape_2.png", "masks/none.png"]):
            f.write(json.dumps({"id": f"q{k}", "image": f"shape_{k % 3}.png", "mask": mask,
                                "conversations": [{"from": "human", "value": QUESTION},
                                                  {"from": "gpt", "value": "circle"}]}) + "\n")
    explain, preds = tmp_path / "batch", tmp_path / "preds.jsonl"
    eval_chat.main(model + ["--data_path", str(data), "--images_dir", str(images), "--out", str(preds),
                            "--feature_cache", "", "--explain", str(explain), "--explain_pngs", "2",
                            "--on_bad_sample", "skip"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(p.name for p in explain.iterdir()) == ["q0.png", "q1.png"]
    records = [json.loads(line) for line in open(preds)]
    (missing,) = [r for r in records if "error" in r]  # a mask that is not there: that record is left out, named
    assert missing["id"] == "q3" and missing["kind"] == "bad_mask" and "masks/none.png does not exist" in missing["error"]
    assert summary["skipped"] == 1
    records = [r for r in records if "error" not in r]
    assert len(records) == 3
    for r in records:
        (image,) = r["relevance"]
        assert np.array(image["grid"]).shape == (7, 7)
        assert image["cls"] + np.sum(image["grid"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 <= image["target"]["evidence"] <= 1 and image["target"]["area"] > 0.3
    evidence = summary["evidence"]
    assert evidence["explained"] == evidence["located"] == 3
    assert evidence["area_of_target"] == pytest.approx(np.mean([r["relevance"][0]["target"]["area"] for r in records]),
                                                       abs=1e-3)
