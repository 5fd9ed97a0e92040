"""Continuous batching in ChatEngine (model/engine.py, Scheduler): one forward pass per step over every active
request, joining and leaving between steps, with a cap on concurrent slots and on waiting requests. A request's
answer must not depend on who else is running, on this machine whatever its CPU: greedy and seeded sampled
answers, and a step's logits bit for bit, are compared with the same request run alone, for each decoder weight
format (fp32, int8, and bf16 where the CPU has it), with the decoder shapes of the 27M model where rounding
differs by row count (model/batch_invariance.py). The step gives the model's own forward logits on any thread or
process."""
import gc
import multiprocessing as mp
import os
import threading
import time

import pytest
import torch
import torch.nn as nn

from model.batch_invariance import decode_row_block, rows_alike, shared_prefill_rows
from model.engine import Busy, ChatEngine, InputError, count_placeholders
from model.hardware import cpu_has_fast_bf16
from model.model import KVCache, MiniMindVLM

QUESTIONS = ["What colour is the sky?", "Tell me a long story about a cat.", "1 2 3 4", "你好，请介绍一下你自己。"]
WEIGHTS = ["float32", "int8", pytest.param("bfloat16", marks=pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="this CPU has no native bf16"))]
SHAPES_27M = dict(dim=512, n_layers=1, n_heads=16, n_kv_heads=8)  # 27M's matrices, one block


def engine_in(weights, cfg, tokenizer, **kw):
    """An engine over a seeded random MiniMindVLM, its weights as ChatEngine.load holds them for --dtype `weights`
    (int8: int8 decoding products beside fp32 weights)."""
    torch.manual_seed(0)
    model = MiniMindVLM(cfg).eval()
    if weights == "bfloat16":
        model.to(torch.bfloat16).init_buffers()
    return ChatEngine(model, tokenizer, None, int8=weights == "int8", **kw)


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


def test_an_ended_answer_lets_go_of_its_cache_while_its_generation_lives(make_engine):
    """The KV cache goes when the answer ends (finished or cancelled), not when the garbage collector meets the
    Generation <-> request cycle: a server holds on to answers' objects for a while and seldom collects fully."""
    engine = make_engine(max_batch=2)
    done = ask(engine, 0, max_new_tokens=20)
    done.text()
    dropped = ask(engine, 1, max_new_tokens=400)
    pieces = iter(dropped)
    next(pieces)
    assert dropped.request.cache is not None  # decoding
    pieces.close()
    ask(engine, 2, max_new_tokens=3).text()  # a turn after the cancel drops it
    for r in (done.request, dropped.request):
        assert r.finish_reason in ("stop", "length", "cancelled") and r.cache is None and r.gen is None


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


def test_requests_count_from_their_admission_not_their_first_token(make_engine):
    """Requests arriving together (the API's handlers admit them, worker threads iterate them later) must not all
    pass the check: each counts from generate() on, and one dropped unstarted frees its place."""
    engine = make_engine(max_batch=1, max_waiting=1)
    admitted = [ask(engine, 0, max_new_tokens=5), ask(engine, 1, max_new_tokens=5)]  # none iterated yet
    assert engine.scheduler().load() == {"active": 0, "waiting": 2}
    with pytest.raises(Busy):
        ask(engine, 2)
    admitted.pop().cancel()  # a client gone before its answer began
    third = ask(engine, 2, max_new_tokens=5)
    del third  # dropped without a word (the weak set forgets it once collected)
    gc.collect()
    assert engine.scheduler().load() == {"active": 0, "waiting": 1}
    assert admitted[0].text() is not None and engine.scheduler().load() == {"active": 0, "waiting": 0}
    late = ask(engine, 3, max_new_tokens=5)  # admitted when a server's drain ends: cancelled with the rest
    assert engine.scheduler().cancel_all() == 1 and engine.scheduler().load() == {"active": 0, "waiting": 0}
    assert late.text() == "" and late.finish_reason == "cancelled"


def test_a_request_being_prefilled_counts_as_active(make_engine, monkeypatch):
    """Between leaving the waiting line and joining the decoding batch (its prefill) a request still holds a
    slot: a check made meanwhile must count it."""
    engine = make_engine(max_batch=1, max_waiting=0)
    scheduler, seen = engine.scheduler(), []
    prefill = scheduler._prefill
    monkeypatch.setattr(scheduler, "_prefill", lambda group: (seen.append(scheduler.load()), prefill(group))[1])
    assert ask(engine, 0, max_new_tokens=3).text() is not None
    assert seen == [{"active": 1, "waiting": 0}]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="counts threads in Linux's /proc; one intra-op thread makes no team")
def test_checking_a_request_starts_no_thread_team_on_the_callers_thread(make_engine):
    """generate() runs on a front end's long-lived threads: checking even a long prompt there must not run a torch
    op large enough to give that thread an OpenMP team of its own (model/engine.py says what that costs)."""
    engine = make_engine()
    torch.ones(1 << 20).sum()  # this thread's team exists already
    before, counted, done = len(os.listdir("/proc/self/task")), [], threading.Event()

    def check_long_prompt():
        with pytest.raises(InputError):
            engine.generate([{"role": "user", "content": "<image> " + "describe the picture " * 800}])
        counted.append(len(os.listdir("/proc/self/task")))
        done.wait(10)
    t = threading.Thread(target=check_long_prompt)
    t.start()
    while not counted and t.is_alive():
        time.sleep(0.01)
    done.set()
    t.join()
    assert counted == [before + 1]  # the thread itself, and no team of its own


def test_placeholders_are_counted_as_the_model_counts_them(make_engine):
    engine = make_engine()
    pattern = list(engine.cfg.image_ids)
    rng = torch.Generator().manual_seed(0)
    for trial in range(50):
        pieces = []
        for _ in range(int(torch.randint(0, 5, (1,), generator=rng))):
            pieces.append(torch.randint(0, 20, (int(torch.randint(0, 60, (1,), generator=rng)),), generator=rng).tolist())
            cut = int(torch.randint(1, len(pattern) + 1, (1,), generator=rng))
            pieces.append(pattern if trial % 3 else pattern[:cut])  # whole placeholders, or broken ones
        ids = [t for p in pieces for t in p] or [1]
        assert count_placeholders(ids, pattern) == int(engine.model.placeholder_mask(torch.tensor([ids]))[1][0])


def prefilled(engine, i, max_new_tokens=40):
    r = ask(engine, i, max_new_tokens=max_new_tokens).request
    assert engine.scheduler()._prefill([r]) == [r]
    return r


def advance(requests, token=100):
    """Teacher-force the next input: the same (arbitrary) token for every request."""
    for r in requests:
        r.ids[0, r.n] = token
        r.n += 1


@pytest.mark.parametrize("weights", WEIGHTS)
def test_greedy_batched_equals_solo_in_every_weight_format(tiny_cfg, tokenizer, weights):
    engine = engine_in(weights, tiny_cfg(), tokenizer)
    alone = [solo(engine, i, max_new_tokens=100) for i in range(4)]
    together = run_together(engine, [ask(engine, i, max_new_tokens=100) for i in range(4)],
                            delays=[0, 0.01, 0.03, 0.02])
    assert engine.scheduler().most_active >= 2
    assert together == alone


@torch.inference_mode()
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("others", [1, 2, 4, 6])
def test_a_rows_logits_do_not_depend_on_its_batch(tiny_cfg, tokenizer, others, weights):
    """Bit for bit, which is what makes greedy answers equal (a greedy test alone rarely sees a flipped argmax:
    the rounding differences are tiny). With the 27M model's matrices, where on some CPUs a product rounds a row
    by how many rows it holds (fp32 on an AMX Xeon: rows alike only in calls of 16 or 32): the engine's row
    setting, asked of this machine, must hold whatever it is."""
    engine = engine_in(weights, tiny_cfg(**SHAPES_27M), tokenizer)
    alone, batched = prefilled(engine, 1), prefilled(engine, 1)
    rest = [prefilled(engine, i) for i in range(others)]
    for _ in range(3):
        solo_logits = engine.scheduler().step_logits([alone])
        batch_logits = engine.scheduler().step_logits(rest[:others // 2] + [batched] + rest[others // 2:])
        assert torch.equal(batch_logits[others // 2], solo_logits[0]), engine.row_block
        advance([alone, batched] + rest)


def row_by_row(w):
    """x @ w.T with each row in a product of its own: alike whatever the batch, by construction."""
    return lambda x: torch.cat([row @ w.T for row in x.split(1)])


def rounding_by_row_count(w):
    """A product whose rounding depends on the row count, as some CPU kernels' do: one row is summed in float64."""
    return lambda x: (x.double() @ w.double().T).float() if x.shape[0] == 1 else row_by_row(w)(x)


def rounding_by_place(w):
    """A product that rounds rows in odd places of their call differently."""
    def product(x):
        y = row_by_row(w)(x)
        y[1::2] = (x[1::2].double() @ w.double().T).float()
        return y
    return product


class Product(nn.Module):
    def __init__(self, fn, in_features, out_features):
        super().__init__()
        self.fn, self.in_features, self.out_features = fn, in_features, out_features

    def forward(self, x):
        return self.fn(x)


def test_the_probe_sees_rounding_that_depends_on_the_batch():
    torch.manual_seed(0)
    w = torch.randn(300, 64)
    plain = Product(row_by_row(w), 64, 300)
    by_count, by_place = Product(rounding_by_row_count(w), 64, 300), Product(rounding_by_place(w), 64, 300)
    x = torch.randn(16, 64)
    assert rows_alike(row_by_row(w), x, [1, 2, 3, 16])
    assert not rows_alike(rounding_by_row_count(w), x, [1, 2, 3, 4]) and rows_alike(rounding_by_row_count(w), x, [2, 4])
    assert not rows_alike(rounding_by_place(w), x, [2, 4])
    assert decode_row_block([plain], 8, torch.float32) == 1
    assert decode_row_block([by_count], 8, torch.float32) == 2  # one row alone rounds apart: pad to 2
    assert decode_row_block([by_place], 8, torch.float32) is None  # no padding helps: one row per product
    assert shared_prefill_rows([by_count], torch.float32) == 0


@torch.inference_mode()
def test_a_forced_row_block_that_rounds_apart_is_caught(tiny_cfg, tokenizer, monkeypatch):
    """The equality check of the test above fails when a step's rows do round by their count (a product made
    to, as fp32 on an AMX Xeon does with 4-row blocks), so it would catch such a setting on a real CPU."""
    engine = engine_in("float32", tiny_cfg(), tokenizer, row_block=1)
    head = engine.head
    w = head.weight.detach().clone()
    monkeypatch.setattr(head, "forward", rounding_by_row_count(w))
    alone, batched, other = prefilled(engine, 1), prefilled(engine, 1), prefilled(engine, 2)
    assert not torch.equal(engine.scheduler().step_logits([other, batched])[1],
                           engine.scheduler().step_logits([alone])[0])


def dequantized_model(engine):
    """A copy of the engine's model whose weights are the ones its int8 decoding products multiply by."""
    import copy
    ref = copy.deepcopy(engine.model)
    dq = lambda lin: lin.qweight.float() * lin.scale.float()[:, None]  # noqa: E731
    for layer, (qkv, wo, w13, w2) in zip(ref.layers, engine.layer_products):
        att, ff = layer.attention, layer.feed_forward
        for lin, w in zip((att.wq, att.wk, att.wv), dq(qkv).split([att.wq.out_features, att.wk.out_features,
                                                                     att.wv.out_features])):
            lin.weight = nn.Parameter(w)
        att.wo.weight = nn.Parameter(dq(wo))
        ff.w1.weight, ff.w3.weight = (nn.Parameter(w) for w in dq(w13).chunk(2))
        ff.w2.weight = nn.Parameter(dq(w2))
    ref.output = nn.Linear(ref.params.dim, ref.params.vocab_size, bias=False)  # untied: the embedding stays
    ref.output.weight = nn.Parameter(dq(engine.head))
    return ref


@torch.inference_mode()
def forward_and_step_logits(engine, n=8):
    """(model forward's logits, the engine's step logits) for n teacher-forced steps after a prompt; with int8
    decoding, the forward pass of the model with the int8 products' weights."""
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    ids = engine.prepare(messages, 0)
    r = engine.generate(messages, max_new_tokens=20, temperature=0).request
    engine.scheduler()._prefill([r])
    model = dequantized_model(engine) if engine.plan.int8_decoding else engine.model
    cache = KVCache(len(model.layers), 1, len(ids) + 20, torch.float32)
    for layer in range(len(model.layers)):  # the same prompt keys/values as the engine's request
        cache.update(layer, r.cache.k[layer, :, :len(ids)], r.cache.v[layer, :, :len(ids)])
    cache.advance(len(ids))
    refs, steps = [], []
    for _ in range(n):
        token = r.ids[:, r.n - 1:r.n]
        refs.append(model(token, past_key_values=cache).logits[0, -1].float())
        steps.append(engine.scheduler().step_logits([r])[0].float())
        r.ids[0, r.n] = int(refs[-1].argmax())
        r.n += 1
    return torch.stack(refs), torch.stack(steps)


TOLERANCE = {"float32": 1e-5, "int8": 2e-2, "bfloat16": 2e-2}  # relative to the largest logit


@torch.inference_mode()
@pytest.mark.parametrize("weights", WEIGHTS)
def test_fused_step_gives_the_model_forward_logits(tiny_cfg, tokenizer, weights):
    """Scheduler.step_logits (fused q/k/v and w1/w3, per-row RoPE, fp32 KV cache) against MiniMindVLM.forward
    with a KV cache, teacher-forced over the same tokens: equal up to the rounding of a different summation
    order (and, in bf16 and int8, of activations rounded to bf16: the int8 kernel takes bf16 rows)."""
    engine = engine_in(weights, tiny_cfg(), tokenizer)
    ref, got = forward_and_step_logits(engine)
    assert (got - ref).abs().max() <= TOLERANCE[weights] * ref.abs().max()


def _step_logits_in_a_process(weights, cfg, queue):
    from model.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
    engine = engine_in(weights, cfg, load_tokenizer(DEFAULT_TOKENIZER))
    queue.put(forward_and_step_logits(engine)[1].numpy())  # plain bytes, not a shared-memory handle


@torch.inference_mode()
@pytest.mark.parametrize("weights", WEIGHTS)
def test_step_logits_are_the_same_on_any_thread_or_process(tiny_cfg, tokenizer, weights):
    """Exactly: the thread or process that runs the engine changes its speed (see model/engine.py), never its
    arithmetic. Compared with the same model and steps on this test's own (main) thread."""
    cfg = tiny_cfg(**SHAPES_27M)
    on_main = forward_and_step_logits(engine_in(weights, cfg, tokenizer))[1]
    out = {}
    t = threading.Thread(target=lambda: out.__setitem__("thread", forward_and_step_logits(
        engine_in(weights, cfg, tokenizer))[1]))
    t.start()
    t.join(120)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_step_logits_in_a_process, args=(weights, cfg, queue))
    p.start()
    out["process"] = torch.from_numpy(queue.get(timeout=300))
    p.join(60)
    assert torch.equal(out["thread"], on_main)
    assert torch.equal(out["process"], on_main)


@torch.inference_mode()
@pytest.mark.parametrize("weights", WEIGHTS)
def test_same_length_prompts_prefilled_together_equal_solo(tiny_cfg, tokenizer, weights):
    """Prompts of one length (one image each) share one prefill pass where this machine's kernels give each row
    its solo result (engine.prefill_rows); each request's KV cache and next-step logits are then bit-identical to
    its solo prefill's. Elsewhere each prompt is prefilled alone."""
    from model.LMConfig import IMAGE_MARKER
    engine = engine_in(weights, tiny_cfg(), tokenizer)
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
    per_pass = max(1, engine.prefill_rows // len(together[0].gen.ids))  # prompts one pass may hold
    assert [len(grp) for grp in groups] == [min(per_pass, 4 - k) for k in range(0, 4, per_pass)]
    assert [r for grp in groups for r in sched._prefill(grp)] == together
    T = alone[0].cache.length  # the prompt (n is one past it: the first answer token)
    for a, b in zip(alone, together):
        assert b.cache.length == T and b.n == a.n == T + 1
        assert torch.equal(a.cache.k[:, :, :T], b.cache.k[:, :, :T]) and torch.equal(a.cache.v[:, :, :T], b.cache.v[:, :, :T])
        assert torch.equal(a.ids[:, :T + 1], b.ids[:, :T + 1])  # the same first token
    assert not torch.equal(alone[0].cache.k, alone[1].cache.k)  # the rows really differ
    assert torch.equal(sched.step_logits(alone), sched.step_logits(together))


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="this CPU has no native bf16"))])
def test_concurrent_encodes_equal_solo_and_share_passes_where_alike(tiny_cfg, tokenizer, random_tower, dtype):
    """Images of requests that arrive together share encode passes where the tower gives each image the same
    features in them as alone (asked of this machine at the first encode: any batch up to 4, or passes of exactly
    4, a lone image padded), else each request's images get a pass of their own; equal to solo either way."""
    from PIL import Image
    from model.vision import load_vision_model
    vision = load_vision_model(random_tower, dtype=dtype)
    engine = ChatEngine(MiniMindVLM(tiny_cfg()).to(dtype).eval(), tokenizer, vision,
                        dtype if dtype == torch.bfloat16 else None)
    images = [Image.new("RGB", (64 + 8 * k, 64), (40 * k, 200 - 30 * k, 90)) for k in range(4)]
    assert engine.encode_pass is None
    alone = [engine.encode([im]) for im in images]
    size, padded = engine.encode_pass
    passes = []
    original = engine.vision.forward
    engine.vision.forward = lambda pixels: passes.append(len(pixels)) or original(pixels)
    assert torch.equal(engine.encode([images[0]]), alone[0])
    assert passes == [size if padded else 1]  # a lone image: its pass (padded to the pass size)
    out = [None] * 4
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, engine.encode([images[k]]))) for k in range(4)]
    sched = engine.scheduler()
    with sched.cond:
        sched.driver = threading.current_thread()  # as if this thread were running a turn: the calls queue up
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while len(sched.encodes) < 4 and time.time() < deadline:
        time.sleep(0.001)
    with sched.cond:
        sched.driver = None
        sched.cond.notify_all()
    for t in threads:
        t.join(60)
    assert passes[1:] == ([4] if size == 4 else [1, 1, 1, 1])
    assert all(torch.equal(a, b) for a, b in zip(alone, out))


# -- through the OpenAI-compatible API: real HTTP, a server in this process ---------------------------------


API_KEY = "sk-test-key"


@pytest.fixture(params=[(), (API_KEY,)], ids=["open", "keyed"])
def api_url(tiny_cfg, tokenizer, request):
    """serve_openai_api's app on a free port, over a random model that rarely ends an answer early, with one
    decoding slot and one waiting place; with and without an API key (the key's middleware must not hide a
    client's disconnect)."""
    import socket

    import uvicorn

    from serve_openai_api import create_app
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_cfg(dim=128, n_layers=4, max_seq_len=8192)).eval()
    engine = ChatEngine(model, tokenizer, None, max_batch=1, max_waiting=1)
    engine.headers = {"authorization": f"Bearer {API_KEY}"} if request.param else {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_keys=request.param), host="127.0.0.1", port=port,
                                           log_level="warning"))
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
    with httpx.Client(timeout=60, headers=engine.headers) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as first:  # holds the slot
            lines = first.iter_lines()
            while '"content": ""' in next(lines) or engine.scheduler().load()["active"] == 0:
                pass  # until the first text arrives
            waiting = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", timeout=60,
                                                                 headers=engine.headers,
                                                                 json=dict(body, stream=False, max_tokens=5)))
            waiting.start()  # takes the waiting place
            deadline = time.time() + 10
            while engine.scheduler().load()["waiting"] == 0 and time.time() < deadline:
                time.sleep(0.005)
            full = http.post(url + "/v1/chat/completions", json=dict(body, stream=False))
            assert full.status_code == 429
            assert full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "server_busy"
            client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
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


def test_api_non_streaming_client_that_disconnects_frees_the_slot(api_url):
    """One slot: a long non-streaming answer holds it and a second request waits; the first client gives up after
    2 s (its connection closes); the server notices while it writes the answer, cancels it, and the waiting request
    is answered then, not after the whole 8000-token answer."""
    import httpx
    url, engine = api_url
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[1]}], "temperature": 0,
            "max_tokens": 8000}
    out = {}

    def second():
        time.sleep(0.5)  # the first holds the slot by then
        t = time.time()
        r = httpx.post(url + "/v1/chat/completions", json=dict(body, max_tokens=5), timeout=120, headers=engine.headers)
        out["status"], out["waited_s"] = r.status_code, time.time() - t
    thread = threading.Thread(target=second)
    thread.start()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(120, read=2.0), headers=engine.headers)
    thread.join(60)
    assert out["status"] == 200 and out["waited_s"] < 20
    assert engine.scheduler().cancelled == 1  # stopped, not finished
    assert engine.scheduler().load() == {"active": 0, "waiting": 0}
