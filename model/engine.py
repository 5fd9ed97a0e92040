"""Inference helpers for 3-eval_chat.py (and the web demo): prompt building, image features, batched
generation and streaming text."""
import itertools

import torch

from .LMConfig import IMAGE_MARKER, IMAGE_PLACEHOLDER
from .vision import encode_images


def build_prompt(tokenizer, messages):
    """Chat-template text for [{"role", "content"}, ...] ending with the assistant prefix. `<image>` in the
    content becomes the 50-token placeholder."""
    msgs = [{"role": m["role"], "content": m["content"].replace(IMAGE_MARKER, IMAGE_PLACEHOLDER)} for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if not text.endswith("<s>assistant\n"):  # templates that only add the prefix on request, or never
        text += "<s>assistant\n"
    return text


def left_pad(seqs, pad_id=0):
    """(ids, attention_mask), left-padded so every row's last prompt token sits in the last column."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, T - len(s):] = 1
    return ids, mask


def features_for(vision_model, pixels, dtype=None, cache=None, keys=None):
    """(N, 50, 768) features for preprocessed pixels, read from / written to the cache when keys are given."""
    if cache is not None and keys is not None:
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            for i, f in zip(todo, encode_images(vision_model, pixels[todo], dtype)):
                cache.put(keys[i], f)
        return torch.stack([cache.get(k) for k in keys]).float()
    return encode_images(vision_model, pixels, dtype)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts, image_features, device, **sampling):
    """Answers (strings) for a batch of prompt texts, each with its own (n_i, 50, 768) features or None."""
    seqs = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    ids, mask = left_pad(seqs, tokenizer.pad_token_id or 0)
    feats = [None if f is None else f.to(device) for f in image_features]
    out = model.generate(ids.to(device), feats, attention_mask=mask.to(device),
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    answers = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


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


def stream_text(model, tokenizer, prompt, image_features, device, **sampling):
    """Yield text pieces of one answer as they are generated."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids], device=device)
    feats = None if image_features is None else [image_features.to(device)]
    steps = model.stream_generate(ids, feats, eos_token_id=tokenizer.eos_token_id, **sampling)
    tokens = itertools.takewhile(lambda t: t != tokenizer.eos_token_id, (int(s[0]) for s in steps))
    yield from text_pieces(tokens, tokenizer)
