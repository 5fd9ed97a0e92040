"""Command-line flags that several scripts share, and the help format that shows every flag's default.

The defaults come from the modules that own them, imported inside each function: a script that only wants
HelpFormatter (the demo data generator, the tokenizer trainer) does not load torch for it.
"""
import argparse

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
    a("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to your network")
    a("--port", type=int, default=default_port, help="port to listen on")
    a("--max_image_bytes", type=int, default=MAX_IMAGE_BYTES, help="largest image upload, in bytes")
    add_max_image_pixels(parser)


def serve_engine(engine, stop_server, server_thread=None):
    """Run the engine's turns on this, the process's main, thread until Ctrl-C, SIGTERM or the end of
    server_thread; then stop_server(). The server (uvicorn, Gradio) runs in threads of its own and only hands
    requests over: model/engine.py says why the tensor work belongs to one thread."""
    import signal
    import threading
    scheduler = engine.scheduler()
    signal.signal(signal.SIGTERM, lambda signum, frame: scheduler.stop())
    if server_thread is not None:  # a server that ends by itself (a port already taken) ends the process too
        threading.Thread(target=lambda: (server_thread.join(), scheduler.stop()), daemon=True).start()
    try:
        scheduler.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server()


def load_engine(args):
    """ChatEngine from the parsed model flags, or exit with the loading error (missing file, wrong keys...)."""
    from .engine import ChatEngine
    try:
        return ChatEngine.load(args.ckpt, args.vision_model, args.tokenizer, args.device, args.dtype,
                               max_batch=args.max_batch, max_waiting=args.max_waiting,
                               row_block=args.row_block or None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
