"""Inference helpers for 3-eval_chat.py (and the web demo): prompt building, image features, batched
generation and streaming text."""
import torch

from .LMConfig import IMAGE_MARKER, IMAGE_PLACEHOLDER
from .vision_utils import encode_images


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


def stream_text(model, tokenizer, prompt, image_features, device, **sampling):
    """Yield text pieces of one answer as they are generated. A piece is emitted only once its bytes form
    whole characters, so multi-byte characters are never split."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids], device=device)
    feats = None if image_features is None else [image_features.to(device)]
    new, printed = [], ""
    for tok in model.stream_generate(ids, feats, eos_token_id=tokenizer.eos_token_id, **sampling):
        t = int(tok[0])
        if t == tokenizer.eos_token_id:
            break
        new.append(t)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            yield text[len(printed):]
            printed = text
