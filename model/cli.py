"""Command-line flags that several scripts share, and the help format that shows every flag's default.

The defaults come from the modules that own them, imported inside each function: a script that only wants
HelpFormatter (the demo data generator, the tokenizer trainer) does not load torch for it.
"""
import argparse
import os
import sys

DTYPES = ["auto", "bfloat16", "float16", "float32"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and ends every flag's help with its default (unless the
    help already shows it)."""

    def _get_help_string(self, action):
        help = action.help or ""
        return help if "(default" in help else super()._get_help_string(action)


def default_device() -> str:
    import torch
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def add_model_args(parser, ckpt_default="out/512_vlm_sft", ckpt_help=None, runtime=True):
    """--ckpt --vision_model --tokenizer, and with runtime also --device --dtype: what loading a trained
    model for inference takes."""
    from .tokenizer import DEFAULT_TOKENIZER
    from .vision import DEFAULT_VISION_MODEL
    a = parser.add_argument
    a("--ckpt", default=ckpt_default, help=ckpt_help or "MiniMind-V checkpoint: .safetensors or .pth (with its "
      ".json sidecar, if any), a stem for either, or an export_model.py directory")
    a("--vision_model", default=DEFAULT_VISION_MODEL, help="local CLIP ViT-B/32 directory")
    a("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer directory (the one the checkpoint was trained with)")
    if runtime:
        a("--max_seq_len", type=int, default=None, help="context, prompt and answer together (default: the length "
          "the checkpoint was trained with; a file that does not record it gets upstream v1's 200, with a notice)")
        a("--device", default=default_device(), help="where the model runs")
        a("--dtype", default="auto", choices=DTYPES + ["int8"], help="inference dtype: int8 = the decoder's "
          "weight matrices in int8 (weight-only, per-row scales; CPU); bfloat16 = decoder and image encoder weights "
          "in bf16; float16 only autocasts the encoder; auto = int8 decoder on CPUs (with a bf16 image encoder "
          "where the CPU has native bf16, else fp32), bf16 on CUDA (model/hardware.py has the measured rule)")


def add_max_image_pixels(parser):
    from .images import MAX_IMAGE_PIXELS
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="images with more pixels (width x height) are refused: a guard against "
                             "decompression bombs")


def add_serving_args(parser, default_port: int):
    """The loading, binding and upload-limit flags both servers take."""
    from .engine import MAX_BATCH, MAX_IMAGE_BYTES, MAX_WAITING
    add_model_args(parser)
    a = parser.add_argument
    a("--max_batch", type=int, default=MAX_BATCH, help="answers decoded together, one forward pass per token for "
      "all of them (continuous batching); later requests wait, in arrival order, for a free slot")
    a("--max_waiting", type=int, default=MAX_WAITING, help="requests that may wait for a slot; beyond them a request "
      "is refused at once as busy (HTTP 429 in the API, a message in the web demo)")
    a("--row_block", type=int, default=0, help="0: ask this machine's kernels at load how to batch a decoding "
      "step so that an answer is the same alone or batched (model/batch_invariance.py); N: pad each step's rows "
      "to a multiple of N in one product instead, which on some CPUs lets an answer depend on its batch")
    a("--host", default="127.0.0.1", help="address to bind; any other than loopback exposes the server to your "
      "network and needs a key or login (or --no_auth)")
    a("--port", type=int, default=default_port, help="port to listen on")
    a("--no_auth", action="store_true", help="serve a non-loopback address without a key or login (a trusted "
      "network only)")
    a("--drain_seconds", type=float, default=30.0, help="on SIGTERM or Ctrl-C: how long answers in flight may go "
      "on (new requests are refused meanwhile); the rest are then cancelled")
    a("--status_interval", type=float, default=60.0, help="seconds between status lines on stderr (answering, "
      "waiting), printed when anything changed")
    a("--max_image_bytes", type=int, default=MAX_IMAGE_BYTES, help="largest image upload, in bytes")
    add_max_image_pixels(parser)


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def require_auth(args, has_auth: bool, how: str, exposed=None):
    """Refuse to serve a non-loopback address (or a public link) without a key or login: exit with what to do.
    --no_auth serves it anyway, with a warning."""
    exposed = exposed or (None if is_loopback(args.host) else f"--host {args.host} exposes it to your network")
    if not exposed or has_auth:
        return
    if not args.no_auth:
        raise SystemExit(f"error: {exposed}, and nothing asks for a key or login. Pass {how}, or --no_auth to serve "
                         "anyone who can reach it (a trusted network only).")
    print(f"warning: {exposed} with no key or login (--no_auth): anyone who can reach it can use it",
          file=sys.stderr)


def read_secrets(values, file, env=None, what="key") -> list:
    """Secrets from repeated flags, a file (one a line; blank lines and # comments skipped) and an environment
    variable (comma-separated), in that order."""
    out = list(values or [])
    if file:
        try:
            lines = open(file, encoding="utf-8").read().splitlines()
        except OSError as e:
            raise SystemExit(f"error: cannot read the {what} file {file}: {e.strerror}") from None
        out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if env and os.environ.get(env):
        out += [v.strip() for v in os.environ[env].split(",") if v.strip()]
    return out


def status_line(engine) -> str:
    s = engine.scheduler()
    load = s.load()
    return (f"status: {load['active']}/{engine.max_batch} answering, {load['waiting']} waiting, "
            f"{s.steps} steps, {s.cancelled} cancelled")


def serve_engine(engine, stop_accepting, stop_server, drain_seconds=30.0, server_thread=None, status_interval=60.0):
    """Run the engine's turns on this, the process's main, thread until Ctrl-C or SIGTERM (or the end of
    server_thread), printing status_line when it changed (every status_interval s). Then drain: stop_accepting()
    and the engine refuse new requests, the answers in flight go on for up to drain_seconds, the rest are
    cancelled, and stop_server() ends the server. The server (uvicorn, Gradio) runs in threads of its own and only
    hands requests over: model/engine.py says why the tensor work belongs to one thread."""
    import signal
    import threading
    import time

    from .hardware import return_freed_memory
    return_freed_memory()  # resident memory must not creep up over hours of answers of every length
    scheduler = engine.scheduler()
    signal.signal(signal.SIGTERM, lambda signum, frame: scheduler.stop())
    if server_thread is not None:  # a server that ends by itself (a port already taken) ends the process too
        threading.Thread(target=lambda: (server_thread.join(), scheduler.stop()), daemon=True).start()
    shown = [None]

    def status():
        line = status_line(engine)
        if line != shown[0]:
            print(line, file=sys.stderr, flush=True)
            shown[0] = line
    try:
        scheduler.serve_forever(tick=status, tick_seconds=status_interval)
    except KeyboardInterrupt:
        pass
    engine.accepting = False
    stop_accepting()
    deadline = time.monotonic() + drain_seconds
    print(f"shutting down: {scheduler.queued()} answer(s) in flight may finish within {drain_seconds:g} s",
          file=sys.stderr, flush=True)
    try:
        scheduler.serve_forever(until=lambda: scheduler.queued() == 0 or time.monotonic() > deadline)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        pass
    cancelled = scheduler.cancel_all()
    scheduler.serve_forever(until=lambda: not scheduler._has_work())  # the cancelled ones leave
    if cancelled:
        print(f"shutting down: {cancelled} answer(s) cancelled at the end of the drain", file=sys.stderr, flush=True)
    stop_server()


def load_engine(args):
    """ChatEngine from the parsed model flags, or exit with the loading error (missing file, wrong keys...)."""
    from .engine import ChatEngine
    try:
        return ChatEngine.load(args.ckpt, args.vision_model, args.tokenizer, args.device, args.dtype,
                               max_seq_len=getattr(args, "max_seq_len", None), max_batch=args.max_batch,
                               max_waiting=args.max_waiting, row_block=args.row_block or None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
