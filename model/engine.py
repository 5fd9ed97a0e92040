"""The one inference engine: a MiniMind-V model, its tokenizer and the frozen vision tower, answering
conversations. 3-eval_chat.py, web_server.py, serve_openai_api.py and the exported transformers model
(modeling_minimind_v.py) all answer through ChatEngine.

  conversation  -> prompt ids          ChatEngine.prepare (model/tokenizer.py's chat format, checked)
  images        -> image features      ChatEngine.encode / image_features (through a feature cache if given)
  one answer, streamed                 ChatEngine.generate -> Generation (text pieces as they are decoded)
  many answers at once                 ChatEngine.answer_batch (left-padded batch, greedy or sampled)

Many users, one model: every request keeps its own conversation, image features, KV cache and random
generator, so nothing mutable is shared between them. The model runs one forward pass at a time (a lock
around each decoding step), which lets concurrent streams interleave token by token.
"""
import io
import secrets
import threading
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import load_vlm, resolve_checkpoint
from .LMConfig import IMAGE_MARKER
from .tokenizer import DEFAULT_TOKENIZER, build_prompt, load_tokenizer
from .vision import (DEFAULT_VISION_MODEL, MAX_IMAGE_PIXELS, BadImage, autocast_dtype, cached_features,
                     encode_images, load_vision_model, pixels_of, read_image)

MAX_IMAGE_BYTES = 10 * 2 ** 20  # an upload larger than this is refused before it is decoded


class InputError(ValueError):
    """Something wrong with what a user sent. The message says what, and is safe to show them."""


class TooLarge(InputError):
    """An upload over a size limit (bytes or pixels)."""


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


def left_pad(seqs, pad_id=0):
    """(ids, attention_mask), left-padded so every row's last prompt token sits in the last column."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


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
    """A MiniMind-V model, its tokenizer and the frozen vision tower, ready to answer. `ChatEngine.load`
    reads them from files; the constructor takes them already loaded (as the exported model does)."""

    def __init__(self, model, tokenizer, vision_model, autocast=None, name="MiniMind-V", vision_name=""):
        self.model, self.tokenizer, self.vision = model.eval(), tokenizer, vision_model
        self.cfg = model.params
        self.device = model.output.weight.device
        self.autocast = autocast  # dtype the image encoder runs in (None: fp32)
        self.name, self.vision_name = name, vision_name
        self.lock = threading.Lock()

    @classmethod
    def load(cls, ckpt, vision_model=DEFAULT_VISION_MODEL, tokenizer=DEFAULT_TOKENIZER, device=None, dtype="auto"):
        """From a checkpoint (.safetensors/.pth/stem/export directory), a CLIP directory and a tokenizer
        directory. Missing or mismatched files raise FileNotFoundError or ValueError naming them."""
        device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        tok = load_tokenizer(tokenizer)
        ckpt = resolve_checkpoint(ckpt)
        model, _ = load_vlm(ckpt, tok, device)
        amp = autocast_dtype(device.type, dtype)
        bf16 = amp == torch.bfloat16
        vision = load_vision_model(vision_model, device, torch.bfloat16 if bf16 else torch.float32)
        if bf16:
            # Decoding one stream reads every weight once per token, so weights of half the bytes decode faster.
            # RMSNorm, RoPE and the sampled logits stay fp32 (model.py); the KV cache follows the weights' dtype.
            # fp16 weights are not used: an fp16 residual stream can overflow where bf16's range cannot.
            model.to(amp)
            model.init_buffers(device)  # RoPE tables back to fp32 (.to converted them)
        return cls(model, tok, vision, amp, Path(ckpt).stem, Path(vision_model).name)

    def describe(self) -> str:
        moe = ", MoE" if self.cfg.use_moe else ""
        random = " (random init: demo only)" if "random" in self.vision_name else ""
        return (f"{self.name} · {self.model.num_parameters() / 1e6:.1f}M parameters (dim {self.cfg.dim}, "
                f"{self.cfg.n_layers} layers{moe}, context {self.cfg.max_seq_len}) · vision: "
                f"{self.vision_name}{random} · {self.device}")

    # -- images -------------------------------------------------------------------------------------------

    def encode(self, images) -> torch.Tensor:
        """(n, 50, 768) CPU features for a list of RGB PIL images."""
        pixels = pixels_of(images)  # outside the lock: other users' answers go on meanwhile
        with self.lock:
            return encode_images(self.vision, pixels, self.autocast).cpu()

    def image_features(self, pixels, keys=None, cache=None) -> torch.Tensor:
        """(n, 50, 768) features for preprocessed (n, 3, 224, 224) pixels; through `cache` when it and the
        images' cache keys are given."""
        if cache is None or keys is None:
            return encode_images(self.vision, pixels, self.autocast)
        return cached_features(self.vision, keys, cache, keys, pixels, self.autocast)

    # -- answers ------------------------------------------------------------------------------------------

    def prepare(self, messages, n_images: int) -> list:
        """Prompt ids for [{"role", "content"}, ...], where `<image>` in a content marks where each of the
        n_images images goes. Raises InputError when the markers and images disagree or it is too long."""
        ids = self.tokenizer(build_prompt(messages), add_special_tokens=False).input_ids
        _, found = self.model.placeholder_mask(torch.tensor([ids]))
        if int(found[0]) != n_images:
            raise InputError(f"the conversation has {int(found[0])} image placeholder(s) for {n_images} image(s)"
                             f" (is there a literal '{IMAGE_MARKER}' or a run of '<'/'>' in the text?)")
        if len(ids) >= self.cfg.max_seq_len:
            limit = self.cfg.max_seq_len - 1
            raise PromptTooLong(f"the conversation is {len(ids)} tokens; this model reads at most {limit} before "
                                "answering. Start a new conversation or ask something shorter.", len(ids), limit)
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

    @torch.inference_mode()
    def answer_batch(self, prompt_ids, image_features, **sampling) -> list:
        """Answers (strings) for a batch of prompts (ids from prepare), each with its (n_i, 50, 768) image
        features or None, generated together; sampling as MiniMindVLM.stream_generate takes it."""
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id or 0)
        feats = [None if f is None else f.to(self.device) for f in image_features]
        eos = self.tokenizer.eos_token_id
        with self.lock:
            out = self.model.generate(ids.to(self.device), feats, attention_mask=mask.to(self.device),
                                      eos_token_id=eos, **sampling)
        answers = []
        for row in out.tolist():
            row = row[:row.index(eos)] if eos in row else row
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers
