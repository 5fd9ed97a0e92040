"""The one inference engine: a MiniMind-V model, its tokenizer and the frozen vision tower, answering
conversations. 3-eval_chat.py, web_server.py, serve_openai_api.py and the exported transformers model
(modeling_minimind_v.py) all answer through ChatEngine.

  conversation  -> prompt ids          ChatEngine.prepare (model/tokenizer.py's chat format, checked)
  images        -> image features      ChatEngine.encode / image_features (through a feature cache if given)
  one answer, streamed                 ChatEngine.generate -> Generation (text pieces as they are decoded)
  many answers at once                 ChatEngine.answer_batch (all through the scheduler, greedy or sampled)
  where an answer looked in its image  ChatEngine.explain -> one ImageRelevance per image (model/relevance.py)

Many users, one model (continuous batching): every request keeps its own conversation, image features, KV
cache, sampling settings and seeded random generator. The Scheduler runs ONE forward pass per step over every
active request: a new request's prompt is prefilled between two steps and it joins the next one; a finished
request (EOS, max tokens) or a cancelled one (Generation.cancel: client gone, stop pressed) leaves at once and
frees its slot. At most `max_batch` requests decode together; later ones wait in arrival order, and beyond
`max_waiting` waiting ones ChatEngine.generate refuses with Busy (the API's 429).

Which thread computes. All of the engine's tensor work (image encodes, prefills, decoding steps, explanations) runs
on one thread at a time, and in a server on one thread only: its main thread, in Scheduler.serve_forever, while
the HTTP/Gradio threads only hand requests over and wait. Elsewhere (the terminal chat, batch evaluation, a
library caller) the thread that waits for its answer runs the steps itself, for every request in flight. Why:
PyTorch's CPU kernels run on an OpenMP thread team, one per Python thread that ever ran a large op; once two
teams exist on a 2-core machine, GNU OpenMP stops spinning between parallel regions and every small product
pays a wake-up (measured on an Intel Xeon: a (1, 512) x (512, 1536) product takes 29 us on the main thread,
120 us while a second thread that once ran a large op is alive; the thread itself costs nothing when the
main thread never ran one). So request threads never touch large tensors (encode takes numpy pixels), and the
model steps on the thread that loaded it.

A decoding step (Scheduler.decode_step) runs the weight products on the stacked rows' one new token each, with
q/k/v and w1/w3 fused into single products (decode_products), in int8 where the plan says so (model/hardware.py,
model/quant.py); each row's attention reads its own unpadded KV cache at its own RoPE position. A prompt's
prefill runs the model's own forward pass on its own weights.

Batched answers equal solo ones, on every CPU: a kernel may round a row differently by the number of rows it is
given, and how depends on the machine (model/batch_invariance.py). At load the engine asks this machine's
kernels, for its own matrices, and decodes in the way that leaves each row's bits unchanged: the step's rows
padded to a multiple of `row_block` in one product, or each row in a product of its own (row_block None). Where
the kernels allow, requests that arrive together share their prompts' prefill (one pass) and their images'
encoding (one batch); elsewhere each is done alone. A request's greedy answer (and its seeded sampled one) is
then bit-identical however many others run beside it and whenever they join (tests/test_batching.py). MoE
experts see a varying number of rows, so with use_moe answers are equal only up to rounding.
"""
import collections
import io
import itertools
import secrets
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .batch_invariance import decode_row_block, encode_pass, shared_prefill_rows
from .checkpoint import UPSTREAM_TRAINED_LEN, load_vlm, resolve_checkpoint, trained_context
from .hardware import InferencePlan, inference_plan
from .images import MAX_IMAGE_PIXELS, BadImage, clip_pixels, read_image
from .LMConfig import IMAGE_MARKER
from .model import FeedForward, KVCache, apply_rope, attention, sample_next_token
from .quant import Int8Linear
from .relevance import answer_relevance
from .tokenizer import DEFAULT_TOKENIZER, build_prompt, load_tokenizer
from .vision import DEFAULT_VISION_MODEL, cached_features, encode_images, load_vision_model

MAX_IMAGE_BYTES = 10 * 2 ** 20  # an upload larger than this is refused before it is decoded
MAX_BATCH = 8  # answers decoded together; more wait for a free slot
MAX_WAITING = 64  # answers waiting for a slot; more are refused (Busy)
ENCODE_BATCH = 4  # images of several requests one encode pass may hold (where they encode alike)


class InputError(ValueError):
    """Something wrong with what a user sent. The message says what, and is safe to show them."""


class TooLarge(InputError):
    """An upload over a size limit (bytes or pixels)."""


class Busy(RuntimeError):
    """Every decoding slot is taken and the waiting line is full: try again later (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server is stopping: answers in flight finish, new ones are refused (HTTP 503)."""


class PromptTooLong(InputError):
    """A conversation that leaves the model no room to answer: n_tokens, of which the model reads at most
    `limit` before answering."""

    def __init__(self, message, n_tokens, limit):
        super().__init__(message)
        self.n_tokens, self.limit = n_tokens, limit


def open_image(data: bytes, name: str = "the image", max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an uploaded image (bytes, never a path a client chose) into upright RGB, or raise InputError
    (TooLarge for the byte and pixel limits)."""
    if not data:
        raise InputError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise TooLarge(f"{name} is {len(data) / 2 ** 20:.1f} MiB; the limit is {max_bytes / 2 ** 20:.1f} MiB")
    try:
        return read_image(io.BytesIO(data), name, max_pixels)
    except BadImage as e:
        raise (TooLarge if e.kind == "image_too_large" else InputError)(str(e)) from None


class IncrementalDecoder:
    """Token ids in, text pieces out, at O(1) cost per token however long the answer grows.

    Decoding each new token on its own would break two things: a byte-level BPE splits a Chinese character or
    an emoji over several tokens (alone, each decodes to U+FFFD), and some tokenizers drop a token's leading
    space when it starts the decoded text. So it decodes a short window: the tokens since the last emitted
    piece plus the piece before them as context, and emits only the new text, once it ends in whole
    characters. `flush()` returns what is left at the end (an unfinished byte sequence, as the tokenizer
    decodes it)."""

    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = []
        self.prefix = 0  # window start: the context tokens
        self.read = 0  # tokens before this one have been emitted

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


def text_pieces(token_ids, tokenizer):
    """Text pieces for an iterable of token ids (without the EOS), streamed by IncrementalDecoder."""
    decoder = IncrementalDecoder(tokenizer)
    for t in token_ids:
        piece = decoder.push(t)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


def count_placeholders(ids, image_ids) -> int:
    """The complete image placeholders in a prompt's ids, as MiniMindVLM.placeholder_mask counts them, in numpy:
    prepare() runs on the front end's threads (an HTTP event loop, Gradio's workers), where a torch op over a long
    prompt would start an OpenMP team of that thread's own, which lives as long as the thread and slows every
    small product of the engine's thread (see the module docstring)."""
    ids, pattern = np.asarray(ids, dtype=np.int64), np.asarray(image_ids, dtype=np.int64)
    if len(ids) < len(pattern):
        return 0
    windows = np.lib.stride_tricks.sliding_window_view(ids, len(pattern))
    return int((windows == pattern).all(axis=1).sum())


class Generation:
    """Iterate for the answer's text pieces; afterwards prompt_tokens, completion_tokens and finish_reason
    ('stop': the model ended its answer, 'length': max_new_tokens or the context ran out, 'cancelled') are
    set. cancel() (from any thread), or closing the iterator early, stops the answer and frees its slot."""

    def __init__(self, engine, ids, image_features, max_new_tokens, sampling, seed):
        self.engine, self.ids, self.image_features = engine, ids, image_features
        self.prompt_tokens, self.completion_tokens = len(ids), 0
        self.finish_reason = None
        room = engine.context - len(ids)
        self.max_new_tokens = max(0, min(int(max_new_tokens), room))
        self.sampling = sampling
        self.seed = secrets.randbits(63) if seed is None else int(seed)
        self.request = _Request(self)

    def cancel(self):
        """The consumer has gone (client disconnected, stop pressed): the scheduler drops the request before
        its next step, and an iteration in progress ends."""
        self.request.cancelled = True

    def start(self):
        """Hand the request to the engine's scheduler (iterating does it on the first next())."""
        if self.request.submitted:
            raise RuntimeError("a Generation streams its answer once")
        self.request.submitted = True
        self.engine.scheduler().submit(self.request)

    def token_ids(self):
        """The answer's token ids as the scheduler hands them over (without the end-of-answer id). Waiting for
        one may mean running the engine's steps on this thread (see the module docstring)."""
        request, scheduler = self.request, self.engine.scheduler()
        try:
            while True:
                scheduler.wait_for(lambda: request.out)
                token = request.out.popleft()
                if token is None:  # the end; finish_reason is set
                    self.finish_reason = request.finish_reason
                    return
                if isinstance(token, BaseException):
                    raise token
                self.completion_tokens += 1
                yield token
        finally:
            request.cancelled = True  # no-op after the end; otherwise the scheduler drops it

    def __iter__(self):
        """Text pieces."""
        self.start()
        yield from text_pieces(self.token_ids(), self.engine.tokenizer)

    def text(self) -> str:
        return "".join(self)


class ChatEngine:
    """A MiniMind-V model, its tokenizer and the frozen vision tower, ready to answer. `ChatEngine.load`
    reads them from files; the constructor takes them already loaded (as the exported model does).

    row_block: None (the default) asks this machine's kernels how to batch a decoding step's rows so that each
    row's result does not depend on the others (model/batch_invariance.py); an int forces the step's rows to be
    padded to a multiple of it in one product, which on some CPUs makes an answer depend on its batch.
    context: the most tokens a conversation may hold, prompt and answer together (the length the model was trained
    with; default and upper bound: its config's max_seq_len, the RoPE tables' length)."""

    def __init__(self, model, tokenizer, vision_model, autocast=None, name="MiniMind-V", vision_name="",
                 max_batch=MAX_BATCH, max_waiting=MAX_WAITING, row_block=None, int8=False, context=None):
        self.model, self.tokenizer, self.vision = model.eval(), tokenizer, vision_model
        self.cfg = model.params
        self.context = min(int(context or self.cfg.max_seq_len), self.cfg.max_seq_len)
        self.accepting = True  # False while a server drains: generate() refuses with ShuttingDown
        self.device = model.output.weight.device
        self.dtype = model.output.weight.dtype  # the decoder's weights and activations
        self.autocast = autocast  # dtype the image encoder runs in (None: fp32)
        self.name, self.vision_name = name, vision_name
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.max_batch, self.max_waiting = int(max_batch), int(max_waiting)
        # Keys/values are kept in fp32 on CPU: there, one query's attention over bf16 keys takes ~4x as long as
        # over fp32 ones (measured: 93 vs 20 us a call), and the cache is small next to the weights.
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.plan = InferencePlan(self.dtype, int8, autocast)
        self.layer_products, self.head = decode_products(model, int8)
        products = [self.head] + [p for group in self.layer_products for p in group if p is not None]
        self.row_block = (decode_row_block(products, self.max_batch, self.dtype, self.device) if row_block is None
                          else int(row_block))
        # rows one prefill pass may hold for several prompts (0: each prompt alone); it also projects their images
        prefill = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.prefill_rows = 0 if self.cfg.use_moe else shared_prefill_rows(prefill, self.dtype, self.device)
        self.encode_pass = None  # (images per encode pass, padded to it?): asked of the tower at the first encode
        self._scheduler = Scheduler(self)

    def scheduler(self) -> "Scheduler":
        return self._scheduler

    @classmethod
    def load(cls, ckpt, vision_model=DEFAULT_VISION_MODEL, tokenizer=DEFAULT_TOKENIZER, device=None, dtype="auto",
             max_seq_len=None, **batching):
        """From a checkpoint (.safetensors/.pth/stem/export directory), a CLIP directory and a tokenizer
        directory (batching: max_batch, max_waiting, row_block). dtype: 'auto' (model/hardware.py's rule),
        'float32', 'bfloat16', 'float16' (autocasts the image encoder only) or 'int8' (weight-only int8 decoder
        products, CPU). The context is the length the checkpoint was trained with (max_seq_len overrides it, with
        a warning; a file that does not say gets upstream v1's 200, with a notice). Missing or mismatched files
        raise FileNotFoundError or ValueError naming them."""
        device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        tok = load_tokenizer(tokenizer)
        ckpt = resolve_checkpoint(ckpt)
        context = serving_context(ckpt, max_seq_len)
        plan = inference_plan(device.type, dtype)
        # RMSNorm, RoPE and the sampled logits stay fp32 (model.py), and so does the KV cache on CPU (kv_dtype).
        # fp16 weights are not used: an fp16 residual stream can overflow where bf16's range cannot. The weights
        # are read straight into their dtype (no fp32 copy in memory).
        model, _ = load_vlm(ckpt, tok, device, plan.dense)
        vision = load_vision_model(vision_model, device, plan.encoder or torch.float32)
        return cls(model, tok, vision, plan.encoder, Path(ckpt).stem, Path(vision_model).name, int8=plan.int8_decoding,
                   context=context, **batching)

    def describe(self) -> str:
        moe = ", MoE" if self.cfg.use_moe else ""
        random = " (random init: demo only)" if "random" in self.vision_name else ""
        return (f"{self.name} · {self.model.num_parameters() / 1e6:.1f}M parameters (dim {self.cfg.dim}, "
                f"{self.cfg.n_layers} layers{moe}, context {self.context}, {self.plan.describe()}) · "
                f"vision: {self.vision_name}{random} · {self.device}")

    # -- images -------------------------------------------------------------------------------------------

    def encode(self, images) -> torch.Tensor:
        """(n, 50, 768) CPU features for a list of RGB PIL images, encoded by whichever thread runs the engine's
        steps (this one, or the server's main thread: see the module docstring). The pixels are made here, in
        numpy. Requests that arrive together are encoded in one batch where that leaves each image's features
        unchanged on this machine (4 images take 52 ms instead of 4 x 40 ms in bf16 on the AMX Xeon)."""
        job = _EncodeJob(np.stack([clip_pixels(im) for im in images]))
        self._scheduler.submit_encode(job)
        self._scheduler.wait_for(lambda: job.done)
        if job.error is not None:
            raise job.error
        return job.features

    def image_features(self, pixels, keys=None, cache=None) -> torch.Tensor:
        """(n, 50, 768) features for preprocessed (n, 3, 224, 224) pixels, on the calling thread (batch
        evaluation); through `cache` when it and the images' cache keys are given."""
        if cache is None or keys is None:
            return encode_images(self.vision, pixels, self.autocast)
        return cached_features(self.vision, keys, cache, keys, pixels, self.autocast)

    # -- answers ------------------------------------------------------------------------------------------

    def prepare(self, messages, n_images: int) -> list:
        """Prompt ids for [{"role", "content"}, ...], where `<image>` in a content marks where each of the
        n_images images goes. Raises InputError when the markers and images disagree or it is too long."""
        ids = self.tokenizer(build_prompt(messages), add_special_tokens=False).input_ids
        found = count_placeholders(ids, self.cfg.image_ids)
        if found != n_images:
            raise InputError(f"the conversation has {found} image placeholder(s) for {n_images} image(s)"
                             f" (is there a literal '{IMAGE_MARKER}' or a run of '<'/'>' in the text?)")
        if len(ids) >= self.context:
            limit = self.context - 1
            raise PromptTooLong(f"the conversation is {len(ids)} tokens; this model's context is {self.context} "
                                f"tokens, so it reads at most {limit} before answering. Start a new conversation "
                                "or ask something shorter.", len(ids), limit)
        return ids

    def generate(self, messages, image_features=None, max_new_tokens=256, temperature=0.65, top_k=None,
                 top_p=0.85, repetition_penalty=1.0, seed=None) -> Generation:
        """Check the request now (raising InputError) and return a Generation that streams the answer."""
        n_images = 0 if image_features is None else image_features.shape[0]
        ids = self.prepare(messages, n_images)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        if not self.accepting:
            raise ShuttingDown("the server is shutting down: it finishes the answers in flight and takes no new ones")
        sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p,
                        repetition_penalty=repetition_penalty)
        generation = Generation(self, ids, image_features, max_new_tokens, sampling, seed)
        if not self.scheduler().admit(generation.request, self.max_batch + self.max_waiting):
            raise Busy(f"the server is busy: {self.max_batch} answers are being written and {self.max_waiting} "
                       "more are waiting; try again in a moment")
        return generation

    def explain(self, messages, image_features, answer: str) -> list:
        """Where `answer` (the assistant's reply to `messages`, which end with the user's turn) found its evidence in
        each of the conversation's images: one model.relevance.ImageRelevance per image (a 7x7 grid of patch shares
        plus the CLS token's share, summing to 1). The answer is tokenized as training tokenizes an answer. Computed
        only when asked, by the thread that runs the engine's steps (as encode is); raises InputError when there is
        no image or no answer, or they do not fit the context."""
        n_images = 0 if image_features is None else image_features.shape[0]
        if n_images == 0:
            raise InputError("there is no image to explain")
        if not messages or messages[-1]["role"] != "user":
            raise InputError("the conversation to explain must end with the question the answer replies to")
        ids = self.prepare(messages, n_images)
        answer_ids = self.tokenizer(answer or "", add_special_tokens=False).input_ids
        if not answer_ids:
            raise InputError("the answer is empty: there is nothing to explain")
        full = ids + answer_ids
        if len(full) > self.context:
            raise InputError(f"the conversation and its answer are {len(full)} tokens; this model's context is "
                             f"{self.context}")
        if int(self.model.placeholder_mask(torch.tensor([full]))[1][0]) != n_images:
            raise InputError("the answer holds a run of '<'/'>' that reads as an image placeholder")
        job = _ExplainJob(full, image_features, len(ids))
        self._scheduler.submit_explain(job)
        self._scheduler.wait_for(lambda: job.done)
        if job.error is not None:
            raise job.error
        return job.relevance

    def answer_batch(self, prompt_ids, image_features, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None,
                     repetition_penalty=1.0, seed=None) -> list:
        """Answers (strings) for many prompts (ids from prepare), each with its (n_i, 50, 768) image features or
        None, decoded together by the scheduler (up to max_batch at a time). Prompt i samples with seed + i."""
        sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p,
                        repetition_penalty=repetition_penalty)
        gens = [Generation(self, ids, f, max_new_tokens, sampling, None if seed is None else seed + i)
                for i, (ids, f) in enumerate(zip(prompt_ids, image_features))]
        for g in gens:  # all queued before any is read, so that they decode together
            g.start()
        return [self.tokenizer.decode(list(g.token_ids()), skip_special_tokens=True).strip() for g in gens]


def serving_context(ckpt, max_seq_len=None) -> int:
    """The context to serve a checkpoint with (see ChatEngine.load); says on stderr where it came from when that is
    not the checkpoint itself."""
    trained, how = trained_context(ckpt)
    if max_seq_len:
        if max_seq_len != trained:
            print(f"warning: serving with context {max_seq_len} (--max_seq_len), but the model was trained with "
                  f"{trained if trained else 'an unrecorded length'}: positions past that were never trained",
                  file=sys.stderr)
        return int(max_seq_len)
    if trained:
        return trained
    print(f"note: {how}; serving with context {UPSTREAM_TRAINED_LEN}, upstream v1's training length "
          "(--max_seq_len sets another)", file=sys.stderr)
    return UPSTREAM_TRAINED_LEN


# ----------------------------------------------------------------------------------------------------------
# Continuous batching


def decode_products(model, int8: bool):
    """The weight products of a decoding step: per layer (wqkv, wo, w13, w2), and the output head. q/k/v are
    stacked into one product and w1/w3 into another, so a step runs 4 products a layer instead of 7 (at one token
    a row, each costs about as much in fixed overhead as in arithmetic). With int8: int8 copies (model/quant.py).
    Otherwise the model's own matrices: the stacked ones become the storage of the layer's wq/wk/wv/w1/w3 (views:
    no memory is added and the state dict keeps upstream's names). w13 and w2 are None for a MoE layer (its
    experts run as they are)."""
    layers = []
    with torch.no_grad():
        for layer in model.layers:
            att, ff = layer.attention, layer.feed_forward
            dense_ffn = isinstance(ff, FeedForward)
            if int8:
                qkv, wo = Int8Linear(torch.cat([att.wq.weight, att.wk.weight, att.wv.weight])), Int8Linear(att.wo.weight)
                ffn = (Int8Linear(torch.cat([ff.w1.weight, ff.w3.weight])), Int8Linear(ff.w2.weight)) if dense_ffn else None
            else:
                qkv, wo = stack_linears([att.wq, att.wk, att.wv]), att.wo
                ffn = (stack_linears([ff.w1, ff.w3]), ff.w2) if dense_ffn else None
            layers.append((qkv, wo) + (ffn or (None, None)))
        head = Int8Linear(model.output.weight) if int8 else model.output
    return layers, head


def stack_linears(linears):
    """One bias-free nn.Linear computing `linears` side by side, whose weight the linears' weights then are
    views of."""
    whole = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears), bias=False,
                      device="meta")  # no throw-away init: its weight is the stacked matrices
    whole.weight = nn.Parameter(torch.cat([l.weight for l in linears]), requires_grad=False)
    start = 0
    for lin in linears:
        lin.weight.data = whole.weight[start:start + lin.out_features]
        start += lin.out_features
    return whole


class _Request:
    """One Generation inside the scheduler: its ids, KV cache and random generator. The scheduler appends token
    ids to `out`, then None (the end, finish_reason set) or an exception; the consumer sets `cancelled`."""

    def __init__(self, generation):
        self.gen = generation
        self.out = collections.deque()
        self.cancelled = self.submitted = False
        self.finish_reason = None
        self.ids = self.cache = self.generator = None
        self.n = 0  # ids filled: prompt + answer so far

    def finish(self, reason):
        self.finish_reason = reason
        self.out.append(None)
        self.release()

    def fail(self, error):
        self.finish_reason = "error"
        self.out.append(error)
        self.release()

    def release(self):
        """Drop what decoding needed as soon as the answer ends: its KV cache (megabytes) must not wait for the
        consumer to let go of its Generation, nor, through the Generation <-> _Request cycle, for a full garbage
        collection, which a long-running server seldom does."""
        self.ids = self.cache = self.generator = self.gen = None


class _EncodeJob:
    """Images waiting to be encoded: (n, 3, 224, 224) numpy pixels in, (n, 50, 768) CPU features out."""

    def __init__(self, pixels):
        self.pixels, self.features, self.error, self.done = pixels, None, None, False


class _ExplainJob:
    """An answer to explain: prompt + answer ids, where the answer starts and the images' features in, one
    ImageRelevance per image out (model/relevance.py)."""

    def __init__(self, ids, features, answer_start):
        self.ids, self.features, self.answer_start = ids, features, answer_start
        self.relevance, self.error, self.done = None, None, False


class Scheduler:
    """Continuous batching for one ChatEngine, with no thread of its own. Each turn (run_once): encode the
    images waiting, admit waiting requests while fewer than max_batch decode (prefilled, which also samples each
    one's first token), run one decoding step over every active request, then compute the explanations asked for
    (ChatEngine.explain). Requests that finished or were cancelled leave between steps.

    Who runs the turns: the thread in serve_forever (a server's main thread) when there is one; otherwise any
    thread waiting in wait_for (for its next token, or its images' features) runs them while no other thread
    does. Either way one thread at a time, and the others wait on `cond`."""

    def __init__(self, engine):
        self.engine = engine
        self.cond = threading.Condition()
        self.waiting = collections.deque()  # submitted, not decoding yet
        self.admitted = weakref.WeakSet()  # admitted by ChatEngine.generate, not submitted yet
        self.active = []
        self.starting = []  # taken from `waiting` by the turn in progress, being prefilled
        self.encodes = []  # _EncodeJobs not yet encoded
        self.explains = []  # _ExplainJobs not yet computed
        self.driver = None  # the thread running a turn now
        self.resident = None  # the thread in serve_forever, if any
        self.stopping = False
        self.steps = 0  # decoding steps run
        self.most_active = 0  # the largest batch a step has run
        self.cancelled = 0  # requests dropped because their consumer went away

    def admit(self, request, limit) -> bool:
        """Count a new request in (False: `limit` requests are decoding or waiting already). The check and the count
        are one step, so requests arriving together cannot all pass it; a request counts from here, before it is
        submitted (a Generation is iterated later, often by another thread), until it ends, is cancelled or is
        dropped unstarted (the weak set forgets it once collected)."""
        with self.cond:
            if self.queued_locked() >= limit:
                return False
            self.admitted.add(request)
            return True

    def submit(self, request):
        with self.cond:
            self.admitted.discard(request)
            self.waiting.append(request)
            self.cond.notify_all()

    def submit_encode(self, job):
        with self.cond:
            self.encodes.append(job)
            self.cond.notify_all()

    def submit_explain(self, job):
        with self.cond:
            self.explains.append(job)
            self.cond.notify_all()

    def queued(self) -> int:
        """Requests decoding or waiting (not cancelled)."""
        with self.cond:
            return self.queued_locked()

    def queued_locked(self) -> int:
        load = self.load_locked()
        return load["active"] + load["waiting"]

    def load(self) -> dict:
        """{'active': requests decoding, 'waiting': requests admitted that do not decode yet} (a snapshot)."""
        with self.cond:
            return self.load_locked()

    def load_locked(self) -> dict:
        decoding, waiting = self._in_flight_locked()
        return {"active": len(decoding), "waiting": len(waiting)}

    def _in_flight_locked(self):
        """(decoding, waiting): the requests not cancelled that hold a slot (prefilling or decoding) and those
        admitted that wait for one (submitted or not yet); what load() counts and cancel_all() cancels."""
        decoding = [r for r in itertools.chain(self.active, self.starting) if not r.cancelled]
        waiting = [r for r in itertools.chain(self.waiting, list(self.admitted)) if not r.cancelled]
        return decoding, waiting

    def _has_work(self) -> bool:
        return bool(self.active or self.waiting or self.encodes or self.explains)

    def wait_for(self, ready):
        """Return once ready() is true (it is called with `cond` held). Meanwhile run the engine's turns on this
        thread whenever no other thread runs them and no thread serves them for good; else wait."""
        me = threading.current_thread()
        with self.cond:
            while not ready():
                if self.driver is None and self.resident in (None, me) and self._has_work():
                    self._turn(me)
                else:
                    self.cond.wait()

    def _turn(self, me):
        """run_once on this thread (called and returning with `cond` held)."""
        self.driver = me
        self.cond.release()
        try:
            self.run_once()
        finally:
            self.cond.acquire()
            self.driver = None
            self.cond.notify_all()

    def serve_forever(self, until=None, tick=None, tick_seconds=60.0):
        """Run the engine's turns on this thread (a server's main thread) until stop() is called or until()
        (checked at least every second) is true; the threads that submit requests then only wait. tick() is called
        every tick_seconds (a server's status line). KeyboardInterrupt ends it too."""
        me = threading.current_thread()
        next_tick = time.monotonic() + tick_seconds
        with self.cond:
            if self.resident is not None:
                raise RuntimeError(f"the engine is already served by {self.resident.name}")
            self.resident, self.stopping = me, False
            try:
                while not self.stopping and not (until and until()):
                    if tick and time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + tick_seconds
                        self.cond.release()
                        try:
                            tick()
                        finally:
                            self.cond.acquire()
                    if self.driver is not None or not self._has_work():
                        self.cond.wait(1.0)
                    else:
                        self._turn(me)
            finally:
                self.resident = None
                self.cond.notify_all()  # waiting consumers run the turns themselves from now on

    def cancel_all(self) -> int:
        """Cancel every request decoding or waiting, admitted ones not yet submitted included (a server's drain
        time is over); how many."""
        with self.cond:
            decoding, waiting = self._in_flight_locked()
            requests = [r for r in decoding + waiting if r.finish_reason is None]
            for r in requests:
                r.cancelled = True
            self.cond.notify_all()
        return len(requests)

    def stop(self):
        """End serve_forever after its current turn."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def run_once(self):
        """One turn: pending image encodes, then admissions (prefills), then one decoding step, then pending
        explanations (after the step: the answers in flight wait for no more than one turn's explanations)."""
        with self.cond:
            jobs, self.encodes = self.encodes, []
            explains, self.explains = self.explains, []
            admitted = self.starting = []  # counted as active from here (load()), though prefilled below
            while self.waiting and len(self.active) + len(admitted) < self.engine.max_batch:
                r = self.waiting.popleft()
                if not self._dropped(r):
                    admitted.append(r)
        if jobs:
            self._encode(jobs)
        joined = [r for group in self._prefill_groups(admitted) for r in self._prefill(group)]
        with self.cond:
            self.starting = []
            self.active = [r for r in self.active + joined if not self._dropped(r)]
            rows = list(self.active)
        if rows:
            self.decode_step(rows)
            with self.cond:  # finished and cancelled requests leave; their slots are free
                self.active = [r for r in self.active if r.finish_reason is None and not self._dropped(r)]
        if explains:
            self._explain(explains)

    def _dropped(self, r) -> bool:
        """True for a request whose consumer went away; the first time before its end, it is counted and
        ended (which wakes a consumer still waiting for its next token)."""
        if r.cancelled and r.finish_reason is None:
            self.cancelled += 1
            r.finish("cancelled")
        return r.cancelled

    def _encode(self, jobs):
        """Encode the jobs' images: several requests' images in one pass where this machine's encoder gives each
        image the features it gets alone (engine.encode_pass, asked at the first encode), else each job's images
        in a pass of their own."""
        e = self.engine
        encode = lambda pixels: encode_images(e.vision, pixels, e.autocast).cpu()  # noqa: E731
        if e.encode_pass is None:
            e.encode_pass = encode_pass(encode, ENCODE_BATCH)
        size, padded = e.encode_pass
        try:
            if size == 1:
                feats = [encode(torch.from_numpy(j.pixels)) for j in jobs]
            else:
                pixels = torch.from_numpy(np.concatenate([j.pixels for j in jobs]))
                out = []
                for chunk in pixels.split(size):
                    n = len(chunk)
                    if padded and n < size:
                        chunk = torch.cat([chunk, chunk.new_zeros((size - n,) + chunk.shape[1:])])
                    out.append(encode(chunk)[:n])
                feats = torch.cat(out).split([len(j.pixels) for j in jobs])
            for j, f in zip(jobs, feats):
                j.features = f
        except Exception as ex:  # each waiting caller sees the failure
            for j in jobs:
                j.error = ex
        for j in jobs:
            j.done = True

    def _explain(self, jobs):
        """Each job's relevance (model/relevance.py: one forward and one backward pass on the model's own weights);
        a failure is that job's alone."""
        for j in jobs:
            try:
                j.relevance = answer_relevance(self.engine.model, j.ids, j.features, j.answer_start)
            except Exception as ex:
                j.error = ex
            j.done = True

    def _emit(self, r, logits) -> bool:
        """Sample r's next token from its (1, V) logits and hand it over; False when r is done."""
        s = r.gen.sampling
        token = sample_next_token(logits.float(), r.ids[:, :r.n], s["temperature"], s["top_k"], s["top_p"],
                                  s["repetition_penalty"], r.generator)
        t = int(token[0])
        if t == self.engine.tokenizer.eos_token_id:
            r.finish("stop")
            return False
        r.out.append(t)
        r.ids[0, r.n] = t
        r.n += 1
        if r.n == r.ids.shape[1]:
            r.finish("length")
            return False
        return True

    def _prefill_groups(self, admitted):
        """The admitted requests in prefill groups: where this machine's kernels give each row its solo result
        (engine.prefill_rows), prompts of the same length share one forward pass (on CPU, 8 prompts cost ~5
        prompts' time), up to prefill_rows rows; otherwise every prompt alone."""
        limit = self.engine.prefill_rows
        groups = []
        by_length = {}
        for r in admitted:
            T = len(r.gen.ids)
            group = by_length.get(T)
            if group is None or (len(group) + 1) * T > limit:
                group = by_length[T] = []
                groups.append(group)
            group.append(r)
        return groups

    def _prefill(self, group) -> list:
        """Run a group's prompts (all of one length) through the model's forward pass, fill each request's own
        KV cache and emit its first token; the requests that go on to decode."""
        e = self.engine
        L = len(e.model.layers)
        going = []
        try:
            for r in list(group):
                if r.gen.max_new_tokens <= 0:
                    r.finish("length")
                    group.remove(r)
            if not group:
                return []
            T = len(group[0].gen.ids)
            for r in group:
                g = r.gen
                r.generator = torch.Generator(device=e.device).manual_seed(g.seed)
                r.ids = torch.empty((1, T + g.max_new_tokens), dtype=torch.long, device=e.device)
                r.ids[0, :T] = torch.tensor(g.ids, dtype=torch.long)
                r.cache = KVCache(L, 1, T + g.max_new_tokens, e.kv_dtype)
                r.n = T
            feats = [None if r.gen.image_features is None else r.gen.image_features.to(e.device) for r in group]
            ids = torch.cat([r.ids[:, :T] for r in group])
            with torch.inference_mode():
                if len(group) == 1:
                    logits = e.model(ids, feats, past_key_values=group[0].cache, last_only=True).logits[:, -1, :]
                else:  # one pass over all rows, then each row's keys/values into its own cache
                    shared = KVCache(L, len(group), T, e.kv_dtype)
                    logits = e.model(ids, feats, past_key_values=shared, last_only=True).logits[:, -1, :]
                    for b, r in enumerate(group):
                        for layer in range(L):
                            r.cache.update(layer, shared.k[layer, b:b + 1], shared.v[layer, b:b + 1])
                        r.cache.advance(T)
                going = [r for b, r in enumerate(group) if self._emit(r, logits[b:b + 1])]
        except Exception as ex:  # these requests fail; the others go on
            for r in group:
                if r.finish_reason is None:
                    r.fail(ex)
            return []
        return going

    def decode_step(self, rows):
        """One decoding step for every active row: its next token is sampled and handed over. A failure fails
        every request in the step (and only them)."""
        self.steps += 1
        self.most_active = max(self.most_active, len(rows))
        try:
            with torch.inference_mode():
                logits = self.step_logits(rows)
                for b, r in enumerate(rows):
                    if not r.cancelled:
                        self._emit(r, logits[b:b + 1])
        except Exception as ex:
            for r in rows:
                if r.finish_reason is None:
                    r.fail(ex)

    def step_logits(self, rows):
        """(B, vocab) logits of each row's last token, written into its KV cache: MiniMindVLM.forward's
        arithmetic for one new position, with the weight products run on all rows at once (padded to a
        multiple of row_block) or one row at a time (row_block None), and the attention run per row over its
        own cache."""
        e = self.engine
        m = e.model
        B = len(rows)
        P = B if e.row_block is None else -(-B // e.row_block) * e.row_block
        tokens = torch.cat([r.ids[:, r.n - 1:r.n] for r in rows] + [rows[0].ids[:, :1]] * (P - B))
        pos = torch.tensor([r.cache.length for r in rows] + [0] * (P - B), device=e.device)
        product = _products(e.row_block is None)
        h = m.tok_embeddings(tokens)  # (P, 1, dim)
        rope = m.rope(pos[:, None])  # (P, 1, 1, head_dim / 2): each row's position
        for layer, (wqkv, wo, w13, w2) in zip(m.layers, e.layer_products):
            att = layer.attention
            hd, nq, nkv = att.head_dim, att.n_heads, att.n_kv_heads
            qkv = product(wqkv, layer.attention_norm(h))
            qk = apply_rope(qkv[..., :(nq + nkv) * hd].view(P, 1, nq + nkv, hd), rope)  # q and k at once
            q, k = qk[:, :, :nq], qk[:, :, nq:]
            v = qkv[..., (nq + nkv) * hd:].view(P, 1, nkv, hd)
            ys = []
            for b, r in enumerate(rows):
                kb, vb = r.cache.update(layer.layer_id, k[b:b + 1], v[b:b + 1])
                ys.append(attention(q[b:b + 1], kb, vb))
            ys += [ys[0]] * (P - B)  # padding rows: any value, their results are dropped
            y = ys[0] if P == 1 else torch.cat(ys)
            h = h + product(wo, y.reshape(P, 1, nq * hd).to(h.dtype))
            x = layer.ffn_norm(h)
            if w13 is None:  # MoE
                h = h + layer.feed_forward(x)
            else:
                a, b = product(w13, x).chunk(2, dim=-1)
                h = h + product(w2, F.silu(a) * b)
        for r in rows:
            r.cache.advance(1)
        return product(e.head, m.norm(h))[:B, -1, :]


def _products(one_row_each: bool):
    """How a decoding step applies a linear module to its (P, 1, d) rows: in one call, or one call per row."""
    if not one_row_each:
        return lambda linear, x: linear(x)
    return lambda linear, x: linear(x) if x.shape[0] == 1 else torch.cat([linear(row) for row in x.split(1)])
