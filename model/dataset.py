"""LLaVA-format image/conversation data -> token ids, loss labels and image pixels (or cached features).

A record (JSON list or JSON-lines file):
    {"id": "...", "image": "a.jpg" (or ["a.jpg", "b.jpg"]),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}
Each `<image>` in the text becomes the 50-token placeholder whose embeddings the model replaces with the
projected CLIP tokens of the corresponding image. Loss is on every assistant answer and its closing `</s>`.
Images are decoded here, inside DataLoader workers; the frozen encoder runs in the training process.
"""
import json
import math
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .LMConfig import IMAGE_MARKER, IMAGE_PLACEHOLDER
from .vision_utils import preprocess_image

IGNORE_INDEX = -100
DEFAULT_TOKENIZER = "model/minimind_tokenizer"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_tokenizer(path: str = DEFAULT_TOKENIZER):
    from transformers import AutoTokenizer
    if not Path(path, "tokenizer.json").is_file() and not Path(path, "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json and tokenizer_config.json "
                                "(train one with scripts/train_tokenizer.py, or copy upstream's minimind_tokenizer)")
    return AutoTokenizer.from_pretrained(path)


def image_token_ids(tokenizer) -> list:
    """The ids the placeholder tokenizes to. They must be 50 (one per CLIP token) or the splice cannot work."""
    ids = tokenizer(IMAGE_PLACEHOLDER, add_special_tokens=False).input_ids
    if len(ids) != 50:
        raise ValueError(f"the tokenizer encodes the image placeholder to {len(ids)} ids, not 50: "
                         "it must not merge '<' or '>' (see scripts/train_tokenizer.py)")
    return ids


def load_records(data_path: str):
    """A JSON list or a JSON-lines file of records. Errors name the file and the line."""
    path = Path(data_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {data_path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{data_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{data_path}:{lineno}: invalid JSON: {e.msg}") from None
    if not records:
        raise ValueError(f"{data_path}: no records")
    for i, rec in enumerate(records):
        where = f"{data_path}: record {i} (id {rec.get('id', '?') if isinstance(rec, dict) else '?'})"
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list) or not rec["conversations"]:
            raise ValueError(f"{where}: needs a non-empty 'conversations' list")
        for turn in rec["conversations"]:
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: each turn needs 'from' in {sorted(ROLES)} and a string 'value', got {turn!r}")
    return records


def record_images(rec) -> list:
    img = rec.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


def conversation_to_messages(rec):
    return [{"role": ROLES[t["from"]], "content": t["value"].replace(IMAGE_MARKER, IMAGE_PLACEHOLDER)}
            for t in rec["conversations"]]


def tokenize_conversation(tokenizer, messages, max_seq_len: int, where: str = "record"):
    """Token ids and labels for a chat rendered as
        [<s>system\\n{system}</s>\\n] <s>user\\n{q}</s>\\n<s>assistant\\n{a}</s>\\n ...
    (the tokenizer's chat template). Labels copy the ids of each answer and its </s>, -100 elsewhere.
    Whole turns that do not fit in max_seq_len are dropped; an over-long first answer is cut; a first prompt
    that does not fit (it holds the image placeholder, which must never be cut) is an error."""
    ids, labels = [], []
    system = ""
    turns, pending = [], None
    for m in messages:
        if m["role"] == "system":
            system += f"<s>system\n{m['content']}</s>\n"
        elif m["role"] == "user":
            if pending is not None:
                raise ValueError(f"{where}: two user turns in a row")
            pending = m["content"]
        else:
            if pending is None:
                raise ValueError(f"{where}: an assistant turn without a user turn before it")
            turns.append((pending, m["content"]))
            pending = None
    if not turns:
        raise ValueError(f"{where}: no (user, assistant) pair")

    def enc(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    for k, (question, answer) in enumerate(turns):
        prompt = enc((system if k == 0 else "") + f"<s>user\n{question}</s>\n<s>assistant\n")
        reply = enc(f"{answer}</s>")
        newline = enc("\n")
        room = max_seq_len - len(ids)
        if len(prompt) + len(reply) + len(newline) > room:
            if k > 0:
                break  # drop this and later turns
            if len(prompt) >= room:
                raise ValueError(f"{where}: the first prompt is {len(prompt)} tokens (with 50 per image), "
                                 f"max_seq_len is {max_seq_len}")
            reply, newline = reply[:room - len(prompt)], []
        ids += prompt + reply + newline
        labels += [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * len(newline)
    return ids, labels


def image_cache_key(path: str) -> str:
    """Feature-cache key of an image file: its absolute path, size and modification time."""
    import hashlib
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


def load_image(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return preprocess_image(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"image {path} cannot be read: {e}") from None


class VLMDataset(Dataset):
    """Returns per sample: input_ids, labels, image_keys and, for images whose features are not in the
    on-disk feature cache yet, their preprocessed pixels."""

    def __init__(self, data_path, images_dir, tokenizer, max_seq_len=640, feature_cache=None):
        self.data_path, self.images_dir = data_path, images_dir
        self.records = load_records(data_path)
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.feature_cache = feature_cache  # FeatureCache or None; only its on-disk part is seen by workers
        self.image_ids = image_token_ids(tokenizer)

    def __len__(self):
        return len(self.records)

    def where(self, i):
        return f"{self.data_path}: record {i} (id {self.records[i].get('id', '?')})"

    def approx_lengths(self, progress=True):
        """Token count of every record before truncation (text tokenized in large batches, 50 per image),
        for grouping batches by length. Cheap: one pass, no images opened."""
        from tqdm import tqdm
        lengths = []
        chunk = 4096
        for start in tqdm(range(0, len(self.records), chunk), desc="measuring lengths", disable=not progress,
                          unit="chunk"):
            recs = self.records[start:start + chunk]
            texts = ["".join(t["value"].replace(IMAGE_MARKER, "") for t in r["conversations"]) for r in recs]
            for r, ids in zip(recs, self.tokenizer(texts, add_special_tokens=False).input_ids):
                n_images = sum(t["value"].count(IMAGE_MARKER) for t in r["conversations"])
                lengths.append(min(self.max_seq_len, len(ids) + 50 * n_images + 8 * len(r["conversations"])))
        return lengths

    def image_paths(self, i):
        return [os.path.join(self.images_dir, p) for p in record_images(self.records[i])]

    def __getitem__(self, i):
        rec = self.records[i]
        messages = conversation_to_messages(rec)
        paths = self.image_paths(i)
        n_markers = sum(t["value"].count(IMAGE_MARKER) for t in rec["conversations"])
        if n_markers != len(paths):
            raise ValueError(f"{self.where(i)}: {n_markers} '<image>' marker(s) but {len(paths)} image(s)")
        ids, labels = tokenize_conversation(self.tokenizer, messages, self.max_seq_len, self.where(i))
        keys, pixels = [], []
        for p in paths:
            key = image_cache_key(p) if os.path.exists(p) else None
            if key is None:
                raise FileNotFoundError(f"{self.where(i)}: image {p} does not exist")
            keys.append(key)
            cached = self.feature_cache is not None and self.feature_cache.on_disk(key)
            pixels.append(None if cached else load_image(p))
        return {"input_ids": ids, "labels": labels, "image_keys": keys, "pixel_values": pixels, "index": i}


class VLMCollator:
    """Pads a batch to its own longest sequence (right padding) and gathers its images:
    image_counts per row, image_keys flat in row order, and the pixels that still need encoding."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, batch):
        T = max(len(s["input_ids"]) for s in batch)
        input_ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(batch):
            input_ids[b, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
            labels[b, :len(s["labels"])] = torch.tensor(s["labels"])
        keys = [k for s in batch for k in s["image_keys"]]
        todo = [(k, px) for s in batch for k, px in zip(s["image_keys"], s["pixel_values"]) if px is not None]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "image_counts": [len(s["image_keys"]) for s in batch],
            "image_keys": keys,
            "pixel_keys": [k for k, _ in todo],
            "pixel_values": torch.stack([px for _, px in todo]) if todo else None,
            "index": [s["index"] for s in batch],
        }


class LengthGroupedBatchSampler(Sampler):
    """Shuffled batches of samples of similar length, so padding to a batch's longest sequence wastes little.

    An optimizer step consumes one global batch: batch_size x accumulation x num_replicas samples. Each
    epoch: a seeded permutation; chunks of `group` global batches are sorted by length and cut into global
    batches; the global batches are shuffled; rank r takes every num_replicas-th sample of each and yields it
    as `accumulation` micro-batches; a last, smaller global batch comes at the end. Every sample is visited
    once per epoch (under DDP the permutation is first padded with repeats to a multiple of num_replicas, as
    DistributedSampler does). So a 2-rank run, or a run with 2 accumulation steps, sees the same global
    batches as 1 rank with twice the batch (exactly so when the dataset size is a multiple of the ranks).
    group=1 gives plain shuffled batches."""

    def __init__(self, lengths, batch_size, num_replicas=1, rank=0, seed=0, group=64, accumulation=1):
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, max(1, group)
        self.num_replicas, self.rank, self.accumulation, self.epoch = num_replicas, rank, accumulation, 0
        self.total = math.ceil(len(self.lengths) / num_replicas) * num_replicas
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Iterate epoch `epoch`'s batches, skipping its first `start` micro-batches (a resumed run). len()
        stays the whole epoch's."""
        self.epoch, self.start = epoch, start

    def __len__(self):
        size = self.batch_size * self.accumulation * self.num_replicas
        rest = self.total % size
        return self.total // size * self.accumulation + math.ceil(rest / self.num_replicas / self.batch_size)

    def global_batches(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        order += order[:self.total - len(order)]
        size = self.batch_size * self.accumulation * self.num_replicas
        batches = []
        for c in range(0, len(order), size * self.group):
            chunk = sorted(order[c:c + size * self.group], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + size] for j in range(0, len(chunk), size)]
        short = [b for b in batches if len(b) < size]  # at most one; it goes last, where the trainer drops an
        full = [b for b in batches if len(b) == size]  # incomplete accumulation group
        return [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + short

    def __iter__(self):
        n = 0
        for batch in self.global_batches():
            share = batch[self.rank::self.num_replicas]
            for j in range(0, len(share), self.batch_size):
                if n >= self.start:
                    yield share[j:j + self.batch_size]
                n += 1


class ImageFileDataset(Dataset):
    """Unique image files -> (key, pixels); used to fill the feature cache before training."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        p = self.paths[i]
        return image_cache_key(p), load_image(p)


def collate_images(batch):
    return [k for k, _ in batch], torch.stack([px for _, px in batch])
