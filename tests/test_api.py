"""serve_openai_api.py in a subprocess, driven by the official `openai` client and raw HTTP.

`/v1/models`; answers naming the colour of the sent image; streaming equal to non-streaming, with usage;
multi-turn; `max_tokens`; `seed`; 8 concurrent requests all answered correctly; remote URLs and paths
refused; oversized bodies and images answered 413; 10 kinds of malformed request answered 400 with a
message. Like the other server tests it uses the model tests/served_model.py trains once per session (about
20 s; 64x2, taught to name the colour of red, green and blue pictures), so an answer shows which image a
conversation holds.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import ROOT
from tests.served_model import COLOURS, FOLLOW_UP, QUESTION, Server, colour_image, data_url, png_bytes

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
MAX_IMAGE_BYTES = 300_000


@pytest.fixture(scope="module")
def api(served_model, random_tower, tmp_path_factory):
    ckpt, _ = served_model
    log = tmp_path_factory.mktemp("api") / "server.log"
    server = Server(["serve_openai_api.py", "--ckpt", ckpt, "--vision_model", random_tower, "--device", "cpu",
                     "--max_image_bytes", MAX_IMAGE_BYTES, "--max_request_bytes", 2_000_000], ROOT, ENV, log,
                    ready_path="/v1/models")
    yield server
    server.stop()


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(colour, seed=7, question=QUESTION):
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(colour_image(COLOURS[colour], seed)))}}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def test_models_lists_the_checkpoint(client):
    assert [m.id for m in client.models.list().data] == ["64_vlm_sft"]


def test_non_streaming_answer_is_about_the_image(client):
    for colour in COLOURS:
        r = client.chat.completions.create(model="64_vlm_sft", messages=ask(colour), temperature=0)
        assert r.choices[0].message.content == colour
        assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
        # 50 image tokens + the chat template around the question
        assert r.usage.prompt_tokens > 50 and r.usage.completion_tokens >= 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming(client):
    stream = client.chat.completions.create(model="m", messages=ask("green"), temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "green"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_multi_turn_with_the_image_in_the_first_message(client):
    messages = ask("red") + [{"role": "assistant", "content": "red"}, {"role": "user", "content": FOLLOW_UP}]
    r = client.chat.completions.create(model="m", messages=messages, temperature=0)
    assert r.choices[0].message.content == "red"


def test_max_tokens_stops_with_length(client):
    r = client.chat.completions.create(model="m", messages=ask("blue", question="Tell me a long story."),
                                       temperature=1.0, seed=3, max_tokens=1)
    assert r.usage.completion_tokens <= 1
    assert r.choices[0].finish_reason in ("length", "stop")


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model="m", messages=ask("blue", question="Describe it."), temperature=1.5, max_tokens=12)
    a = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    assert a == b


def test_eight_concurrent_requests_are_all_answered(client):
    colours = list(COLOURS) * 3
    colours = colours[:8]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: client.chat.completions.create(
            model="m", messages=ask(c, seed=50 + len(c)), temperature=0, stream=c == "green"), colours))
    texts = []
    for a in answers:
        texts.append(a.choices[0].message.content if hasattr(a, "choices")
                     else "".join(ch.choices[0].delta.content or "" for ch in a if ch.choices))
    assert texts == colours


def post(api, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(api.url + "/v1/chat/completions", content=data, timeout=120,
                      headers={"content-type": "application/json"}, **kw)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://127.0.0.1/x.png", "file:///etc/passwd",
                                 "/etc/passwd"])
def test_remote_urls_and_paths_are_refused(api, url):
    r = post(api, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]})
    assert r.status_code == 400
    assert "only data URLs" in r.json()["error"]["message"]


def test_oversized_body_is_refused_before_parsing(api):
    r = post(api, b"{" + b" " * 2_500_000 + b"}")
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_oversized_image_is_refused(api):
    big = colour_image(COLOURS["red"], 1, size=400)  # noisy 400x400 PNG: ~470 KB > 300 KB
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
        png_bytes(big))}}, {"type": "text", "text": "hi"}]}]}
    r = post(api, body)
    assert r.status_code == 413 and "MiB" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,status,words", [
    (b"not json", 400, "not valid JSON"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "<image>\nhi"}]}, 400, "reserved"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "aGVsbG8gd29ybGQ="}}]}]}, 400, "not an image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@"}}]}]}, 400, "does not decode"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens must be between"),
    ({"messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "tokens"),
])
def test_bad_requests_get_a_clear_4xx(api, body, status, words):
    r = post(api, body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
