"""export_model.py --format minimind: a directory that transformers' Auto classes load with trust_remote_code
(the stock LLaVA and Llama formats are tests/test_hf_stock.py's).

AutoModelForCausalLM.from_pretrained on it gives exactly the checkpoint's logits; its chat, transformers' own
generate (greedy, sampling, beams, streamers), AutoProcessor and the image-text-to-text pipeline answer about
an image (the colour of red, green and blue pictures) token for token as the repository's engine does. The servers' engine, 3-eval_chat.py and training's --init_from take the exported directory; a missing
checkpoint is a one-line error.
"""
import subprocess
import sys

import pytest
import torch

from model.checkpoint import load_vlm
from model.engine import ChatEngine
from tests.conftest import ROOT
from tests.served_model import COLOURS, QUESTION, colour_image
from tests.test_train_e2e import ENV, run


@pytest.fixture(scope="module")
def exported(served_model, random_tower, tmp_path_factory):
    ckpt, _ = served_model
    out = tmp_path_factory.mktemp("export") / "minimind-v"
    run(sys.executable, "export_model.py", "--ckpt", ckpt, "--out", out, "--vision_model", random_tower,
        "--format", "minimind")
    return out


def test_auto_classes_load_the_export_exactly(exported, served_model, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    assert type(model).__name__ == "MiniMindVForCausalLM"
    ref, _ = load_vlm(served_model[0], tokenizer)
    ids = torch.randint(3, 6400, (2, 30))
    assert torch.equal(model(ids).logits, ref(ids).logits)  # pth -> export -> load -> logits: exact
    for name, rgb in COLOURS.items():  # generate given an image
        assert model.chat(hf_tokenizer, colour_image(rgb, seed=9), QUESTION) == name


def test_save_pretrained_after_chat_writes_only_the_model(exported, tmp_path):
    """chat() loads the CLIP tower and an engine once; neither ends up in the saved weights, and the fused
    projections (views) save and load back exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors import safe_open
    model = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    image = colour_image(COLOURS["red"], seed=3)
    assert model.chat(hf_tokenizer, image, QUESTION) == model.chat(hf_tokenizer, image, QUESTION) == "red"
    engine = model._engine
    model.chat(hf_tokenizer, image, QUESTION)
    assert model._engine is engine  # one engine (and one scheduler thread) for every chat
    model.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f, \
            safe_open(str(exported / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"), trust_remote_code=True)
    ids = torch.randint(3, 6400, (1, 20))
    assert torch.equal(again(ids).logits, model(ids).logits)


def prompt_ids(tokenizer, question=QUESTION):
    from model.tokenizer import build_prompt
    prompt = build_prompt([{"role": "user", "content": f"<image>\n{question}"}])
    return torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])


def test_stock_generate_matches_the_engine(exported, served_model, tokenizer, random_tower):
    """transformers' own generate (GenerationMixin) on pixel_values: prompt + answer, the answer token for token
    the engine's greedy one; image_features work the same; sampling with a seed repeats; beam search and a
    streamer run."""
    from transformers import AutoModelForCausalLM, TextIteratorStreamer
    model = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True)
    ids = prompt_ids(tokenizer)
    image = colour_image(COLOURS["blue"], seed=4)
    out = model.generate(ids, pixel_values=model.preprocess_images([image]), max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, :ids.shape[1]], ids)  # transformers' convention: the prompt comes back too
    engine = ChatEngine.load(served_model[0], str(random_tower), device="cpu", dtype="float32")
    feats = engine.encode([image])
    want = engine.model.generate(ids, [feats], max_new_tokens=5, eos_token_id=tokenizer.eos_token_id)[0].tolist()
    assert out[0, ids.shape[1]:].tolist() == want[:len(out[0]) - ids.shape[1]]
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "blue"
    assert torch.equal(model.generate(ids, image_features=feats, max_new_tokens=5, do_sample=False), out)

    def sampled(seed):
        torch.manual_seed(seed)
        return model.generate(ids, image_features=feats, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50)
    assert torch.equal(sampled(3), sampled(3))
    beams = model.generate(ids, image_features=feats, max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape[0] == 1 and beams.shape[1] > ids.shape[1]
    stopped = model.generate(ids, image_features=feats, max_new_tokens=5, do_sample=False, stop_strings=["bl"],
                             tokenizer=tokenizer)
    assert tokenizer.decode(stopped[0, ids.shape[1]:]).startswith("bl") and stopped.shape[1] < out.shape[1]
    assert (model.generation_config.do_sample, model.generation_config.temperature) == (True, 0.65)  # the export's
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(ids, image_features=feats, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert "".join(streamer).strip() == "blue"


def test_model_card_snippet_is_the_tested_one(exported):
    """The export's README.md is a model card whose snippet makes the calls test_processor_and_pipeline makes."""
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text")
    for call in ('AutoProcessor.from_pretrained("', "processor.apply_chat_template(messages)",
                 "model.generate(**inputs", 'pipeline("image-text-to-text"'):
        assert call in card
    assert f'from_pretrained("{exported}"' in card


def test_processor_and_pipeline(exported, tokenizer):
    """AutoProcessor: the chat template with an image part gives the project's prompt ids, and pixel_values
    the project's preprocessing; generate(**inputs) answers; pipeline("image-text-to-text") answers a chat."""
    from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
    from model.vision import pixels_of
    processor = AutoProcessor.from_pretrained(str(exported), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True)
    image = colour_image(COLOURS["green"], seed=5)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages), return_tensors="pt")
    assert torch.equal(inputs["input_ids"], prompt_ids(tokenizer))
    assert torch.equal(inputs["pixel_values"], pixels_of([image]))
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == "green"

    pipe = pipeline("image-text-to-text", model=str(exported), trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": colour_image(COLOURS["red"], seed=6)},
                                         {"type": "text", "text": QUESTION}]}]
    reply = pipe(text=chat, max_new_tokens=5, generate_kwargs={"do_sample": False})
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": "red"}


def test_scripts_take_the_export_directory(exported, served_model, random_tower, tmp_path):
    engine = ChatEngine.load(str(exported), str(random_tower), device="cpu", dtype="float32")  # both servers load this way
    feats = engine.encode([colour_image(COLOURS["green"], seed=2)])
    assert engine.generate([{"role": "user", "content": f"<image>\n{QUESTION}"}], feats, temperature=0).text() == "green"
    _, images = served_model
    p = run(sys.executable, "3-eval_chat.py", "--ckpt", exported, "--vision_model", random_tower, "--image_dir",
            images, "--max_new_tokens", 3, "--device", "cpu")
    assert p.stdout.count("🤖") == 18
    # and training starts from it
    import json
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": f"{c}_0.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": c}]}) + "\n" for c in COLOURS))
    run(sys.executable, "2-sft_vlm.py", "--data_path", data, "--images_dir", images, "--vision_model", random_tower,
        "--init_from", exported, "--dim", 64, "--n_layers", 2, "--max_steps", 1, "--batch_size", 3,
        "--num_workers", 0, "--out_dir", tmp_path / "out", "--device", "cpu", "--max_seq_len", 128)


def test_export_refuses_a_missing_checkpoint(tmp_path, random_tower):
    p = subprocess.run([sys.executable, "export_model.py", "--ckpt", tmp_path / "nope", "--out", tmp_path / "x",
                        "--vision_model", random_tower], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode != 0 and "nope does not exist" in p.stderr and "Traceback" not in p.stderr
