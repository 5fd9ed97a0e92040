"""Continuous batching in ChatEngine (model/engine.py, Scheduler): one forward pass per step over every active
request, joining and leaving between steps, with a cap on concurrent slots and on waiting requests. A request's
answer must not depend on who else is running: greedy (fp32, and bf16 where the CPU has it) and seeded sampled
answers are compared token for token (as text and token count) with the same request run alone. The batched
step's fused q/k/v and w1/w3 products give the logits of the model's own forward pass."""
import threading
import time

import pytest
import torch

from model.engine import Busy, ChatEngine
from model.model import KVCache, MiniMindVLM
from model.hardware import autocast_dtype

QUESTIONS = ["What colour is the sky?", "Tell me a long story about a cat.", "1 2 3 4", "你好，请介绍一下你自己。"]


@pytest.fixture
def make_engine(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_cfg()).eval()

    def make(max_batch=8, **kw):
        return ChatEngine(model, tokenizer, None, max_batch=max_batch, **kw)
    return make


def ask(engine, i, max_new_tokens=60, **sampling):
    sampling = dict(dict(temperature=0.0, top_p=None), **sampling)
    return engine.generate([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                           max_new_tokens=max_new_tokens, **sampling)


def result(gen):
    text = gen.text()
    return text, gen.completion_tokens, gen.finish_reason


def solo(engine, i, **kw):
    return result(ask(engine, i, **kw))


def run_together(engine, requests, delays):
    """Iterate each Generation in its own thread, starting after its delay; their results in order."""
    out = [None] * len(requests)

    def work(k):
        time.sleep(delays[k])
        out[k] = result(requests[k])
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_solo_answer_matches_stream_generate(make_engine, tokenizer):
    """Through the scheduler, alone, the answer is the one model.stream_generate gives."""
    engine = make_engine()
    ids = engine.prepare([{"role": "user", "content": QUESTIONS[1]}], 0)
    ref = engine.model.generate(torch.tensor([ids]), max_new_tokens=40, eos_token_id=tokenizer.eos_token_id)[0]
    ref = [t for t in ref.tolist() if t != tokenizer.eos_token_id]
    text, n, _ = solo(engine, 1, max_new_tokens=40)
    assert n == len(ref)
    assert text == tokenizer.decode(ref, skip_special_tokens=True)


def test_greedy_batched_equals_solo_with_staggered_joins(make_engine):
    engine = make_engine()
    alone = [solo(engine, i, max_new_tokens=150 + 20 * i) for i in range(4)]
    together = run_together(engine, [ask(engine, i, max_new_tokens=150 + 20 * i) for i in range(4)],
                            delays=[0, 0.02, 0.05, 0.09])
    assert engine.scheduler().most_active >= 2  # they really shared steps
    assert together == alone
    assert all(n > 0 for _, n, _ in alone)


def test_seeded_sampling_batched_equals_solo(make_engine):
    engine = make_engine()
    kw = [dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=7),
          dict(temperature=1.2, top_p=0.8, seed=123),
          dict(temperature=0.7, seed=2 ** 40)]
    alone = [solo(engine, i, max_new_tokens=120, **kw[i]) for i in range(3)]
    assert solo(engine, 0, max_new_tokens=120, **kw[0]) == alone[0]  # deterministic alone
    together = run_together(engine, [ask(engine, i, max_new_tokens=120, **kw[i]) for i in range(3)],
                            delays=[0, 0.03, 0.01])
    assert together == alone


def test_cancelled_request_frees_its_slot(make_engine):
    engine = make_engine(max_batch=2)
    b_alone = solo(engine, 1, max_new_tokens=200)
    c_alone = solo(engine, 2, max_new_tokens=30)
    a = iter(ask(engine, 0, max_new_tokens=400))
    next(a)  # A decodes
    b = ask(engine, 1, max_new_tokens=200)
    c = ask(engine, 2, max_new_tokens=30)
    results = {}
    tb = threading.Thread(target=lambda: results.__setitem__("b", result(b)))
    tb.start()
    time.sleep(0.02)
    tc = threading.Thread(target=lambda: results.__setitem__("c", result(c)))
    tc.start()
    deadline = time.time() + 10
    while engine.scheduler().load()["waiting"] == 0 and time.time() < deadline:
        time.sleep(0.001)  # C queues: A and B hold both slots
    assert engine.scheduler().load()["waiting"] == 1 or "c" in results
    a.close()  # the client went away: A leaves, C takes its slot while B is still running
    tc.join(30)
    tb.join(30)
    assert results["c"] == c_alone
    assert results["b"] == b_alone
    assert engine.scheduler().load() == {"active": 0, "waiting": 0}


def test_slot_cap_queues_extra_requests(make_engine):
    engine = make_engine(max_batch=1)
    alone = [solo(engine, i, max_new_tokens=80) for i in range(2)]
    seen = []
    gens = [ask(engine, i, max_new_tokens=80) for i in range(2)]
    first = iter(gens[0])
    next(first)
    out = {}
    t = threading.Thread(target=lambda: out.__setitem__(1, result(gens[1])))
    t.start()
    deadline = time.time() + 10
    while engine.scheduler().load()["waiting"] == 0 and time.time() < deadline:
        time.sleep(0.001)
    seen.append(engine.scheduler().load())
    assert seen[0] == {"active": 1, "waiting": 1}
    assert 1 not in out  # it waits for the slot
    "".join(first)  # the first answer runs to its end and frees the slot
    t.join(30)
    assert out[1] == alone[1]
    assert gens[0].completion_tokens == alone[0][1] and gens[0].finish_reason == alone[0][2]
    assert engine.scheduler().most_active == 1


def test_max_batch_must_be_positive(make_engine):
    with pytest.raises(ValueError):
        make_engine(max_batch=0)


def test_full_waiting_line_is_refused_as_busy(make_engine):
    engine = make_engine(max_batch=1, max_waiting=1)
    first = iter(ask(engine, 0, max_new_tokens=400))
    next(first)  # decoding: the one slot is taken
    second = ask(engine, 1, max_new_tokens=20)
    t = threading.Thread(target=second.text)
    t.start()
    deadline = time.time() + 10
    while engine.scheduler().load()["waiting"] == 0 and time.time() < deadline:
        time.sleep(0.001)
    with pytest.raises(Busy, match="busy"):
        ask(engine, 2)
    first.close()  # a slot frees: the second runs, and a new request is accepted again
    t.join(30)
    assert second.completion_tokens > 0
    assert ask(engine, 2, max_new_tokens=5).text() is not None


def prefilled(engine, i, max_new_tokens=40):
    r = ask(engine, i, max_new_tokens=max_new_tokens).request
    assert engine.scheduler()._prefill([r]) == [r]
    return r


NATIVE_BF16 = autocast_dtype("cpu", "auto") == torch.bfloat16


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not NATIVE_BF16, reason="this CPU has no native bf16"))])
@pytest.mark.parametrize("others", [1, 2, 4, 6])
def test_a_rows_logits_do_not_depend_on_its_batch(make_engine, others, dtype):
    """Bit for bit, which is what makes greedy answers equal (a greedy test alone rarely sees a flipped argmax:
    the rounding differences are tiny). fp32 needs row_block 4 for it; bf16 needs no padding."""
    engine = make_engine()
    if dtype == torch.bfloat16:
        engine = ChatEngine(engine.model.to(dtype), engine.tokenizer, None)
        engine.model.init_buffers()
        assert engine.row_block == 1
    alone, batched = prefilled(engine, 1), prefilled(engine, 1)
    rest = [prefilled(engine, i) for i in range(others)]
    for _ in range(3):
        solo_logits = engine.scheduler().step_logits([alone])
        batch_logits = engine.scheduler().step_logits(rest[:others // 2] + [batched] + rest[others // 2:])
        assert torch.equal(batch_logits[others // 2], solo_logits[0])
        for r in [alone, batched] + rest:  # the next input: the same (arbitrary) token for every row
            r.ids[0, r.n] = 100
            r.n += 1


@torch.inference_mode()
def test_fused_step_gives_the_model_forward_logits(make_engine, tokenizer):
    """Scheduler.step_logits (fused q/k/v and w1/w3, per-row RoPE, fp32 KV cache) against
    MiniMindVLM.forward with a KV cache, teacher-forced over the same tokens. fp32: equal up to the rounding of
    a different summation order."""
    engine = make_engine(row_block=1)
    ids = engine.prepare([{"role": "user", "content": QUESTIONS[1]}], 0)
    r = engine.generate([{"role": "user", "content": QUESTIONS[1]}], max_new_tokens=20, temperature=0).request
    engine.scheduler()._prefill([r])
    cache = KVCache(len(engine.model.layers), 1, len(ids) + 20)
    engine.model(torch.tensor([ids]), past_key_values=cache)
    for _ in range(8):
        token = r.ids[:, r.n - 1:r.n]
        ref = engine.model(token, past_key_values=cache).logits[0, -1]
        got = engine.scheduler().step_logits([r])[0]
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        r.ids[0, r.n] = int(ref.argmax())
        r.n += 1


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_batched_equals_solo(tiny_cfg, tokenizer):
    """bf16 weights need no row padding (row_block 1): oneDNN rounds each row alike whatever the row count."""
    torch.manual_seed(0)
    engine = ChatEngine(MiniMindVLM(tiny_cfg()).to(torch.bfloat16).eval(), tokenizer, None)
    engine.model.init_buffers()
    assert engine.row_block == 1
    alone = [solo(engine, i, max_new_tokens=100) for i in range(4)]
    together = run_together(engine, [ask(engine, i, max_new_tokens=100) for i in range(4)],
                            delays=[0, 0.01, 0.03, 0.02])
    assert engine.scheduler().most_active >= 2
    assert together == alone


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
@torch.inference_mode()
def test_bf16_same_length_prompts_prefilled_together_equal_solo(tiny_cfg, tokenizer):
    """Prompts of one length (one image each) are prefilled in one forward pass; each request's KV cache and
    next-step logits are bit-identical to its solo prefill's (bf16 rounds rows alike)."""
    from model.LMConfig import IMAGE_MARKER
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_cfg()).eval()
    model.to(torch.bfloat16).init_buffers()
    engine = ChatEngine(model, tokenizer, None)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 50, 768, generator=g) for _ in range(4)]

    def req(k):  # one length: question k differs in one digit
        messages = [{"role": "user", "content": f"{IMAGE_MARKER}\nWhat is in picture {k + 1}?"}]
        return engine.generate(messages, feats[k], max_new_tokens=20, temperature=0, top_p=None).request
    sched = engine.scheduler()
    alone = [req(k) for k in range(4)]
    for r in alone:
        assert sched._prefill([r]) == [r]
    together = [req(k) for k in range(4)]
    groups = sched._prefill_groups(together)
    assert [len(grp) for grp in groups] == [4]
    assert sched._prefill(groups[0]) == together
    T = alone[0].cache.length  # the prompt (n is one past it: the first answer token)
    for a, b in zip(alone, together):
        assert b.cache.length == T and b.n == a.n == T + 1
        assert torch.equal(a.cache.k[:, :, :T], b.cache.k[:, :, :T]) and torch.equal(a.cache.v[:, :, :T], b.cache.v[:, :, :T])
        assert torch.equal(a.ids[:, :T + 1], b.ids[:, :T + 1])  # the same first token
    assert not torch.equal(alone[0].cache.k, alone[1].cache.k)  # the rows really differ
    assert torch.equal(sched.step_logits(alone), sched.step_logits(together))


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_concurrent_encodes_share_one_batch(tiny_cfg, tokenizer, random_tower):
    """Images of requests that arrive together are encoded in one batch, each equal to its solo encoding."""
    from PIL import Image
    from model.vision import load_vision_model
    vision = load_vision_model(random_tower, dtype=torch.bfloat16)
    engine = ChatEngine(MiniMindVLM(tiny_cfg()).to(torch.bfloat16).eval(), tokenizer, vision, torch.bfloat16)
    images = [Image.new("RGB", (64 + 8 * k, 64), (40 * k, 200 - 30 * k, 90)) for k in range(4)]
    alone = [engine.encode([im]) for im in images]
    batches = []
    original = engine.vision.forward
    engine.vision.forward = lambda pixels: batches.append(len(pixels)) or original(pixels)
    out = [None] * 4
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, engine.encode([images[k]]))) for k in range(4)]
    with engine.lock:  # held, as by a decoding step: the four calls queue up meanwhile
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while len(engine._encode_queue) < 4 and time.time() < deadline:
            time.sleep(0.001)
    for t in threads:
        t.join(30)
    assert batches == [4]
    assert all(torch.equal(a, b) for a, b in zip(alone, out))


# -- through the OpenAI-compatible API: real HTTP, a server in this process ---------------------------------


@pytest.fixture
def api_url(tiny_cfg, tokenizer):
    """serve_openai_api's app on a free port, over a random model that rarely ends an answer early, with one
    decoding slot and one waiting place."""
    import socket

    import uvicorn

    from serve_openai_api import create_app
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_cfg(dim=128, n_layers=4, max_seq_len=8192)).eval()
    engine = ChatEngine(model, tokenizer, None, max_batch=1, max_waiting=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(10)


def test_api_busy_429_and_disconnect_frees_the_slot(api_url):
    import httpx
    import openai
    url, engine = api_url
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[1]}], "temperature": 0,
            "max_tokens": 8000, "stream": True}
    started = time.time()  # seconds of decoding, unless the client goes away
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as first:  # holds the slot
            lines = first.iter_lines()
            while '"content": ""' in next(lines) or engine.scheduler().load()["active"] == 0:
                pass  # until the first text arrives
            waiting = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", timeout=60,
                                                                 json=dict(body, stream=False, max_tokens=5)))
            waiting.start()  # takes the waiting place
            deadline = time.time() + 10
            while engine.scheduler().load()["waiting"] == 0 and time.time() < deadline:
                time.sleep(0.005)
            full = http.post(url + "/v1/chat/completions", json=dict(body, stream=False))
            assert full.status_code == 429
            assert full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "server_busy"
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="m", messages=body["messages"], max_tokens=5)
        # the streaming client is gone: its slot frees, the waiting request is answered
        waiting.join(30)
        assert not waiting.is_alive()
        deadline = time.time() + 10
        while engine.scheduler().load() != {"active": 0, "waiting": 0} and time.time() < deadline:
            time.sleep(0.01)
        assert engine.scheduler().load() == {"active": 0, "waiting": 0}
        assert engine.scheduler().cancelled == 1  # the first answer was stopped, not finished
        print(f"slot freed {time.time() - started:.1f} s after the first request")
        assert http.post(url + "/v1/chat/completions", json=dict(body, stream=False, max_tokens=5)).status_code == 200
