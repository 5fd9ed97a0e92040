"""bf16 weights in the inference engine (ChatEngine.load with --dtype bfloat16, or auto on hardware with native
bf16): the decoder's logits agree with fp32 within bf16's precision, RoPE and the sampled logits stay fp32,
and float32 keeps fp32 weights and greedy answers; int8 decoding answers the trained colour model as fp32 does.
"""
import copy

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.engine import ChatEngine, Generation
from model.LMConfig import IMAGE_MARKER, LMConfig
from model.model import KVCache, MiniMindVLM
from model.tokenizer import DEFAULT_TOKENIZER, build_prompt, image_token_ids, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_TOKENIZER)


def tiny_model(tokenizer, seed=0, **kw):
    """A random 64-wide model whose logits are spread out (embedding std 1 instead of 0.02), so that greedy
    choices are not near-ties that rounding could flip."""
    torch.manual_seed(seed)
    cfg = LMConfig(**dict(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2), **kw), vocab_size=len(tokenizer),
                   image_ids=image_token_ids(tokenizer))
    model = MiniMindVLM(cfg).eval()
    with torch.no_grad():
        model.output.weight.mul_(50)  # tied: the embedding too
    return model


def prompt_ids(tokenizer, text="Describe this image."):
    ids = tokenizer(build_prompt([{"role": "user", "content": f"{IMAGE_MARKER}\n{text}"}]),
                    add_special_tokens=False).input_ids
    return torch.tensor([ids])


def logits_over_steps(model, ids, feats, steps=6):
    """Prompt logits, then one cached step at a time (teacher-forced on fixed ids): (steps + 1, vocab)."""
    cache = KVCache(len(model.layers), 1, ids.shape[1] + steps)
    out = [model(ids, [feats], past_key_values=cache).logits[0, -1]]
    for t in range(steps):
        out.append(model(torch.tensor([[100 + t]]), past_key_values=cache).logits[0, -1])
    return torch.stack(out).float()


@torch.inference_mode()
def test_bf16_logits_agree_with_fp32(tokenizer):
    model = tiny_model(tokenizer)
    ids, feats = prompt_ids(tokenizer), torch.randn(1, 50, 768)
    ref = logits_over_steps(model, ids, feats)
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.init_buffers()
    assert half.rope_cos.dtype == torch.float32
    got = logits_over_steps(half, ids, feats)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per weight and activation); through two
    # blocks and the output head, whose dot products add 64 such products, the errors grow to about 1% of
    # the logits' spread. 5% of the spread leaves room without hiding a real bug (a wrong cache dtype or
    # RoPE table gives errors of the order of the spread itself).
    scale = ref.std().item()
    assert (got - ref).abs().max().item() < 0.05 * scale
    # Top-1 must agree wherever fp32's winner leads by more than that tolerance.
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1 * scale
    assert clear.sum() >= 3
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.fixture(scope="module")
def tiny_ckpt(tokenizer, tmp_path_factory):
    model = tiny_model(tokenizer, seed=1)
    path = tmp_path_factory.mktemp("fast") / "tiny.safetensors"
    save_checkpoint(model, path, model.params)
    return str(path)


def greedy_tokens(engine, feats, n=24):
    gen = engine.generate([{"role": "user", "content": f"{IMAGE_MARKER}\nWhat is it?"}], feats, max_new_tokens=n,
                          temperature=0, top_p=None, seed=0)
    ids = torch.tensor([gen.ids])
    return engine.model.generate(ids, [feats], max_new_tokens=n, temperature=0.0, eos_token_id=-1)[0].tolist(), \
        gen.text()


def test_engine_float32_keeps_fp32_weights_and_answers(tiny_ckpt, random_tower, tokenizer):
    engine = ChatEngine.load(tiny_ckpt, str(random_tower), device="cpu", dtype="float32")
    assert engine.model.output.weight.dtype == torch.float32
    from model.checkpoint import load_vlm
    plain = ChatEngine(load_vlm(tiny_ckpt, tokenizer)[0], tokenizer, engine.vision)
    feats = torch.randn(1, 50, 768)
    assert greedy_tokens(engine, feats) == greedy_tokens(plain, feats)


def test_engine_bfloat16_weights(tiny_ckpt, random_tower):
    engine = ChatEngine.load(tiny_ckpt, str(random_tower), device="cpu", dtype="bfloat16")
    assert engine.model.output.weight.dtype == torch.bfloat16
    assert engine.model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert engine.model.rope_cos.dtype == torch.float32
    assert next(engine.vision.parameters()).dtype == torch.bfloat16
    feats = engine.encode([__import__("PIL.Image").Image.new("RGB", (64, 64), (200, 30, 30))])
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    gen = engine.generate([{"role": "user", "content": f"{IMAGE_MARKER}\nWhat is it?"}], feats, max_new_tokens=8,
                          temperature=0.7, seed=0)
    assert isinstance(gen, Generation)
    gen.text()
    assert gen.completion_tokens + (gen.finish_reason == "stop") >= 1


def test_int8_decoding_answers_as_the_fp32_engine(served_model, random_tower):
    """--dtype int8 (auto on CPUs): int8 copies of the decoding step's matrices, the model's own weights for the
    prefill. On the trained colour model, every answer (greedy) is the fp32 engine's, word for word."""
    from tests.served_model import COLOURS, QUESTION, colour_image
    ckpt, _ = served_model
    engines = {d: ChatEngine.load(ckpt, str(random_tower), device="cpu", dtype=d) for d in ("float32", "int8")}
    assert engines["int8"].plan.int8_decoding and type(engines["int8"].head).__name__ == "Int8Linear"
    answers = {d: [] for d in engines}
    for name, rgb in COLOURS.items():
        for seed in (3, 4):
            for d, engine in engines.items():
                feats = engine.encode([colour_image(rgb, seed)])
                messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n{QUESTION}"}]
                answers[d].append(engine.generate(messages, feats, temperature=0, max_new_tokens=16).text())
    assert answers["int8"] == answers["float32"] and answers["float32"].count("red") == 2
