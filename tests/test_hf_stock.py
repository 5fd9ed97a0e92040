"""export_model.py's stock formats: --format llava (the default) is transformers' own LlavaForConditionalGeneration
with LlavaProcessor, --format llama its LlamaForCausalLM; the directory holds no code and loads with
trust_remote_code=False.

On the served model (a 64x2 decoder trained to name the colour of a picture): the LLaVA model's logits are
MiniMindVLM's (fp32, prompts with 0, 1 and 2 images); the processor gives the project's prompt ids and pixels;
stock generate answers a batch of mixed lengths token for token as the engine does, and the pipeline names the
colours as the engine does; the Llama decoder's logits are the checkpoint's on text; every --ckpt takes either
directory back (LLaVA -> MiniMindVLM -> LLaVA is bit-exact), also after transformers saved it; MoE checkpoints
and LLaVA settings MiniMind-V cannot represent are refused with a message saying why.
"""
import json
import os
import runpy
import sys

import pytest
import torch
from PIL import Image

from model.checkpoint import CheckpointError, load_vlm, read_state_dict, save_checkpoint
from model.engine import ChatEngine
from model.hf_formats import PROJECTOR_FILE
from model.tokenizer import build_prompt
from model.vision import pixels_of
from tests.conftest import ROOT
from tests.served_model import COLOURS, FOLLOW_UP, QUESTION, colour_image
from tests.test_train_e2e import run

IMAGE_ID = 6400  # <image>, right after MiniMind's 6400-token vocabulary
EOS = 2


@pytest.fixture(scope="module")
def llava(served_model, random_tower, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "minimind-v"
    run(sys.executable, "export_model.py", "--ckpt", served_model[0], "--out", out, "--vision_model", random_tower)
    return out


@pytest.fixture(scope="module")
def stock(llava):
    """(model, processor) as transformers' Auto classes load them, no remote code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return (AutoModelForImageTextToText.from_pretrained(str(llava), trust_remote_code=False),
            AutoProcessor.from_pretrained(str(llava), trust_remote_code=False))


@pytest.fixture(scope="module")
def engine(served_model, random_tower):
    return ChatEngine.load(served_model[0], str(random_tower), device="cpu", dtype="float32")


def chat(*turns, system=None):
    """(transformers chat with image parts, the project's messages with `<image>` markers, the images): turns are
    (role, text, [PIL images]) and the images come first in a turn."""
    stock, ours, images = [], [], []
    if system:
        stock.append({"role": "system", "content": [{"type": "text", "text": system}]})
        ours.append({"role": "system", "content": system})
    for role, text, pics in turns:
        stock.append({"role": role, "content": [{"type": "image"} for _ in pics] + [{"type": "text", "text": text}]})
        ours.append({"role": role, "content": "<image>\n" * len(pics) + text})
        images += pics
    return stock, ours, images


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def answer_ids(row):
    """A generated row up to and including its first end-of-text."""
    row = list(row)
    return row[:row.index(EOS) + 1] if EOS in row else row


def test_llava_export_is_stock_and_gives_the_checkpoints_logits(llava, stock, engine, tokenizer):
    from transformers import LlavaForConditionalGeneration
    model, processor = stock
    assert not list(llava.rglob("*.py"))  # nothing in the directory runs
    config = json.loads((llava / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llava", ["LlavaForConditionalGeneration"])
    assert type(model) is LlavaForConditionalGeneration and type(processor).__name__ == "LlavaProcessor"
    assert type(model).__module__ == "transformers.models.llava.modeling_llava"
    red, green = colour_image(COLOURS["red"], seed=1), colour_image(COLOURS["green"], seed=2)
    for pics in ([], [red], [red, green]):  # 0, 1 and 2 images in one prompt
        stock_chat, ours, images = chat(("user", "Which colours do you see?", pics))
        inputs = processor(images=images or None, text=processor.apply_chat_template(stock_chat,
                           add_generation_prompt=True), return_tensors="pt")
        ids = torch.tensor([tokenizer(build_prompt(ours), add_special_tokens=False).input_ids])
        placeholder, _ = engine.model.placeholder_mask(ids)
        image_positions = inputs["input_ids"] == IMAGE_ID
        assert torch.equal(image_positions, placeholder) and int(image_positions.sum()) == 50 * len(pics)
        assert torch.equal(inputs["input_ids"][~image_positions], ids[~placeholder])  # the rest: the same ids
        if pics:
            assert torch.equal(inputs["pixel_values"], pixels_of(images))
        with torch.no_grad():
            got = model(**inputs).logits
            want = engine.model(ids, [engine.encode(images)] if pics else None).logits
        assert got.shape[-1] == 6401
        assert relative_error(got[..., :6400], want) < 1e-5, len(pics)
    again, info = LlavaForConditionalGeneration.from_pretrained(str(llava), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_processor_pixels_are_the_projects_preprocessing(stock):
    """The exported CLIPImageProcessor gives the pixels training saw, bit for bit, also for photo-shaped images
    (shortest side to 224 bicubic, centre crop, CLIP mean/std)."""
    import numpy as np
    _, processor = stock
    rng = np.random.default_rng(0)
    images = [colour_image(COLOURS["blue"], seed=3)] + [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(640, 480), (333, 500)]]
    got = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(got, pixels_of(images))


def test_stock_generate_answers_a_mixed_batch_as_the_engine_does(stock, engine):
    """Left-padded prompts of different lengths (one image, a system message, two turns, no image) in one
    stock generate call: every row's greedy answer is the engine's, token for token; bf16 names the colours too."""
    from transformers import AutoModelForImageTextToText
    model, processor = stock
    red, green, blue = (colour_image(COLOURS[c], seed=10 + i) for i, c in enumerate(COLOURS))
    conversations = [chat(("user", QUESTION, [red])),
                     chat(("user", QUESTION, [green]), system="You are a helpful assistant who names colours."),
                     chat(("user", QUESTION, [blue]), ("assistant", "blue", []), ("user", FOLLOW_UP, [])),
                     chat(("user", "Hello, who are you?", []))]
    texts = [processor.apply_chat_template(c[0], add_generation_prompt=True) for c in conversations]
    images = [im for c in conversations for im in c[2]]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 4 and inputs["attention_mask"][:, -1].all()
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    T = inputs["input_ids"].shape[1]
    prompts, feats = [], []
    for _, ours, pics in conversations:
        prompts.append(engine.prepare(ours, len(pics)))
        feats.append(engine.encode(pics) if pics else None)
    for row, ids, f in zip(out, prompts, feats):
        want = engine.model.generate(torch.tensor([ids]), [f], max_new_tokens=6, eos_token_id=EOS)[0].tolist()
        assert answer_ids(row[T:].tolist()) == answer_ids(want)
    texts_out = processor.batch_decode(out[:, T:], skip_special_tokens=True)
    assert [t.strip() for t in texts_out] == engine.answer_batch(prompts, feats, max_new_tokens=6)
    assert [t.strip() for t in texts_out[:3]] == list(COLOURS)

    half = AutoModelForImageTextToText.from_pretrained(model.name_or_path, dtype=torch.bfloat16)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out16 = half.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert [t.strip() for t in processor.batch_decode(out16[:3, T:], skip_special_tokens=True)] == list(COLOURS)


def test_stock_generate_modes_and_the_image_token_is_never_generated(stock):
    """Sampling with a seed repeats, beams and a streamer run, stop_strings stops; generation_config.json has
    the chat defaults and suppresses <image>: made the likeliest token, it is still never generated."""
    from transformers import TextIteratorStreamer
    model, processor = stock
    stock_chat, _, images = chat(("user", QUESTION, [colour_image(COLOURS["blue"], seed=4)]))
    inputs = processor(images=images, text=processor.apply_chat_template(stock_chat, add_generation_prompt=True),
                       return_tensors="pt")
    T = inputs["input_ids"].shape[1]

    def sampled(seed):
        torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50)
    assert torch.equal(sampled(3), sampled(3))
    assert model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False).shape[1] > T
    stopped = model.generate(**inputs, max_new_tokens=5, do_sample=False, stop_strings=["bl"],
                             tokenizer=processor.tokenizer)
    assert processor.decode(stopped[0, T:]).startswith("bl") and stopped.shape[1] < T + 5
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(**inputs, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert "".join(streamer).strip() == "blue"
    g = model.generation_config
    assert (g.do_sample, g.temperature, g.top_p, g.suppress_tokens) == (True, 0.65, 0.85, [IMAGE_ID])

    text_only = processor(text=processor.apply_chat_template([{"role": "user", "content": "Hi"}],
                          add_generation_prompt=True), return_tensors="pt")
    T = text_only["input_ids"].shape[1]
    first = model.generate(**text_only, max_new_tokens=1, do_sample=False)[0, T]
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[IMAGE_ID] = embedding[first] * 10  # tied: now <image> outscores the likeliest token
    try:
        assert model.generate(**text_only, max_new_tokens=1, do_sample=False, suppress_tokens=[])[0, T] == IMAGE_ID
        assert IMAGE_ID not in model.generate(**text_only, max_new_tokens=4, do_sample=False)[0, T:]
        torch.manual_seed(0)
        assert IMAGE_ID not in model.generate(**text_only, max_new_tokens=4)[0, T:]  # the sampling defaults
    finally:
        with torch.no_grad():
            embedding[IMAGE_ID] = 0


def card_snippet(directory, **replace):
    """The model card's python block, with `replace`'s substitutions (each must occur once)."""
    code = (directory / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in replace.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    return code


def test_model_card_snippet_runs(llava):
    """The export's README.md is a model card whose snippet (stock classes, no trust_remote_code) runs and
    answers."""
    card = (llava / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text")
    assert "trust_remote_code=True" not in card and f'from_pretrained("{llava}")' in card
    printed = []
    exec(card_snippet(llava, **{'Image.open("cat.jpg")': "colour_image(COLOURS['red'], seed=30)"}),
         {"colour_image": colour_image, "COLOURS": COLOURS, "print": printed.append})
    assert printed == ["red", "red"]  # generate, then the pipeline


def test_pipeline_names_the_colours_as_the_engine_does(llava, engine):
    """pipeline("image-text-to-text") answers a chat with an image, and one without, as the engine does, and
    decodes greedily when told so."""
    from transformers import pipeline
    pipe = pipeline("image-text-to-text", model=str(llava), trust_remote_code=False)
    calls, generate = [], pipe.model.generate
    pipe.model.generate = lambda *a, **kw: calls.append(kw) or generate(*a, **kw)
    for name, rgb in [*COLOURS.items(), (None, None)]:
        image = colour_image(rgb, seed=20) if rgb else None
        stock_chat, ours, images = chat(("user", QUESTION if image else "Tell me a story.", [image] if image else []))
        if image:
            stock_chat[0]["content"][0]["image"] = image
        # do_sample in generate_kwargs (beside max_new_tokens it would reach only the processor), a new dict each
        # call (the pipeline adds max_new_tokens to it)
        reply = pipe(text=stock_chat, max_new_tokens=8, generate_kwargs={"do_sample": False})
        want = engine.answer_batch([engine.prepare(ours, len(images))], [engine.encode(images) if images else None],
                                   max_new_tokens=8)[0]
        assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": want}
        assert want == name or name is None
    assert len(calls) == 4 and all(c["do_sample"] is False and c["max_new_tokens"] == 8 for c in calls)


def test_llama_export_is_the_decoder(served_model, random_tower, engine, tokenizer, tmp_path):
    """--format llama: a stock LlamaForCausalLM with the checkpoint's logits on text, MiniMind's chat template;
    it loads back as the whole MiniMind-V (the projector beside it), and without that file as the decoder that
    1-pretrain_vlm.py can start from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    out = tmp_path / "llama"
    run(sys.executable, "export_model.py", "--ckpt", served_model[0], "--out", out, "--format", "llama")
    assert not list(out.rglob("*.py"))
    model, info = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False, output_loading_info=True)
    assert not any(info.values()), info
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert type(model) is LlamaForCausalLM and model.config.vocab_size == 6400
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == build_prompt(messages)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    ids = torch.cat([ids, torch.randint(3, 6400, ids.shape)])  # the chat prompt, and random text
    with torch.no_grad():
        assert relative_error(model(ids).logits, engine.model(ids).logits) < 1e-5

    printed = []
    exec(card_snippet(out), {"print": printed.append})  # the model card's snippet
    assert len(printed) == 1 and isinstance(printed[0], str)
    assert f"convert_hf_to_gguf.py {out} " in (out / "README.md").read_text()

    want = read_state_dict(served_model[0])
    back, _ = load_vlm(str(out), tokenizer)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in want.items())
    os.remove(out / PROJECTOR_FILE)
    decoder = read_state_dict(out)
    assert sorted(set(want) - set(decoder)) == ["vision_proj.vision_proj.0.bias", "vision_proj.vision_proj.0.weight"]
    with pytest.raises(CheckpointError, match="vision_proj"):
        load_vlm(str(out), tokenizer)


def test_round_trip_is_bit_exact_and_transformers_saves_come_home(llava, stock, served_model, random_tower,
                                                                  tokenizer, tmp_path):
    """LLaVA -> MiniMindVLM (any --ckpt) -> LLaVA gives the same files; a model changed and saved by transformers
    (in its in-memory layout, with a trained linear_2) loads back with its logits."""
    from safetensors.torch import load_file
    import export_model
    ckpt = read_state_dict(served_model[0])
    back = read_state_dict(llava)  # what training's --init_from reads
    assert back.keys() == ckpt.keys() and all(torch.equal(back[k], v) for k, v in ckpt.items())
    again = export_model.export(str(llava), tmp_path / "again", vision_model=str(random_tower))
    a, b = load_file(str(llava / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (llava / name).read_text() == (again / name).read_text(), name

    model, processor = stock
    p = model.model.multi_modal_projector
    with torch.no_grad():
        saved = [t.clone() for t in (p.linear_1.weight, p.linear_2.weight, p.linear_2.bias)]
        p.linear_1.weight.mul_(0.5)
        p.linear_2.weight.mul_(2.0).add_(torch.randn_like(p.linear_2.weight) * 0.01)
        p.linear_2.bias.add_(0.01)
        model.save_pretrained(tmp_path / "tuned", save_original_format=False)  # model.language_model.*, lm_head
        processor.save_pretrained(tmp_path / "tuned")
        stock_chat, _, images = chat(("user", QUESTION, [colour_image(COLOURS["green"], seed=7)]))
        inputs = processor(images=images, text=processor.apply_chat_template(stock_chat, add_generation_prompt=True),
                           return_tensors="pt")
        want = model(**inputs).logits[..., :6400]
        p.linear_1.weight.copy_(saved[0]), p.linear_2.weight.copy_(saved[1]), p.linear_2.bias.copy_(saved[2])
    tuned = ChatEngine.load(str(tmp_path / "tuned"), str(random_tower), device="cpu", dtype="float32")
    ids = tuned.prepare([{"role": "user", "content": f"<image>\n{QUESTION}"}], 1)
    with torch.no_grad():
        got = tuned.model(torch.tensor([ids]), [tuned.encode(images)]).logits
    assert relative_error(got, want) < 1e-5


def test_what_stock_formats_cannot_hold_is_refused(tiny_cfg, llava, random_tower, tokenizer, tmp_path):
    import export_model
    moe = tmp_path / "moe.safetensors"
    cfg = tiny_cfg(use_moe=True)
    from model.model import MiniMindVLM
    save_checkpoint(MiniMindVLM(cfg), moe, cfg)
    for fmt in ("llava", "llama"):
        with pytest.raises(SystemExit, match="mixture-of-experts.*--format minimind"):
            export_model.main(["--ckpt", str(moe), "--out", str(tmp_path / fmt), "--vision_model", str(random_tower),
                               "--format", fmt])
        assert not (tmp_path / fmt).exists()
    for field, value, says in [("projector_hidden_act", "gelu", "projector_hidden_act"),
                               ("vision_feature_select_strategy", "default", "vision_feature_select_strategy"),
                               ("image_token_index", 5, "image token id 5")]:
        bad = tmp_path / f"bad-{field}"
        bad.mkdir()
        config = json.loads((llava / "config.json").read_text())
        config[field] = value
        (bad / "config.json").write_text(json.dumps(config))
        os.symlink(llava / "model.safetensors", bad / "model.safetensors")
        with pytest.raises(CheckpointError, match=says):
            load_vlm(str(bad), tokenizer)


def test_eval_export_script_compares_pipeline_and_engine(llava, served_model, random_tower, tmp_path, capsys):
    """scripts/eval_export.py: held-out accuracy through the pipeline next to the engine's (the closing figure
    of the demo model), here on the served model's colour pictures."""
    _, images = served_model
    data = tmp_path / "eval_color.jsonl"
    data.write_text("".join(json.dumps({"id": c, "image": f"{c}_{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": c}]}) + "\n"
        for c in COLOURS for i in (0, 5)))
    main = runpy.run_path(os.path.join(ROOT, "scripts", "eval_export.py"))["main"]
    [result] = main(["--export", str(llava), "--ckpt", served_model[0], "--vision_model", str(random_tower),
                     "--data_path", str(data), "--images_dir", images, "--batch_size", "4",
                     "--pipeline_batch_size", "2"])
    assert result["n"] == 6 and result["agree"] == 1.0
    assert result["pipeline"] == result["engine"] == {"exact": 1.0, "contains": 1.0}
    assert "| eval_color.jsonl | 6 | 100.0% | 100.0% | 100.0% |" in capsys.readouterr().out
