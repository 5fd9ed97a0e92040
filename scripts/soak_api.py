"""A soak test anyone can run: serve_openai_api.py under a long, mixed, concurrent load over real HTTP, and whether
it stays correct and stops growing.

  python scripts/soak_api.py --minutes 10                  # a seeded random 27M model, 6 clients
  python scripts/soak_api.py --minutes 0.5 --size tiny --context 2048   # the machinery in about a minute
  python scripts/soak_api.py --ckpt out/512_vlm_sft                     # a trained model, the real CLIP

The server runs in its own process on 127.0.0.1 and a free port (benchmarks/serving.py's start_server), with an
API key, small upload limits (so that refusing them is cheap: --max_request_bytes 1 MiB, --max_image_bytes
256 KiB, --max_image_pixels 1024x1024) and --max_batch/--max_waiting as given. Nothing but 127.0.0.1 is ever
contacted (httpx and the openai client ignore proxy settings, and so does the readiness probe).

Before the load, each prompt of a fixed pool is sent alone (its reference answer): images (224x224 seeded noise
PNGs as data: URLs) and text, one turn and several, greedy (temperature 0) and seeded sampling, --tokens long;
also a long text prompt (--long_tokens) that bursts send, and a probe prompt that asks for as long an answer as
the context allows (disconnects drop it). Then --clients threads go round a deck of request kinds, shuffled with
--seed, each from its own place in the deck, until the deadline:

  chat_image, chat_image_stream, chat_text, chat_text_stream, openai_chat
        a pool prompt (non-streaming, streaming, or through the openai client); 200, whose answer must equal the
        prompt's reference, or 429 server_busy while the queue is full (the client then waits its Retry-After)
  models, health        GET /v1/models (max_model_len = the context) and GET /health (no key)
  non_data_image_url ... image_too_many_pixels
        each kind of request the API refuses, with the status it must get (400, 413; see BAD_REQUESTS)
  missing_key, wrong_key   401 invalid_api_key with WWW-Authenticate
  disconnect_stream, disconnect_nonstream
        the probe prompt, dropped after a few streamed pieces or a short read timeout (the slot must be freed)
  burst   --max_batch + --max_waiting + 4 long requests at once: some must get 429 server_busy with Retry-After

The server's RSS, open fds and threads, /health's busy and waiting (busy never over --max_batch, busy +
waiting never over --max_batch + --max_waiting), are sampled every --sample_interval s. After the load the
server must be idle (busy 0, waiting 0) within IDLE_GRACE_S. Then the disconnect probe: the probe prompt
alone, dropped (streamed, after its first piece; not streamed, after a read timeout), must free its slot in
under half the time its answer takes alone (an answer under 1 s is too short to tell: a tiny model wants a
longer --context).
After IDLE_WORKER_S (the HTTP worker threads' idle timeout) one pool prompt is sent alone again (its answer must
not have changed), and the end values are read. Growth is judged from after warm-up (--warmup) to the end: RSS
within --max_rss_growth %, fds and threads back to their idle counts at start (read after the references, which
start the first worker thread). The server's log (kept: its path is in the result) must hold no traceback, and
SIGTERM must end the server with exit code 0. The CPU time of the server, of this script (its clients) and of
every other process is reported too: on a machine shared with other work, timings and waits mean less.

Prints a table on stderr and one JSON line on stdout (harness.record: with the machine; also to --out). Exit 0
if every check passed; 1 otherwise, naming the checks that failed.
"""
import argparse
import base64
import collections
import dataclasses
import io
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from harness import SIZES, CpuAccount, peak_rss_mib, process_stats, random_model_files, record  # noqa: E402
from serving import image_data_urls, start_server  # noqa: E402

sys.path.insert(0, ROOT)
from model.cli import HelpFormatter  # noqa: E402

MAX_REQUEST_BYTES = 2 ** 20  # the server's limits in a soak: refusing a request over one is cheap to provoke
MAX_IMAGE_BYTES = 256 * 2 ** 10
MAX_IMAGE_PIXELS = 1024 * 1024
IDLE_GRACE_S = 5.0  # once every client has its last answer, the server must be idle within this
IDLE_WORKER_S = 11.0  # anyio's worker threads exit after 10 s idle, when the next job comes (not by themselves)
SETTLE_S = 5.0  # the end's fds and threads may take this long to come back (sockets closing)
RANDOM_CONTEXT = 2048  # a random model's --max_seq_len: the probe's answer (~2000 tokens) takes seconds
MODEL = "minimind-v"  # the name requests send (the server answers with its own)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--minutes", type=float, default=10.0, help="how long the load runs")
    a("--size", choices=sorted(SIZES), default="27m", help="the seeded random model's decoder config")
    a("--ckpt", help="soak this checkpoint instead of a seeded random one (default: a random --size model)")
    a("--vision_model", help="the CLIP tower directory (default: a seeded random tower, or the server's own with "
      "--ckpt)")
    a("--workdir", help="where the random model is written, and reused from (default: a temporary directory, "
      "removed at the end)")
    a("--device", help="the server's --device (default: the server's own: cuda:0 if there is one, else cpu)")
    a("--dtype", default="auto", help="the server's --dtype")
    a("--context", type=int, help="the server's --max_seq_len (default: 2048 for a random model, which was never "
      "trained at any length, so that the disconnect probe's answer lasts long enough to tell; with --ckpt, the "
      "checkpoint's trained context)")
    a("--max_batch", type=int, default=4, help="the server's --max_batch: answers decoded together")
    a("--max_waiting", type=int, default=4, help="the server's --max_waiting: requests beyond the batch that may "
      "wait before 429")
    a("--api_key", help="the key the server asks for (default: a new random one)")
    a("--clients", type=int, default=6, help="concurrent client threads (bursts add theirs)")
    a("--tokens", type=int, default=32, help="max_tokens of the pool's prompts")
    a("--long_tokens", type=int, default=128, help="max_tokens of the long prompt that bursts send")
    a("--seed", type=int, default=0, help="the mix: the deck's order and each client's choices")
    a("--warmup", type=float, help="seconds of load before the warm-up values are read (default: half the run, "
      "at most 60 s)")
    a("--sample_interval", type=float, default=1.0, help="seconds between samples of the server's RSS, fds, "
      "threads and /health")
    a("--request_timeout", type=float, default=120.0, help="seconds any one request may take")
    a("--max_rss_growth", type=float, default=5.0, help="the most RSS may grow from after warm-up to the end, %%")
    a("--no_growth_check", action="store_true", help="report growth (RSS, fds, threads) but do not fail on it")
    a("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.tokens < 1 or args.long_tokens < 1:
        p.error("--minutes, --clients, --tokens and --long_tokens must be positive")
    return args


# -- what is sent -----------------------------------------------------------------------------------------------

def png_data_url(pixels: np.ndarray) -> str:
    """A data: URL of the PNG of an (H, W) or (H, W, 3) uint8 array."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts):
    """A user message of text (str) and image (dict) parts."""
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


@dataclasses.dataclass
class Prompt:
    """A request whose answer is known: sent alone before the load (`answer`, in `seconds`), then again under it."""
    name: str
    messages: list
    params: dict
    max_tokens: int
    image: bool
    answer: str = None
    seconds: float = None

    def body(self, stream=False):
        body = {"model": MODEL, "messages": self.messages, "max_tokens": self.max_tokens, **self.params}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body


def prompt_pool(images, tokens, long_tokens):
    """(the pool, the long prompt): images and text, one turn and three, greedy and seeded sampling."""
    greedy, seeded = {"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}
    a, b, c = (image_part(u) for u in images[:3])
    pool = [
        Prompt("image-greedy", [user(a, "Describe this image.")], greedy, tokens, True),
        Prompt("image-greedy-2", [user("What is in this picture?", b)], greedy, tokens, True),
        Prompt("image-seeded", [user(c, "What colour is it?")], seeded, tokens, True),
        Prompt("image-3-turns-greedy", [user(a, "Describe this image."), {"role": "assistant", "content": "Noise."},
                                        user("Say it again, in other words.")], greedy, tokens, True),
        Prompt("text-greedy", [{"role": "system", "content": "You are terse."}, user("Tell me about the sea.")],
               greedy, tokens, False),
        Prompt("text-seeded", [user("Write a short poem.")], dict(seeded, temperature=1.0, seed=3), tokens, False),
    ]
    long = Prompt("long-greedy", [user("Tell me a long story.")], greedy, long_tokens, False)
    return pool, long


def too_many_bytes_image():
    """A noise PNG over MAX_IMAGE_BYTES (noise does not compress)."""
    side = math.isqrt(MAX_IMAGE_BYTES // 3) + 32
    return png_data_url(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8))


def too_many_pixels_image():
    """A blank grey PNG over MAX_IMAGE_PIXELS: a few KB (a decompression bomb's shape)."""
    side = math.isqrt(MAX_IMAGE_PIXELS) + 64
    return png_data_url(np.full((side, side), 128, dtype=np.uint8))


def bad_number(soak, rng):
    """One of the numbers the API refuses."""
    return rng.choice([{"temperature": -1}, {"temperature": "hot"}, {"temperature": True}, {"top_p": 0},
                       {"top_k": 1.5}, {"max_tokens": 0}, {"max_tokens": soak.context + 1},
                       {"max_completion_tokens": -5}, {"seed": "x"}])


def text_body(text, **extra):
    return {"model": MODEL, "messages": [user(text)], "max_tokens": 4, **extra}


# name -> (status, error code it must carry or None, body(soak, rng): a dict (sent as JSON) or bytes)
BAD_REQUESTS = {
    "non_data_image_url": (400, "unsupported_image_url", lambda s, r: {"messages": [user(image_part(r.choice(
        ["http://127.0.0.1:9/cat.png", "file:///etc/passwd", "/etc/passwd"])), "hi")]}),
    "bad_base64": (400, None, lambda s, r: {"messages": [user(image_part("data:image/png;base64,@@not base64@@"),
                                                              "hi")]}),
    "not_an_image": (400, None, lambda s, r: {"messages": [user(image_part(
        "data:image/png;base64," + base64.b64encode(b"hello, world").decode()), "hi")]}),
    "truncated_image": (400, None, lambda s, r: {"messages": [user(image_part(s.truncated_image), "hi")]}),
    "non_json_body": (400, None, lambda s, r: r.choice([b"not json", b'{"messages": [', b"[1, 2]", b"\xff\xfe"])),
    "empty_messages": (400, None, lambda s, r: {"messages": r.choice([[], None, "hi"])}),
    "n_not_1": (400, None, lambda s, r: text_body("hi", n=r.choice([0, 2, 5]))),
    "stop_sequences": (400, None, lambda s, r: text_body("hi", stop=r.choice(["\n", ["a", "b"]]))),
    "bad_role": (400, None, lambda s, r: {"messages": [{"role": r.choice(["robot", "tool", None]), "content": "hi"}]}),
    "image_not_from_user": (400, None, lambda s, r: {"messages": [
        {"role": "system", "content": [image_part(s.images[0])]}, user("hi")]}),
    "last_not_user": (400, None, lambda s, r: {"messages": [user("hi"), {"role": "assistant", "content": "hello"}]}),
    "image_marker_in_text": (400, None, lambda s, r: text_body(r.choice(["<image>\nhi", "look: <image>"]))),
    "bad_numbers": (400, None, lambda s, r: text_body("hi", **bad_number(s, r))),
    "prompt_too_long": (400, "context_length_exceeded", lambda s, r: text_body("hi " * (s.context + 10))),
    "body_too_large": (413, None, lambda s, r: b"{" + b" " * (MAX_REQUEST_BYTES + 1024) + b"}"),
    "image_too_many_bytes": (413, None, lambda s, r: {"messages": [user(image_part(s.big_image), "hi")]}),
    "image_too_many_pixels": (413, None, lambda s, r: {"messages": [user(image_part(s.bomb_image), "hi")]}),
}
CODES = {401: "invalid_api_key", 429: "server_busy"}  # the code these statuses always carry


# -- the run's shared state --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Kind:
    """A kind of request: how many times it stands in the deck, the outcomes that are right for it and those the
    run must see at least once, and run(soak, http, rng) -> seconds to wait before the client's next request."""
    name: str
    weight: int
    allowed: tuple
    required: tuple
    run: object


class Soak:
    """The server's address, key and context, what requests send, the reference answers, and every outcome
    (thread-safe)."""

    def __init__(self, url, key, context, args):
        self.url, self.key, self.context, self.args = url, key, context, args
        self.auth = {"Authorization": f"Bearer {key}"}
        self.timeout = httpx.Timeout(args.request_timeout, connect=10.0)
        self.images = image_data_urls(3, seed=args.seed)
        png = base64.b64decode(self.images[0].partition(",")[2])
        self.truncated_image = "data:image/png;base64," + base64.b64encode(png[:len(png) // 2]).decode()
        self.big_image, self.bomb_image = too_many_bytes_image(), too_many_pixels_image()
        self.pool, self.long = prompt_pool(self.images, args.tokens, args.long_tokens)
        # the disconnect probe's: as long an answer as the context allows (the server shortens max_tokens to it)
        self.probe = Prompt("probe-greedy", [user("Tell me everything you know.")], {"temperature": 0}, context,
                            False)
        self.burst_size = args.max_batch + args.max_waiting + 4
        self.kinds = {k.name: k for k in kinds()}
        self.counts = {name: collections.Counter() for name in self.kinds}
        self.problems = []  # the first few unexpected outcomes, with what the server said
        self.answers = {"checked": 0, "matched": 0, "mismatches": []}
        self.lock = threading.Lock()

    def client(self, timeout=None) -> httpx.Client:
        """An HTTP client for the server only: proxies in the environment are ignored."""
        return httpx.Client(base_url=self.url, timeout=timeout or self.timeout, trust_env=False)

    def note(self, kind, label, detail=""):
        with self.lock:
            self.counts[kind][label] += 1
            if label not in self.kinds[kind].allowed and len(self.problems) < 30:
                self.problems.append({"kind": kind, "outcome": label, "detail": str(detail)[:300]})

    def compare(self, kind, prompt, text):
        """Count an answer given under load against the prompt's answer alone."""
        with self.lock:
            self.answers["checked"] += 1
            if text == prompt.answer:
                self.answers["matched"] += 1
            elif len(self.answers["mismatches"]) < 20:
                self.answers["mismatches"].append({"kind": kind, "prompt": prompt.name, "alone": prompt.answer,
                                                   "under_load": text})


def error_label(response, code=None):
    """(outcome label, detail) of a refusal: its status when it is an OpenAI-style error with the code expected
    (and, for 401 and 429, the header that goes with it); the status and what is wrong otherwise."""
    status = response.status_code
    try:
        error = response.json()["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an error body", response.text[:200]
    code = code or CODES.get(status)
    if code and error.get("code") != code:
        return f"{status} code {error.get('code')}", message
    if status == 401 and "www-authenticate" not in response.headers:
        return "401 without WWW-Authenticate", message
    if status == 429 and not response.headers.get("retry-after", "").isdigit():
        return "429 without Retry-After", message
    return str(status), message


def retry_after(response) -> float:
    """Seconds a 429 asks the client to wait (0 for any other answer)."""
    value = response.headers.get("retry-after", "") if response.status_code == 429 else ""
    return float(value) if value.isdigit() else 0.0


def read_events(lines, stop_after=None):
    """(text, finish_reason, whether [DONE] came) of a chat completion's server-sent events; with stop_after,
    reading stops after that many text pieces."""
    pieces, finish = [], None
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return "".join(pieces), finish, True
        for choice in json.loads(line[6:]).get("choices", []):
            if choice["delta"].get("content"):
                pieces.append(choice["delta"]["content"])
            finish = choice.get("finish_reason") or finish
        if stop_after and len(pieces) >= stop_after:
            break
    return "".join(pieces), finish, False


def answered(soak, kind, prompt, text, finish, complete=True):
    """Note a 200 answer: complete, ended for a reason, and equal to the prompt's answer alone."""
    if not complete or finish not in ("stop", "length"):
        soak.note(kind, "200 incomplete", f"finish_reason {finish!r}, [DONE] {complete}")
        return
    soak.note(kind, "200")
    soak.compare(kind, prompt, text)


def chat(soak, http, kind, prompt, stream):
    """One chat completion over httpx, noted under kind; returns the Retry-After of a 429."""
    try:
        if stream:
            with http.stream("POST", "/v1/chat/completions", json=prompt.body(True), headers=soak.auth) as r:
                if r.status_code == 200:
                    text, finish, done = read_events(r.iter_lines())
                    answered(soak, kind, prompt, text, finish, done)
                    return 0.0
                r.read()
        else:
            r = http.post("/v1/chat/completions", json=prompt.body(), headers=soak.auth)
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                answered(soak, kind, prompt, choice["message"]["content"], choice["finish_reason"])
                return 0.0
    except httpx.TimeoutException as e:
        soak.note(kind, "timeout", repr(e))
        return 0.0
    except httpx.HTTPError as e:
        soak.note(kind, f"error {type(e).__name__}", repr(e))
        return 0.0
    soak.note(kind, *error_label(r))
    return retry_after(r)


def run_pool_chat(image, stream):
    def run(soak, http, rng):
        prompts = [p for p in soak.pool if p.image == image]
        return chat(soak, http, f"chat_{'image' if image else 'text'}{'_stream' if stream else ''}",
                    rng.choice(prompts), stream)
    return run


def run_openai_chat(soak, http, rng):
    """A pool prompt through the official openai client (streaming or not), which retries nothing here."""
    import openai
    prompt, stream = rng.choice(soak.pool), rng.random() < 0.5
    client = openai.OpenAI(base_url=soak.url + "/v1", api_key=soak.key, max_retries=0,
                           timeout=soak.args.request_timeout, http_client=http)
    body = prompt.body(stream)
    try:
        out = client.chat.completions.create(**body)
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            answered(soak, "openai_chat", prompt, text, finish)
        else:
            answered(soak, "openai_chat", prompt, out.choices[0].message.content, out.choices[0].finish_reason)
    except openai.APIStatusError as e:
        soak.note("openai_chat", *error_label(e.response))
        return retry_after(e.response)
    except openai.APIError as e:
        soak.note("openai_chat", f"error {type(e).__name__}", repr(e))
    return 0.0


def run_models(soak, http, rng):
    r = http.get("/v1/models", headers=soak.auth)
    if r.status_code != 200:
        soak.note("models", *error_label(r))
    elif r.json()["data"][0].get("max_model_len") != soak.context:
        soak.note("models", "200 wrong max_model_len", r.text)
    else:
        soak.note("models", "200")
    return 0.0


def run_health(soak, http, rng):
    r = http.get("/health")
    fields = {"status", "model", "context", "slots", "busy", "waiting", "max_waiting"}
    ok = r.status_code == 200 and fields <= set(r.json()) and r.json()["context"] == soak.context
    soak.note("health", "200" if ok else f"{r.status_code} wrong fields", r.text)
    return 0.0


def run_bad(name):
    status, code, make = BAD_REQUESTS[name]

    def run(soak, http, rng):
        body = make(soak, rng)
        data = body if isinstance(body, bytes) else json.dumps({"model": MODEL, **body}).encode()
        headers = dict(soak.auth, **{"Content-Type": "application/json"})
        if name == "body_too_large" and rng.random() < 0.5:  # chunked: no Content-Length to refuse it by
            data = iter([data[i:i + 65536] for i in range(0, len(data), 65536)])
        try:
            with soak.client() as one:  # a connection of its own: the server may close it on a refusal
                r = one.post("/v1/chat/completions", content=data, headers=headers)
        except httpx.HTTPError as e:
            soak.note(name, f"error {type(e).__name__}", repr(e))
            return 0.0
        soak.note(name, *error_label(r, code if r.status_code == status else None))
        return 0.0
    return run


def run_missing_key(soak, http, rng):
    if rng.random() < 0.5:
        r = http.get("/v1/models")
    else:
        r = http.post("/v1/chat/completions", json=soak.pool[0].body())
    soak.note("missing_key", *error_label(r))
    return 0.0


def run_wrong_key(soak, http, rng):
    header = rng.choice([f"Bearer {soak.key}x", f"Bearer {secrets.token_urlsafe(16)}", f"Basic {soak.key}",
                         "Bearer", soak.key])
    r = http.post("/v1/chat/completions", json=soak.pool[0].body(), headers={"Authorization": header})
    soak.note("wrong_key", *error_label(r))
    return 0.0


def run_disconnect_stream(soak, http, rng):
    """The probe prompt, streamed; the client goes after 1-4 pieces (closing its connection)."""
    try:
        with soak.client() as one, one.stream("POST", "/v1/chat/completions", json=soak.probe.body(True),
                                              headers=soak.auth) as r:
            if r.status_code != 200:
                r.read()
                soak.note("disconnect_stream", *error_label(r))
                return retry_after(r)
            text, finish, done = read_events(r.iter_lines(), stop_after=rng.randint(1, 4))
            if done:  # the answer ended before the client left
                answered(soak, "disconnect_stream", soak.probe, text, finish)
            else:
                soak.note("disconnect_stream", "disconnected")
    except httpx.HTTPError as e:
        soak.note("disconnect_stream", f"error {type(e).__name__}", repr(e))
    return 0.0


def run_disconnect_nonstream(soak, http, rng):
    """The probe prompt, not streamed; the client gives up without an answer after 10-50% of the time the answer
    took alone (closing its connection)."""
    patience = max(0.02, rng.uniform(0.1, 0.5) * soak.probe.seconds)
    try:
        with soak.client(httpx.Timeout(soak.args.request_timeout, read=patience)) as one:
            r = one.post("/v1/chat/completions", json=soak.probe.body(), headers=soak.auth)
    except httpx.ReadTimeout:
        soak.note("disconnect_nonstream", "disconnected")
        return 0.0
    except httpx.HTTPError as e:
        soak.note("disconnect_nonstream", f"error {type(e).__name__}", repr(e))
        return 0.0
    if r.status_code == 200:  # the answer came first
        choice = r.json()["choices"][0]
        answered(soak, "disconnect_nonstream", soak.probe, choice["message"]["content"], choice["finish_reason"])
        return 0.0
    soak.note("disconnect_nonstream", *error_label(r))
    return retry_after(r)


def run_burst(soak, http, rng):
    """burst_size long requests released together, each on its own connection; some must be refused (429)."""
    barrier = threading.Barrier(soak.burst_size)

    def one():
        with soak.client() as c:
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
            chat(soak, c, "burst", soak.long, stream=False)
    threads = [threading.Thread(target=one, daemon=True) for _ in range(soak.burst_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(soak.args.request_timeout + 40)
    return 0.0


def kinds():
    """Every kind of request, with its weight in the deck and the outcomes allowed and required."""
    ok, or_busy = ("200",), ("200", "429")
    out = [Kind(f"chat_{what}{'_stream' if stream else ''}", 3, or_busy, ok, run_pool_chat(what == "image", stream))
           for what in ("image", "text") for stream in (False, True)]
    out += [Kind("openai_chat", 3, or_busy, ok, run_openai_chat), Kind("models", 1, ok, ok, run_models),
            Kind("health", 1, ok, ok, run_health)]
    out += [Kind(name, 1, (str(status),), (str(status),), run_bad(name))
            for name, (status, _, _) in BAD_REQUESTS.items()]
    out += [Kind("missing_key", 2, ("401",), ("401",), run_missing_key),
            Kind("wrong_key", 2, ("401",), ("401",), run_wrong_key),
            Kind("disconnect_stream", 2, ("disconnected", "200", "429"), ("disconnected",), run_disconnect_stream),
            Kind("disconnect_nonstream", 2, ("disconnected", "200", "429"), ("disconnected",),
                 run_disconnect_nonstream),
            Kind("burst", 2, ("200", "429"), ("200", "429"), run_burst)]
    return out


def deck(soak):
    """The kinds, each `weight` times, in an order fixed by the seed."""
    cards = [k for k in soak.kinds.values() for _ in range(k.weight)]
    random.Random(soak.args.seed).shuffle(cards)
    return cards


def client_loop(soak, i, cards, deadline):
    """Client i: the deck's kinds in turn from its own place in it, until the deadline."""
    rng = random.Random(soak.args.seed * 1000 + i)
    k = i * len(cards) // soak.args.clients
    with soak.client() as http:
        while time.monotonic() < deadline:
            kind = cards[k % len(cards)]
            k += 1
            try:
                wait = kind.run(soak, http, rng)
            except Exception as e:  # an answer this script cannot read (not JSON, missing fields): an outcome
                soak.note(kind.name, f"unreadable {type(e).__name__}", repr(e))
                wait = 0.0
            time.sleep(max(0.0, min(wait, deadline - time.monotonic())))


# -- the server, watched ------------------------------------------------------------------------------------------

def health(url):
    return httpx.get(url + "/health", timeout=10, trust_env=False).json()


class Sampler(threading.Thread):
    """The server process's RSS, fds and threads and /health's busy and waiting, every `interval` s, with the
    seconds since t0."""

    def __init__(self, soak, pid, interval, t0, cpu):
        super().__init__(daemon=True)
        self.soak, self.pid, self.interval, self.t0, self.cpu = soak, pid, interval, t0, cpu
        self.samples, self.stopped = [], threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                s = process_stats(self.pid)
            except OSError:
                break  # the server is gone: the run notes it
            try:
                h = health(self.soak.url)
            except (httpx.HTTPError, ValueError):  # no answer within its timeout: the load shows it
                h = {"busy": None, "waiting": None}
            self.samples.append(dict(s, t=round(time.monotonic() - self.t0, 2), busy=h["busy"], waiting=h["waiting"]))
            self.cpu.sample()
            self.stopped.wait(self.interval)

    def stop(self):
        self.stopped.set()
        self.join(30)

    def at(self, t):
        """The first sample at or after t seconds (the last one if none)."""
        return next((s for s in self.samples if s["t"] >= t), self.samples[-1] if self.samples else None)


def stats(pid):
    return {k: round(v, 1) for k, v in process_stats(pid).items()}


def thread_names(pid) -> dict:
    """How many of the process's threads have each name (Linux: /proc/PID/task/*/comm), to tell which ones a
    difference in the count is."""
    names = collections.Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names[open(f"/proc/{pid}/task/{task}/comm").read().strip()] += 1
        except OSError:  # the thread ended meanwhile
            pass
    return dict(sorted(names.items()))


def settled_stats(pid, idle, timeout=SETTLE_S):
    """The server's stats once its fds and threads are back to `idle`'s counts, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(pid)
        if (s["fds"] <= idle["fds"] and s["threads"] <= idle["threads"]) or time.monotonic() > deadline:
            return s
        time.sleep(0.25)


def wait_idle(soak, limit=120.0):
    """(seconds until /health says busy 0 and waiting 0, or None after `limit`; the last /health)."""
    t = time.monotonic()
    while True:
        h = health(soak.url)
        if h["busy"] == 0 and h["waiting"] == 0:
            return round(time.monotonic() - t, 2), h
        if time.monotonic() - t > limit:
            return None, h
        time.sleep(0.1)


def send_alone(soak, prompt):
    """(answer, seconds) of one non-streaming request on an idle server."""
    t = time.perf_counter()
    with soak.client() as http:
        r = http.post("/v1/chat/completions", json=prompt.body(), headers=soak.auth)
    if r.status_code != 200:
        raise RuntimeError(f"{prompt.name} alone got {r.status_code}: {r.text[:300]}")
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - t


def disconnect_probe(soak, stream):
    """The probe prompt alone, dropped early: streamed, after its first piece; not streamed, after a read timeout
    of a quarter of its answer's time. {"freed_s": seconds from leaving until /health shows the slot free,
    "answer_s": the whole answer's time alone, "verdict"}: a slot still busy after half the answer's time was
    not freed; an answer under 1 s is too short to tell."""
    answer_s = soak.probe.seconds
    patience = soak.args.request_timeout if stream else max(0.2, answer_s / 4)
    try:
        with soak.client(httpx.Timeout(soak.args.request_timeout, read=patience)) as one:
            if stream:
                with one.stream("POST", "/v1/chat/completions", json=soak.probe.body(True), headers=soak.auth) as r:
                    read_events(r.iter_lines(), stop_after=1)
            else:
                one.post("/v1/chat/completions", json=soak.probe.body(), headers=soak.auth)
                return {"verdict": "answered before the client left", "answer_s": round(answer_s, 2)}
    except httpx.ReadTimeout:
        pass
    freed_s, _ = wait_idle(soak, limit=answer_s + 30)  # from the moment the client left
    if answer_s < 1.0:
        verdict = "too short to tell"
    else:
        verdict = "freed" if freed_s is not None and freed_s < answer_s / 2 else "NOT freed"
    return {"freed_s": freed_s, "answer_s": round(answer_s, 2), "verdict": verdict}


def log_errors(path):
    """Tracebacks and ERROR lines in the server's log: (count, the first one's lines)."""
    text = open(path, errors="replace").read() if path and os.path.isfile(path) else ""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith("Traceback") or line.startswith("ERROR")]
    return len(hits), lines[hits[0]:hits[0] + 25] if hits else []


# -- the run --------------------------------------------------------------------------------------------------

def model_files(args):
    """(ckpt, vision tower or None, a temporary directory to remove or None)."""
    if args.ckpt:
        return args.ckpt, args.vision_model, None
    work, ckpt, tower, _, _ = random_model_files(args.size, args.workdir, "soak-")
    return ckpt, args.vision_model or tower, None if args.workdir else work


def server_flags(args, ckpt, tower, key):
    flags = ["--ckpt", ckpt, "--dtype", args.dtype, "--max_batch", args.max_batch, "--max_waiting", args.max_waiting,
             "--api_key", key, "--max_request_bytes", MAX_REQUEST_BYTES, "--max_image_bytes", MAX_IMAGE_BYTES,
             "--max_image_pixels", MAX_IMAGE_PIXELS, "--drain_seconds", 5, "--status_interval", 10]
    context = args.context or (None if args.ckpt else RANDOM_CONTEXT)
    for flag, value in (("--vision_model", tower), ("--device", args.device), ("--max_seq_len", context)):
        if value is not None:
            flags += [flag, value]
    return [str(f) for f in flags]


def measure(args):
    key = args.api_key or secrets.token_urlsafe(24)
    ckpt, tower, temporary = model_files(args)
    flags = server_flags(args, ckpt, tower, key)
    shown = " ".join(f if f != key else "KEY" for f in flags)
    print(f"soak: serve_openai_api.py {shown}", file=sys.stderr, flush=True)
    cpu, t = CpuAccount(), time.monotonic()  # where the machine's CPU time goes: the server, the clients, others
    proc, url = start_server(ROOT, "serve_openai_api.py", flags, "/health")
    log = os.readlink(f"/proc/{proc.pid}/fd/1")  # where start_server sends the server's output
    try:
        res = soak_server(args, proc, url, key, log, shown, cpu)
        res["cpu"] = cpu.result(time.monotonic() - t)  # the server has exited: its CPU time is counted
        return res
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def soak_server(args, proc, url, key, log, flags, cpu):
    """The run against a started server: references, the load, what follows it, and the result with its checks."""
    res = {"size": None if args.ckpt else args.size, "ckpt": args.ckpt, "minutes": args.minutes,
           "clients": args.clients, "seed": args.seed, "server_flags": flags, "server_log": log}
    loaded = stats(proc.pid)
    h = health(url)
    soak = Soak(url, key, h["context"], args)
    res.update(context=soak.context, slots=h["slots"], max_waiting=h["max_waiting"], burst_size=soak.burst_size)

    alone = soak.pool + [soak.long, soak.probe]
    print(f"soak: {len(alone)} reference answers, each alone", file=sys.stderr, flush=True)
    for prompt in alone:
        prompt.answer, prompt.seconds = send_alone(soak, prompt)
    res["reference_seconds"] = {p.name: round(p.seconds, 2) for p in alone}
    time.sleep(1.0)  # the references' connections close
    start = dict(stats(proc.pid), thread_names=thread_names(proc.pid))

    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(60.0, 0.5 * duration)
    sampler = run_load(soak, proc, duration, res, cpu)
    after_warmup = sampler.at(warmup)
    end = after_load(soak, proc, start, res)
    hwm = peak_rss_mib(proc.pid) if proc.poll() is None else None

    proc.terminate()  # SIGTERM: the server drains (nothing is in flight) and exits 0
    try:
        res["server_exit_code"] = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        res["server_exit_code"] = proc.wait()
    res["server_log_errors"], res["server_log_first_error"] = log_errors(log)

    res.update(outcomes(soak))
    res["server"] = {"loaded": loaded, "start": start, "after_warmup": after_warmup, "end": end,
                     "peak_rss_mib": max((s["rss_mib"] for s in sampler.samples), default=None),
                     "hwm_mib": hwm, "warmup_s": warmup, "samples": thin(sampler.samples, 120)}
    res["growth"] = growth(start, after_warmup, end)
    res["checks"] = checks(res, args)
    res["failed"] = [name for name, ok in res["checks"].items() if not ok]
    res["passed"] = not res["failed"]
    return res


def run_load(soak, proc, duration, res, cpu) -> Sampler:
    """--clients threads over the deck for `duration` s, the server sampled meanwhile (the sampler, stopped, is
    returned once the server is idle again)."""
    cards = deck(soak)
    print(f"soak: {soak.args.clients} clients for {duration:.0f} s over a deck of {len(cards)} "
          f"({len(soak.kinds)} kinds)", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    sampler = Sampler(soak, proc.pid, soak.args.sample_interval, t0, cpu)
    sampler.start()
    clients = [threading.Thread(target=client_loop, args=(soak, i, cards, t0 + duration), daemon=True)
               for i in range(soak.args.clients)]
    for c in clients:
        c.start()
    join_by = time.monotonic() + duration + soak.args.request_timeout + 60
    for c in clients:
        c.join(max(0.0, join_by - time.monotonic()))
    res["load_s"] = round(time.monotonic() - t0, 1)
    res["clients_still_running"] = sum(c.is_alive() for c in clients)
    res["server_alive_after_load"] = proc.poll() is None
    res["idle_after_load"] = {}
    if res["server_alive_after_load"]:
        try:
            idle_s, idle = wait_idle(soak)
            res["idle_after_load"] = dict(idle, seconds_to_idle=idle_s)
        except (httpx.HTTPError, ValueError) as e:
            res["after_load_error"] = repr(e)
    sampler.stop()
    res["most_busy"] = max((s["busy"] for s in sampler.samples if s["busy"] is not None), default=0)
    res["most_waiting"] = max((s["waiting"] for s in sampler.samples if s["waiting"] is not None), default=0)
    # a request waits until the scheduler's next turn gives it a free slot: the bound is on both together
    res["most_in_flight"] = max((s["busy"] + s["waiting"] for s in sampler.samples if s["busy"] is not None),
                                default=0)
    res["health_unanswered"] = sum(s["busy"] is None for s in sampler.samples)
    return sampler


def after_load(soak, proc, start, res):
    """The disconnect probes, then (once the HTTP worker threads may go) one pool prompt alone again: the
    server's stats at the end, or None if it cannot be reached. The stats along the way go to res["end_phase"]."""
    res["probes"], phase = {}, res.setdefault("end_phase", {})
    if proc.poll() is not None or "after_load_error" in res:
        return None
    try:
        phase["idle_after_load"] = stats(proc.pid)
        res["probes"] = {"stream": disconnect_probe(soak, True), "nonstream": disconnect_probe(soak, False)}
        phase["after_probes"] = stats(proc.pid)
        time.sleep(IDLE_WORKER_S)  # the worker threads the load started exit when the next request comes
        phase["before_last_request"] = stats(proc.pid)
        answer, _ = send_alone(soak, soak.pool[0])
        soak.compare("after_soak", soak.pool[0], answer)
        end = settled_stats(proc.pid, start)
        return dict(end, thread_names=thread_names(proc.pid))
    except (httpx.HTTPError, RuntimeError, ValueError, OSError) as e:
        res["after_load_error"] = repr(e)
        return None


def outcomes(soak) -> dict:
    """Requests by kind and outcome, what was allowed and required, 5xx, the unexpected and missing outcomes,
    and the answers' comparison."""
    counts = soak.counts
    unexpected = {k: {label: n for label, n in c.items() if label not in soak.kinds[k].allowed}
                  for k, c in counts.items()}
    missing = {k.name: [label for label in k.required if not counts[k.name][label]] for k in soak.kinds.values()}
    return {"requests": {k: dict(sorted(c.items())) for k, c in counts.items()},
            "allowed": {k.name: list(k.allowed) for k in soak.kinds.values()},
            "required": {k.name: list(k.required) for k in soak.kinds.values()},
            "total_requests": sum(sum(c.values()) for c in counts.values()),
            "count_5xx": sum(n for c in counts.values() for label, n in c.items() if label[:1] == "5"),
            "unexpected": {k: v for k, v in unexpected.items() if v},
            "missing": {k: v for k, v in missing.items() if v},
            "problems": soak.problems, "answers": soak.answers}


def thin(samples, most):
    """At most `most` of the samples, evenly spread, the last kept."""
    step = max(1, math.ceil(len(samples) / most))
    return samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])


def growth(start, after_warmup, end):
    if not after_warmup or not end:
        return {}
    return {"rss_pct_after_warmup": round(100 * (end["rss_mib"] - after_warmup["rss_mib"]) / after_warmup["rss_mib"],
                                          2),
            "fds_over_idle": end["fds"] - start["fds"], "threads_over_idle": end["threads"] - start["threads"]}


def checks(res, args):
    """{check: passed} of a run's result (the growth ones only count without --no_growth_check)."""
    probes = res.get("probes", {}).values()
    out = {
        "no_5xx": res["count_5xx"] == 0,
        "expected_statuses": not res["unexpected"],
        "every_kind_seen": not res["missing"],
        "answers_equal": res["answers"]["checked"] > 0 and not res["answers"]["mismatches"]
        and res["answers"]["matched"] == res["answers"]["checked"],
        "idle_after_load": res["idle_after_load"].get("seconds_to_idle") is not None
        and res["idle_after_load"]["seconds_to_idle"] <= IDLE_GRACE_S,
        "disconnect_frees_slot": all(p["verdict"] != "NOT freed" for p in probes),
        "queue_bounded": res["most_busy"] <= res["slots"]
        and res["most_in_flight"] <= res["slots"] + res["max_waiting"],
        "clients_stopped": res["clients_still_running"] == 0,
        "server_ok": res["server_alive_after_load"] and "after_load_error" not in res
        and res["server_exit_code"] == 0 and res["server_log_errors"] == 0,
    }
    if not args.no_growth_check:
        g = res["growth"]
        out["rss_growth"] = bool(g) and g["rss_pct_after_warmup"] <= args.max_rss_growth
        out["fds_back_to_idle"] = bool(g) and g["fds_over_idle"] <= 0
        out["threads_back_to_idle"] = bool(g) and g["threads_over_idle"] <= 0
    return out


def table(res) -> str:
    out = [f"soak of {res['ckpt'] or 'a random ' + res['size'] + ' model'}: {res['load_s']:.0f} s of load, "
           f"{res['clients']} clients, {res['slots']} slots, max_waiting {res['max_waiting']}, context "
           f"{res['context']}, bursts of {res['burst_size']}",
           f"{'kind':<22} {'requests':>8}  outcomes"]
    for kind, counts in res["requests"].items():
        shown = ", ".join(f"{label}: {n}" for label, n in counts.items())
        if kind in res["unexpected"]:
            shown += "  UNEXPECTED (allowed: " + ", ".join(res["allowed"][kind]) + ")"
        if kind in res["missing"]:
            shown += "  MISSING " + ", ".join(res["missing"][kind])
        out.append(f"{kind:<22} {sum(counts.values()):>8}  {shown}")
    a = res["answers"]
    out += [f"{res['total_requests']} requests, {res['count_5xx']} 5xx; answers equal to the same request alone: "
            f"{a['matched']}/{a['checked']}"]
    out += [f"  MISMATCH {m['kind']} {m['prompt']}: alone {m['alone']!r} / under load {m['under_load']!r}"
            for m in a["mismatches"][:5]]
    out += [f"  {p['kind']}: {p['outcome']}: {p['detail'][:150]}" for p in res["problems"][:10]]
    s = res["server"]
    out.append(f"{'server':<30} {'RSS MiB':>8} {'fds':>5} {'threads':>8}")
    for name, title in (("loaded", "loaded, idle"), ("start", "start (idle, after references)"),
                        ("after_warmup", f"after warm-up ({s['warmup_s']:.0f} s)"), ("end", "end (idle again)")):
        v = s[name] or {"rss_mib": float("nan"), "fds": -1, "threads": -1}
        out.append(f"{title:<30} {v['rss_mib']:8.1f} {v['fds']:5d} {v['threads']:8d}")
    g = res["growth"]
    if g:
        out.append(f"growth after warm-up: RSS {g['rss_pct_after_warmup']:+.2f}% (peak {s['peak_rss_mib']:.1f} MiB), "
                   f"fds {g['fds_over_idle']:+d} and threads {g['threads_over_idle']:+d} over idle")
    if res.get("end_phase"):
        out.append("after the load: " + ", ".join(f"{name.replace('_', ' ')} {v['rss_mib']:.1f} MiB, {v['fds']} fds, "
                                                  f"{v['threads']} threads" for name, v in res["end_phase"].items()))
    idle = res["idle_after_load"]
    out.append(f"after the load: busy {idle.get('busy')}, waiting {idle.get('waiting')} "
               f"(idle after {idle.get('seconds_to_idle')} s); most seen busy {res['most_busy']}, waiting "
               f"{res['most_waiting']}, in flight {res['most_in_flight']}; /health unanswered in "
               f"{res['health_unanswered']} samples")
    for name, p in res["probes"].items():
        out.append(f"disconnect probe ({name}): {p['verdict']}" + (
            f", slot free {p['freed_s']} s after the client left (the answer takes {p['answer_s']} s)"
            if p.get("freed_s") is not None else ""))
    if "after_load_error" in res:
        out.append(f"after the load, the server could not be reached: {res['after_load_error']}")
    hwm = s["hwm_mib"] or float("nan")
    out.append(f"server: peak RSS (VmHWM) {hwm:.1f} MiB; exit code {res['server_exit_code']} on SIGTERM, "
               f"{res['server_log_errors']} errors in {res['server_log']}")
    out += res["server_log_first_error"][:10]
    c = res["cpu"]
    out.append(f"CPU seconds: server {c['run_cpu_s']}, this script (the clients) {c['sampling_cpu_s']}, other "
               f"processes {c['other_processes_cpu_s']} ({100 * c['other_processes_share']:.0f}% of the machine; "
               f"1-minute load up to {c['loadavg_1min_max']})")
    out.append("PASSED" if res["passed"] else "FAILED: " + ", ".join(res["failed"]))
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    os.environ["no_proxy"] = "*"  # start_server's readiness probe (urllib) goes straight to 127.0.0.1 too
    res = measure(args)
    print("\n" + table(res), file=sys.stderr, flush=True)
    record(res, args.out)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
