"""An OpenAI-compatible HTTP API for MiniMind-V: point any OpenAI chat client at http://127.0.0.1:8998/v1.

  python serve_openai_api.py --ckpt out/512_vlm_sft

  POST /v1/chat/completions   messages (text and image_url parts), temperature, top_p, top_k, max_tokens,
                              seed, stream (server-sent events in the chunk format, stream_options.include_usage)
  GET  /v1/models             the one model served, with its context (max_model_len)
  GET  /health                no key needed: {"status": "ok" | "draining", slots busy, requests waiting}

Keys: with --api_key KEY (repeatable), --api_key_file FILE (one a line) or the environment variable
MINIMIND_API_KEY (comma-separated; keeps keys out of shell history and process lists), every /v1/ route needs
`Authorization: Bearer KEY` (what the openai client sends); a missing or wrong key gets 401 (the client raises
AuthenticationError), and the attempt is logged without the key. A non-loopback --host needs a key (or --no_auth).

Images come inside the request as data URLs ("data:image/png;base64,..."): the server never fetches a remote
URL or opens a local path. Request bodies and images are bounded (--max_request_bytes, --max_image_bytes,
--max_image_pixels); anything refused gets a 4xx answer with an OpenAI-style {"error": {...}} body.

Concurrent requests are decoded together (continuous batching, up to --max_batch answers at once). A request
beyond them waits, in arrival order, for a free slot: its client sees a later first token, not an error.
When --max_waiting requests already wait, a new one gets 429 (code "server_busy", with a Retry-After header),
which the openai client retries by itself. A client that disconnects mid-answer, streaming or not, frees its
slot at once. The prompt and the answer together fit the model's context: the length it was trained with.

SIGTERM or Ctrl-C: the server stops accepting connections, the answers in flight go on for up to
--drain_seconds (new requests meanwhile get 503), the rest are cancelled, and it exits 0.
"""
import argparse
import asyncio
import base64
import binascii
import hmac
import json
import os
import sys
import threading
import time
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.background import BackgroundTask  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from model.LMConfig import IMAGE_MARKER  # noqa: E402
from model.cli import (HelpFormatter, add_serving_args, load_engine, read_secrets, require_auth,  # noqa: E402
                       serve_engine)
from model.engine import (MAX_IMAGE_BYTES, Busy, InputError, PromptTooLong, ShuttingDown, TooLarge,  # noqa: E402
                          open_image)
from model.images import MAX_IMAGE_PIXELS  # noqa: E402

MAX_REQUEST_BYTES = 16 * 2 ** 20
DEFAULTS = dict(temperature=0.65, top_p=0.85, max_tokens=256)  # the model's chat defaults, used when absent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_serving_args(p, default_port=8998)
    p.add_argument("--api_key", action="append", help="a key clients must send as 'Authorization: Bearer KEY' "
                   "(repeatable; also --api_key_file and MINIMIND_API_KEY)")
    p.add_argument("--api_key_file", help="a file of keys, one a line")
    p.add_argument("--max_request_bytes", type=int, default=MAX_REQUEST_BYTES, help="largest request body")
    return p.parse_args(argv)


def key_matches(header: str, keys) -> bool:
    """Whether an Authorization header carries one of the keys, compared in constant time (every key is compared,
    so the time says nothing about which or how much of one matched)."""
    scheme, _, given = (header or "").partition(" ")
    given = given.strip().encode() if scheme.lower() == "bearer" else b""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found and bool(given)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str = None, code: str = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status, message, param=None, code=None, headers=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def decode_data_url(url: str, where: str) -> bytes:
    """The bytes of a base64 data URL. Anything else (http(s) URLs, file paths) is refused, never fetched."""
    if not url.startswith("data:"):
        shown = url if len(url) <= 80 else url[:77] + "..."
        raise ApiError(400, f"{where}: only data URLs (data:image/...;base64,...) are accepted; this server never "
                            f"fetches remote URLs or opens files (got {shown!r})", where, "unsupported_image_url")
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{where}: a data URL must look like data:image/png;base64,<data>", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data URL's base64 payload does not decode", where) from None


def number(body, name, default, lo, hi, kind=float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}", name)
    return kind(value)


def parse_messages(body, limits):
    """OpenAI messages -> ([{"role", "content"}] with `<image>` where each image goes, [PIL images])."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, user or assistant, got {m.get('role')!r}", where)
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if content is None and role == "assistant":
            parts = []
        if not isinstance(parts, list):
            raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        pieces = []
        for j, part in enumerate(parts):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if IMAGE_MARKER in part["text"]:
                    raise ApiError(400, f"{pw}: '{IMAGE_MARKER}' is reserved; send the image as an image_url "
                                        "part where it belongs", pw)
                pieces.append(part["text"])
            elif kind == "image_url":
                if role != "user":
                    raise ApiError(400, f"{pw}: images are accepted in user messages only", pw)
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str):
                    raise ApiError(400, f"{pw}.image_url.url must be a string", pw)
                try:
                    images.append(open_image(decode_data_url(url, pw), f"{pw} image", *limits))
                except InputError as e:
                    raise ApiError(413 if isinstance(e, TooLarge) else 400, str(e), pw) from None
                pieces.append(IMAGE_MARKER)
            else:
                raise ApiError(400, f"{pw}: a part must be {{'type': 'text', 'text': ...}} or "
                                    "{'type': 'image_url', 'image_url': {'url': 'data:...'}}", pw)
        out.append({"role": role, "content": "\n".join(pieces)})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    return out, images


class RequireKey:
    """ASGI middleware: a request under /v1/ without one of the keys gets 401 and a log line (without the key).
    (A plain ASGI layer: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the route.)"""

    def __init__(self, app, keys):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not key_matches(header, self.keys):
                client = scope["client"][0] if scope.get("client") else "?"
                print(f"refused: {client} {scope['method']} {scope['path']} sent {'a wrong key' if header else 'no key'}",
                      file=sys.stderr, flush=True)
                response = error_response(401, "a valid API key is needed: send 'Authorization: Bearer <key>'", None,
                                          "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def answer_unless_gone(request: Request, generation, poll_s=0.1):
    """The whole answer of a non-streaming request, written in a worker thread; if the client disconnects
    meanwhile the generation is cancelled, which frees its slot at once (its text, cut short, goes nowhere)."""
    task = asyncio.ensure_future(run_in_threadpool(generation.text))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=poll_s)
            if not task.done() and await request.is_disconnected():
                generation.cancel()
        return task.result()
    finally:
        generation.cancel()  # a no-op after the end


def create_app(engine, max_request_bytes=MAX_REQUEST_BYTES, max_image_bytes=None, max_image_pixels=None,
               api_keys=()):
    """The FastAPI app; with api_keys, every /v1/ route needs one of them."""
    limits = (max_image_bytes or MAX_IMAGE_BYTES, max_image_pixels or MAX_IMAGE_PIXELS)
    app = FastAPI(title="MiniMind-V OpenAI-compatible API", docs_url=None, redoc_url=None)
    created = int(time.time())
    if api_keys:
        app.add_middleware(RequireKey, keys=list(api_keys))

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.get("/health")
    async def health():
        load = engine.scheduler().load()
        return JSONResponse({"status": "ok" if engine.accepting else "draining", "model": engine.name,
                             "context": engine.context, "slots": engine.max_batch, "busy": load["active"],
                             "waiting": load["waiting"], "max_waiting": engine.max_waiting},
                            status_code=200 if engine.accepting else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "minimind-v", "max_model_len": engine.context}]}

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_request_bytes:
            raise ApiError(413, f"the request body is {int(declared)} bytes; the limit is {max_request_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise ApiError(413, f"the request body is over the limit of {max_request_bytes} bytes")
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return parsed

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        if body.get("n") not in (None, 1):
            raise ApiError(400, f"n must be 1 (one answer per request), got {body['n']!r}", "n")
        if body.get("stop"):
            raise ApiError(400, "stop sequences are not supported by this server", "stop")
        messages, images = await run_in_threadpool(parse_messages, body, limits)
        max_tokens = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params = dict(
            temperature=number(body, "temperature", DEFAULTS["temperature"], 0, 2),
            top_p=number(body, "top_p", DEFAULTS["top_p"], 1e-6, 1),
            top_k=number(body, "top_k", 0, 0, 100000, int),  # not in OpenAI's API; vLLM and others take it
            max_new_tokens=number(body, max_tokens, DEFAULTS["max_tokens"], 1, engine.context, int),
            seed=number(body, "seed", None, -2 ** 63, 2 ** 63 - 1, int))
        if not engine.accepting:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        features = await run_in_threadpool(engine.encode, images) if images else None
        try:
            generation = engine.generate(messages, features, **params)
        except InputError as e:
            raise ApiError(400, str(e), "messages", "context_length_exceeded" if isinstance(e, PromptTooLong) else None)
        except Busy as e:
            raise ApiError(429, str(e), code="server_busy", headers={"Retry-After": "1"})
        except ShuttingDown as e:
            raise ApiError(503, str(e), code="shutting_down")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": generation.prompt_tokens,  # noqa: E731
                         "completion_tokens": generation.completion_tokens,
                         "total_tokens": generation.prompt_tokens + generation.completion_tokens}
        if not body.get("stream"):
            text = await answer_unless_gone(request, generation)
            return {"id": rid, "object": "chat.completion", "created": now, "model": engine.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": generation.finish_reason, "logprobs": None}],
                    "usage": usage()}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            def chunk(delta, finish=None, **extra):
                data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": engine.name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                        **extra}
                return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
            try:  # each piece is awaited in a worker thread; a client that disconnects cancels this await
                yield chunk({"role": "assistant", "content": ""})
                pieces = iter(generation)
                while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                    yield chunk({"content": piece})
            finally:  # frees the slot at once if the answer is not over, or not started (no-op if it is over)
                generation.cancel()
            yield chunk({}, generation.finish_reason)
            if include_usage:
                data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": engine.name,
                        "choices": [], "usage": usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        # the background task also frees the slot of a client that left before the stream began
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(generation.cancel))

    return app


def main(argv=None):
    import uvicorn
    args = parse_args(argv)
    keys = read_secrets(args.api_key, args.api_key_file, "MINIMIND_API_KEY", "API key")
    require_auth(args, bool(keys), "--api_key KEY (or MINIMIND_API_KEY, or --api_key_file)")
    engine = load_engine(args)
    print(f"MiniMind-V: {engine.describe()}", file=sys.stderr)
    torch.set_grad_enabled(False)
    app = create_app(engine, args.max_request_bytes, args.max_image_bytes, args.max_image_pixels, keys)
    print(f"OpenAI-compatible API on http://{args.host}:{args.port}/v1"
          f"{f' ({len(keys)} key(s))' if keys else ''}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=max(1, int(args.drain_seconds))))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    # on SIGTERM: uvicorn stops accepting (should_exit) while this thread finishes the answers in flight
    serve_engine(engine, lambda: setattr(server, "should_exit", True), lambda: thread.join(args.drain_seconds + 10),
                 args.drain_seconds, thread, args.status_interval)


if __name__ == "__main__":
    main()
