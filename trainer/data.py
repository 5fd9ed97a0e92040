"""LLaVA-format records (trainer/records.py) -> token ids, loss labels and image pixels (or cached features).

Each `<image>` in the text becomes the 50-token placeholder whose embeddings the model replaces with the
projected CLIP tokens of the corresponding image. Loss is on every assistant answer and its closing `</s>`.
Images are decoded here, inside DataLoader workers; the frozen encoder runs in the training process.
"""
import math
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from model.LMConfig import IMAGE_PLACEHOLDER
from model.tokenizer import ANSWER_END, ChatFormatError, image_token_ids, split_turns, turn_texts
from model.images import MAX_IMAGE_PIXELS, BadImage
from model.vision import load_image

from .feature_cache import image_cache_key
from .records import (UPSTREAM_IMAGE_PREFIXES, Problem, RecordError, conversation_to_messages, find_image,
                      image_path)

IGNORE_INDEX = -100


def assemble(pieces, newline, max_seq_len):
    """Token ids and labels from tokenized turn_texts pieces: (ids, labels, turns kept, first answer cut).
    Labels copy the ids of each answer and its </s>, -100 elsewhere. Whole turns that do not fit in
    max_seq_len are left out; an over-long first answer is cut; a first prompt that does not fit (it holds
    the image placeholder, which must never be cut) raises RecordError('too_long')."""
    ids, labels = [], []
    for k in range(len(pieces) // 2):
        prompt, reply, nl = pieces[2 * k], pieces[2 * k + 1], newline
        room = max_seq_len - len(ids)
        if len(prompt) + len(reply) + len(nl) > room:
            if k > 0:
                return ids, labels, k, False  # this and later turns are left out
            if len(prompt) >= room:
                raise RecordError("too_long", f"the first prompt is {len(prompt)} tokens (with 50 per image), "
                                              f"max_seq_len is {max_seq_len}")
            ids, labels = prompt + reply[:room - len(prompt)], [IGNORE_INDEX] * len(prompt) + reply[:room - len(prompt)]
            return ids, labels, 1, True
        ids += prompt + reply + nl
        labels += [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * len(nl)
    return ids, labels, len(pieces) // 2, False


def encode_chat(tokenizer, messages, max_seq_len: int):
    """(ids, labels, images kept) of a chat, rendered by model/tokenizer.py (see assemble). The images of
    left-out turns go with them: placeholders are in order, so the kept images are the first ones."""
    try:
        system, turns = split_turns(messages)
    except ChatFormatError as e:
        raise RecordError("role_order", str(e)) from None
    texts = turn_texts(system, turns)
    pieces = tokenizer(texts, add_special_tokens=False).input_ids
    ids, labels, kept, _ = assemble(pieces, tokenizer(ANSWER_END, add_special_tokens=False).input_ids, max_seq_len)
    return ids, labels, sum(t.count(IMAGE_PLACEHOLDER) for t in texts[:2 * kept])


def tokenize_conversation(tokenizer, messages, max_seq_len: int, where: str = "record"):
    """Token ids and labels of a chat (see encode_chat). Errors (RecordError) start with `where`."""
    try:
        ids, labels, _ = encode_chat(tokenizer, messages, max_seq_len)
    except RecordError as e:
        raise RecordError(e.kind, f"{where}: {e}") from None
    return ids, labels


def conversation_lengths(tokenizer, records, max_seq_len, progress=False, chunk=2048):
    """Exactly what training will make of each record, without images: (tokens, turns kept, turns, status)
    with status 'ok', 'truncated' (later turns left out), 'answer_cut' (the first answer cut to fit) or
    'too_long' (the first prompt does not fit: tokens is its length). Text is tokenized in large batches: one pass, fast."""
    from tqdm import tqdm
    newline = tokenizer(ANSWER_END, add_special_tokens=False).input_ids
    out = []
    for start in tqdm(range(0, len(records), chunk), desc="measuring token lengths", disable=not progress,
                      unit="chunk"):
        splits = [split_turns(conversation_to_messages(r)) for r in records[start:start + chunk]]
        texts = [turn_texts(system, turns) for system, turns in splits]
        flat = tokenizer([t for ts in texts for t in ts], add_special_tokens=False).input_ids
        i = 0
        for ts in texts:
            pieces, i = flat[i:i + len(ts)], i + len(ts)
            try:
                ids, _, kept, cut = assemble(pieces, newline, max_seq_len)
                status = "answer_cut" if cut else "truncated" if kept < len(ts) // 2 else "ok"
                out.append((len(ids), kept, len(ts) // 2, status))
            except RecordError:
                out.append((len(pieces[0]), 0, len(ts) // 2, "too_long"))
    return out


def length_problem(entry, file, n_tokens, kept, total, status, max_seq_len):
    """The Problem a record's conversation_lengths result is ('too_long' or 'truncated'), or None."""
    if status == "too_long":
        detail = f"the first turn is {n_tokens} tokens (50 per image); max_seq_len is {max_seq_len}"
    elif status == "answer_cut":
        detail = f"the first answer is cut to fit in max_seq_len {max_seq_len}" + (
            f"; the other {total - 1} turn(s) are left out" if total > 1 else "")
    elif status == "truncated":
        detail = f"{kept} of {total} turn(s) fit in max_seq_len {max_seq_len}; the rest are left out"
    else:
        return None
    return Problem("too_long" if status == "too_long" else "truncated", file, entry.line, entry.id, detail)


def measure_entries(tokenizer, entries, file, max_seq_len, progress=False):
    """(the entries that fit, their token lengths, the length problems of all): conversation_lengths with
    its too_long records left out and its too_long / truncated results as Problems."""
    kept, lengths, problems = [], [], []
    for e, (n, n_kept, total, status) in zip(entries, conversation_lengths(
            tokenizer, [e.record for e in entries], max_seq_len, progress)):
        problem = length_problem(e, file, n, n_kept, total, status, max_seq_len)
        problems += [problem] if problem else []
        if status != "too_long":
            kept.append(e)
            lengths.append(n)
    return kept, lengths, problems


class VLMDataset(Dataset):
    """The usable records of a dataset file (a RecordIndex, trainer/data_index.py), or of a part of them.
    Per sample: input_ids, labels, image_keys and, for images whose features are not in the on-disk feature
    cache yet, their preprocessed pixels.

    Every record problem that needs no image decoding is found before training: those the index found (bad
    JSON, structure, roles, markers, a first turn over max_seq_len, notes), and missing or empty image files,
    looked for here at each start (files come and go). They are in `problems`, and those records are not
    samples. Image names are found as given or with upstream's prefix (records.resolve_image); `image_lookup`
    counts which. An image that turns out bad when decoded makes its sample {"index": i, "problem": Problem}
    instead of raising: the collator sets it aside and the trainer decides (--on_bad_sample).

    rows: the index rows this dataset holds (None: all); `problems` then has only theirs, as chosen by
    `problem_filter(problem) -> bool`. (trainer/data_index.open_dataset builds or reads the index first.)"""

    def __init__(self, index, images_dir, tokenizer, max_seq_len=640, feature_cache=None,
                 max_image_pixels=MAX_IMAGE_PIXELS, rows=None, problem_filter=None):
        self.index, self.data_path, self.images_dir = index, index.path, images_dir
        self.tokenizer, self.max_seq_len, self.max_image_pixels = tokenizer, max_seq_len, max_image_pixels
        self.feature_cache = feature_cache  # FeatureCache or None; only its on-disk part is seen by workers
        self.image_ids = image_token_ids(tokenizer)
        rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.problems = [p for p in index.problems if problem_filter is None or problem_filter(p)]
        self.prefix_of = np.zeros(len(index.names), dtype=np.uint8)  # per name slot: 0 as given, k: prefix k-1
        missing = self.find_images(rows)
        self.problems = sorted(self.problems + list(missing.values()), key=lambda p: p.line or 0)
        self.rows = rows[[r not in missing for r in rows.tolist()]] if missing else rows
        self.lengths = index.length[self.rows]

    def find_images(self, rows):
        """Resolve every image name of these rows (each distinct name stat-ed once); {row: Problem} for the
        rows with a missing or empty image file."""
        seen, bad = {}, {}
        self.image_lookup = Counter()
        index = self.index
        for r in rows.tolist():
            for slot in index.name_slots(r):
                name = index.names[slot]
                if name not in seen:
                    try:
                        _, prefix = find_image(self.images_dir, name)
                        seen[name] = (UPSTREAM_IMAGE_PREFIXES.index(prefix) + 1 if prefix else 0, None)
                    except BadImage as e:
                        seen[name] = (0, (e.kind, str(e)))
                code, problem = seen[name]
                self.prefix_of[slot] = code
                self.image_lookup["bad" if problem else UPSTREAM_IMAGE_PREFIXES[code - 1] if code else ""] += 1
                if problem and r not in bad:
                    bad[r] = index.problem(r, *problem)
        return bad

    def image_lookup_text(self) -> str:
        """How the image names were found: 'N as named, M with upstream's prefix COCO_train2014_, K missing'."""
        label = {"": "as named", "bad": "missing or empty"}
        return ", ".join(f"{n} {label.get(how, f'with the prefix {how}')}"
                         for how, n in sorted(self.image_lookup.items())) or "no images"

    def keep(self, indices):
        """Only these samples from now on (records whose images turned out bad are left out)."""
        self.rows = self.rows[np.sort(np.asarray(indices, dtype=np.int64))]
        self.lengths = self.index.length[self.rows]

    def __len__(self):
        return len(self.rows)

    def problem(self, i, kind, detail) -> Problem:
        return self.index.problem(self.rows[i], kind, detail)

    def image_paths(self, i):
        index = self.index
        return [image_path(self.images_dir, index.names[slot], (("",) + UPSTREAM_IMAGE_PREFIXES)[self.prefix_of[slot]])
                for slot in index.name_slots(self.rows[i])]

    def __getitem__(self, i):
        messages = conversation_to_messages(self.index.record(self.rows[i]))
        ids, labels, n_images = encode_chat(self.tokenizer, messages, self.max_seq_len)
        keys, pixels = [], []
        for p in self.image_paths(i)[:n_images]:
            try:
                keys.append(image_cache_key(p))
                cached = self.feature_cache is not None and self.feature_cache.on_disk(keys[-1])
                pixels.append(None if cached else load_image(p, self.max_image_pixels))
            except BadImage as e:
                return {"index": i, "problem": self.problem(i, e.kind, str(e))}
            except FileNotFoundError:  # gone since the dataset was read
                return {"index": i, "problem": self.problem(i, "image_missing", f"image {p} does not exist")}
        return {"input_ids": ids, "labels": labels, "image_keys": keys, "pixel_values": pixels, "index": i}


class VLMCollator:
    """Pads a batch to its own longest sequence (right padding) and gathers its images: image_counts per row,
    image_keys flat in row order, and the pixels that still need encoding. Samples that came back as a
    problem are not rows: they are listed in "problems" (a batch of only those has input_ids None)."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, batch):
        problems = [s["problem"] for s in batch if "problem" in s]
        batch = [s for s in batch if "problem" not in s]
        if not batch:
            return {"input_ids": None, "problems": problems, "index": []}
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
            "problems": problems,
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
    """Unique image files -> (path, key, pixels or None, BadImage or None); fills the feature cache."""

    def __init__(self, paths, max_pixels=MAX_IMAGE_PIXELS):
        self.paths, self.max_pixels = list(paths), max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        p = self.paths[i]
        try:
            return p, image_cache_key(p), load_image(p, self.max_pixels), None
        except BadImage as e:
            return p, None, None, e
        except FileNotFoundError:
            return p, None, None, BadImage("image_missing", f"image {p} does not exist")


def collate_images(batch):
    """(keys of the good images, their pixels stacked or None, [(path, BadImage)] for the others)."""
    good = [(k, px) for _, k, px, err in batch if err is None]
    return ([k for k, _ in good], torch.stack([px for _, px in good]) if good else None,
            [(p, err) for p, _, _, err in batch if err is not None])
