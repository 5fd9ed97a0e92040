"""Locked doors and long runs (both servers, in subprocesses; tests/served_model.py's colour model).

API keys: every /v1/ route answers 401 (an OpenAI-style body; the openai client raises AuthenticationError) to no
key or a wrong one, the right key works (several may be given: flag, file, MINIMIND_API_KEY), /health needs none,
and a refused attempt is logged without the key. A non-loopback --host (or the web demo's --share) without a key
or login refuses to start, saying what to pass; --no_auth serves it with a warning. The context is the length
a checkpoint was trained with: /v1/models reports it and a longer conversation is refused naming it; stage 2
inherits stage 1's length (tests/test_train_e2e.py); a file that does not record one gets upstream v1's 200, with a notice, and
--max_seq_len overrides with a warning. A non-streaming client that disconnects frees its slot for a waiting
request (tests/test_batching.py). SIGTERM during answers: they finish, new ones are refused, and the process exits 0 with no traceback.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from model.checkpoint import UPSTREAM_TRAINED_LEN, save_checkpoint, trained_context
from model.cli import is_loopback, require_auth
from model.engine import ChatEngine, PromptTooLong, serving_context
from model.model import MiniMindVLM
from tests.conftest import ROOT
from tests.served_model import COLOURS, QUESTION, Server, colour_image, data_url, png_bytes

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False")
KEYS = ["sk-first-key-0123456789", "sk-second-key-abcdefgh"]


def ask(colour="red"):
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(colour_image(COLOURS[colour], 3)))}}
    return [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def keyed_api(served_model, random_tower, tmp_path_factory):
    ckpt, _ = served_model
    d = tmp_path_factory.mktemp("keyed")
    (d / "keys.txt").write_text(f"# clients\n{KEYS[1]}\n\n")
    server = Server(["serve_openai_api.py", "--ckpt", ckpt, "--vision_model", random_tower, "--device", "cpu",
                     "--api_key", KEYS[0], "--api_key_file", d / "keys.txt", "--max_batch", "1", "--max_waiting", "2"],
                    ROOT, dict(ENV, MINIMIND_API_KEY="sk-from-the-environment"), d / "server.log",
                    ready_path="/health")
    yield server
    server.stop()


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/anything-else")])
@pytest.mark.parametrize("header", [None, "Bearer sk-wrong", "Bearer", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x"])
def test_every_v1_route_needs_a_right_key(keyed_api, method, path, header):
    headers = {"authorization": header} if header else {}
    r = httpx.request(method, keyed_api.url + path, headers=headers, json={"messages": ask()}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"


def test_right_keys_work_and_health_is_open(keyed_api):
    for key in KEYS + ["sk-from-the-environment"]:
        client = openai.OpenAI(base_url=keyed_api.url + "/v1", api_key=key, max_retries=0, timeout=120)
        assert client.chat.completions.create(model="m", messages=ask("green"), temperature=0) \
            .choices[0].message.content == "green"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_api.url + "/v1", api_key="sk-nope", max_retries=0).models.list()
    health = httpx.get(keyed_api.url + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["slots"] == 1 and health.json()["busy"] == 0


def test_refused_attempts_are_logged_without_the_key(keyed_api):
    httpx.get(keyed_api.url + "/v1/models", headers={"authorization": "Bearer sk-a-guess-12345"}, timeout=10)
    log = keyed_api.output()
    assert "refused: 127.0.0.1 GET /v1/models sent a wrong key" in log
    assert "sk-a-guess-12345" not in log and KEYS[0] not in log and KEYS[1] not in log


def test_models_report_the_trained_context_and_a_longer_conversation_is_refused(keyed_api):
    client = openai.OpenAI(base_url=keyed_api.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=60)
    assert client.models.list().data[0].max_model_len == 128  # served_model trains at --max_seq_len 128
    with pytest.raises(openai.BadRequestError, match="context is 128 tokens"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "colour " * 130}])


@pytest.mark.parametrize("script,flags,advice", [
    ("serve_openai_api.py", ["--host", "0.0.0.0"], "--api_key"),
    ("serve_openai_api.py", ["--host", "192.168.1.20"], "--api_key"),
    ("web_server.py", ["--host", "0.0.0.0"], "--auth USER:PASSWORD"),
    ("web_server.py", ["--share"], "--auth USER:PASSWORD"),
])
def test_an_exposed_server_without_a_key_refuses_to_start(script, flags, advice):
    p = subprocess.run([sys.executable, script, "--ckpt", "out/missing", *flags], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert advice in p.stderr and "--no_auth" in p.stderr
    assert "Traceback" not in p.stderr


def test_no_auth_serves_an_exposed_address_with_a_warning(capsys):
    class Args:
        host, no_auth = "0.0.0.0", True
    require_auth(Args, False, "--api_key KEY")
    assert "anyone who can reach it" in capsys.readouterr().err
    Args.no_auth = False
    with pytest.raises(SystemExit, match="--no_auth"):
        require_auth(Args, False, "--api_key KEY")
    require_auth(Args, True, "--api_key KEY")  # a key: fine
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("myhost")


# -- the trained context ------------------------------------------------------------------------------------------


def checkpoint_trained_at(tmp_path, tiny_cfg, n, name="m.safetensors"):
    cfg = tiny_cfg()
    path = tmp_path / name
    save_checkpoint(MiniMindVLM(cfg), path, cfg, extra={"args": {"max_seq_len": n}} if n else None)
    return path


def test_the_engine_serves_the_trained_context(tmp_path, tiny_cfg, random_tower, capsys):
    path = checkpoint_trained_at(tmp_path, tiny_cfg, 96)
    assert trained_context(path)[0] == 96
    engine = ChatEngine.load(path, random_tower, device="cpu", dtype="float32")
    assert engine.context == 96 and "context 96" in engine.describe()
    ok = [{"role": "user", "content": "x " * 40}]
    assert len(engine.prepare(ok, 0)) < 96
    with pytest.raises(PromptTooLong, match="context is 96 tokens"):
        engine.prepare([{"role": "user", "content": "x " * 100}], 0)
    g = engine.generate(ok, max_new_tokens=10 ** 6)
    assert g.prompt_tokens + g.max_new_tokens == 96  # prompt and answer together
    assert capsys.readouterr().err == ""  # nothing to say: the checkpoint records its length


def test_a_file_without_a_length_gets_upstreams_with_a_notice_and_an_override_warns(tmp_path, tiny_cfg, capsys):
    path = checkpoint_trained_at(tmp_path, tiny_cfg, None)
    assert serving_context(path) == UPSTREAM_TRAINED_LEN
    assert "serving with context 200" in capsys.readouterr().err
    pth = tmp_path / "upstream.pth"
    torch.save(MiniMindVLM(tiny_cfg()).state_dict(), pth)
    assert trained_context(pth)[0] is None and serving_context(pth) == 200
    assert "upstream's files do not record" in capsys.readouterr().err
    trained = checkpoint_trained_at(tmp_path, tiny_cfg, 96, "t.safetensors")
    assert serving_context(trained, 300) == 300
    assert "positions past that were never trained" in capsys.readouterr().err


# -- shutdown -------------------------------------------------------------------------------------------------------


def test_sigterm_lets_answers_in_flight_finish_and_exits_0(served_model, random_tower, tmp_path):
    ckpt, _ = served_model
    server = Server(["serve_openai_api.py", "--ckpt", ckpt, "--vision_model", random_tower, "--device", "cpu",
                     "--drain_seconds", "60"], ROOT, ENV, tmp_path / "server.log", ready_path="/health")
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "temperature": 1.5, "max_tokens": 100,
            "seed": 2, "stream": True}
    finished = {}

    def stream(k):
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            finished[k] = [line for line in r.iter_lines() if line.startswith("data: ")]
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while httpx.get(server.url + "/health", timeout=5).json()["busy"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert server.proc.wait(timeout=120) == 0
    log = server.output()
    assert "Traceback" not in log and "shutting down" in log
    for k in range(2):  # each stream ran to its end: a finish reason, then [DONE]
        assert finished[k][-1] == "data: [DONE]"
        assert json.loads(finished[k][-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    server.log.close()
