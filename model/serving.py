"""What web_server.py and serve_openai_api.py share: one loaded model, input checks whose messages can be shown
to whoever sent the input, and streamed answers.

Many visitors, one model: every request keeps its own conversation, image features, KV cache and random
generator, so nothing mutable is shared between them. The model itself runs one forward pass at a time (a
lock around each decoding step), which lets concurrent streams interleave token by token.
"""
import io
import secrets
import threading
from pathlib import Path

import torch
from PIL import Image

from .engine import build_prompt, text_pieces
from .checkpoint import load_vlm, resolve_checkpoint
from trainer.data import DEFAULT_TOKENIZER, load_tokenizer
from .LMConfig import IMAGE_MARKER
from .vision import (DEFAULT_VISION_MODEL, MAX_IMAGE_PIXELS, BadImage, autocast_dtype, encode_images,
                           load_vision_model, preprocess_image, read_image)

MAX_IMAGE_BYTES = 10 * 2 ** 20  # an upload larger than this is refused before it is decoded


class InputError(ValueError):
    """Something wrong with what a user sent. The message says what, and is safe to show them."""


class TooLarge(InputError):
    """An upload over a size limit (bytes or pixels)."""


class PromptTooLong(InputError):
    """A conversation that leaves the model no room to answer."""


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


class Generation:
    """Iterate for the answer's text pieces; afterwards prompt_tokens, completion_tokens and finish_reason
    ('stop': the model ended its answer, 'length': max_new_tokens or the context ran out) are set."""

    def __init__(self, engine, ids, image_features, max_new_tokens, sampling, seed):
        self.engine, self.ids, self.image_features = engine, ids, image_features
        self.prompt_tokens, self.completion_tokens = len(ids), 0
        self.finish_reason = None
        room = engine.cfg.max_seq_len - len(ids)
        self.max_new_tokens = max(0, min(int(max_new_tokens), room))
        self.sampling = sampling
        self.seed = secrets.randbits(63) if seed is None else int(seed)

    def __iter__(self):
        e = self.engine
        eos = e.tokenizer.eos_token_id
        generator = torch.Generator(device=e.device).manual_seed(self.seed)
        ids = torch.tensor([self.ids], device=e.device)
        feats = None if self.image_features is None else [self.image_features.to(e.device)]
        steps = e.model.stream_generate(ids, feats, max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                                        generator=generator, **self.sampling)
        self.finish_reason = "length"

        def tokens():
            while True:
                with e.lock:  # one forward pass at a time; other requests' steps interleave between ours
                    token = next(steps, None)
                if token is None:
                    return
                if int(token[0]) == eos:
                    self.finish_reason = "stop"
                    return
                self.completion_tokens += 1
                yield int(token[0])
        yield from text_pieces(tokens(), e.tokenizer)

    def text(self) -> str:
        return "".join(self)


class ChatEngine:
    """A MiniMind-V checkpoint, its tokenizer and the frozen vision tower, loaded once for serving."""

    def __init__(self, ckpt, vision_model=DEFAULT_VISION_MODEL, tokenizer=DEFAULT_TOKENIZER, device=None,
                 dtype="auto"):
        self.device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(tokenizer)
        ckpt = resolve_checkpoint(ckpt)
        self.model, self.cfg = load_vlm(ckpt, self.tokenizer, self.device)
        self.vision = load_vision_model(vision_model, self.device)
        self.autocast = autocast_dtype(self.device.type, dtype)
        self.name = Path(ckpt).stem
        self.vision_name = Path(vision_model).name
        self.lock = threading.Lock()

    def describe(self) -> str:
        moe = ", MoE" if self.cfg.use_moe else ""
        random = " (random init: demo only)" if "random" in self.vision_name else ""
        return (f"{self.name} · {self.model.num_parameters() / 1e6:.1f}M parameters (dim {self.cfg.dim}, "
                f"{self.cfg.n_layers} layers{moe}, context {self.cfg.max_seq_len}) · vision: "
                f"{self.vision_name}{random} · {self.device}")

    def encode(self, images) -> torch.Tensor:
        """(n, 50, 768) CPU features for a list of RGB PIL images."""
        pixels = torch.stack([preprocess_image(im) for im in images])
        with self.lock:
            return encode_images(self.vision, pixels, self.autocast).cpu()

    def prepare(self, messages, n_images: int) -> list:
        """Prompt ids for [{"role", "content"}, ...], where `<image>` in a content marks where each of the
        n_images images goes. Raises InputError when the markers and images disagree or it is too long."""
        text = build_prompt(self.tokenizer, messages)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        _, found = self.model.placeholder_mask(torch.tensor([ids]))
        if int(found[0]) != n_images:
            raise InputError(f"the conversation has {int(found[0])} image placeholder(s) for {n_images} image(s)"
                             f" (is there a literal '{IMAGE_MARKER}' or a run of '<'/'>' in the text?)")
        if len(ids) >= self.cfg.max_seq_len:
            raise PromptTooLong(f"the conversation is {len(ids)} tokens; this model reads at most "
                             f"{self.cfg.max_seq_len - 1} before answering. Start a new conversation or ask "
                             f"something shorter.")
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
        sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p,
                        repetition_penalty=repetition_penalty)
        return Generation(self, ids, image_features, max_new_tokens, sampling, seed)


def add_serving_args(parser, default_port: int):
    """The loading and binding flags both servers take."""
    a = parser.add_argument
    a("--ckpt", default="out/512_vlm_sft", help="MiniMind-V checkpoint: .safetensors or .pth (with its .json "
                                                  "sidecar, if any); without a suffix, either")
    a("--vision_model", default=DEFAULT_VISION_MODEL, help="local CLIP ViT-B/32 directory")
    a("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer directory (the one the checkpoint was trained with)")
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu", help="where the model runs")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="image encoder autocast")
    a("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to your network")
    a("--port", type=int, default=default_port, help="port to listen on")
    a("--max_image_bytes", type=int, default=MAX_IMAGE_BYTES, help="largest image upload, in bytes")
    a("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS, help="largest image, in pixels (width x height)")


def load_engine(args) -> ChatEngine:
    """ChatEngine from the parsed flags, or exit with the loading error (missing file, wrong keys...)."""
    try:
        return ChatEngine(args.ckpt, args.vision_model, args.tokenizer, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
