"""What training needs to know about a dataset file, worked out once and kept: which records are usable, where
each one's bytes are in the file, its line, id, image names and token length (exactly what trainer/data.py
will make of it), and the problems of the others.

Why: LLaVA-CC3M has 595K records; tokenizing them all takes ~95 s on 2 cores, and every start, every
--resume and every DDP rank did it again, each process holding 595K Python dicts. The index is a handful of
numpy arrays (DataLoader workers share them; a sample's record is read back from the file when it is needed)
saved as one .npz in {out_dir}/data_index/, named by a hash of (the file's bytes, the tokenizer,
max_seq_len, the chat format): a changed file or tokenizer gets a new index, never a stale one. Under DDP rank
0 builds it and the others read it (a rank that cannot see rank 0's file, e.g. another node's local disk,
builds its own).
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .data import VLMDataset, conversation_lengths, length_problem
from .records import DataError, Entry, Problem, check_record, iter_records, read_record_at, record_images

INDEX_VERSION = 1  # bump when what the index holds or how lengths are counted changes


class Strings:
    """Many short strings as two arrays: their UTF-8 bytes end to end, and where each one ends."""

    def __init__(self, blob: np.ndarray, ends: np.ndarray):
        self.blob, self.ends = blob, ends

    @classmethod
    def of(cls, strings):
        encoded = [s.encode("utf-8") for s in strings]
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        return cls(blob, np.cumsum([len(b) for b in encoded], dtype=np.int64))

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i) -> str:
        start = self.ends[i - 1] if i > 0 else 0
        return self.blob[start:self.ends[i]].tobytes().decode("utf-8")


class RecordIndex:
    """The usable records of one dataset file (row r is the r-th of them), and the problems of the others.

    offset, size   where row r's bytes are in the file     line     the line it starts on
    length         its token length, as trained            ids      its id ("" with has_id False: none)
    names          every row's image names, end to end;    names of row r: name_end[r - 1] .. name_end[r]
    """
    ARRAYS = ("offset", "size", "line", "length", "has_id", "name_end")

    def __init__(self, path, n_records, problems, offset, size, line, length, has_id, ids: Strings,
                 names: Strings, name_end):
        self.path, self.n_records, self.problems = str(path), int(n_records), list(problems)
        self.offset, self.size, self.line, self.length = offset, size, line, length
        self.has_id, self.ids, self.names, self.name_end = has_id, ids, names, name_end

    def __len__(self):
        return len(self.offset)

    def id(self, r):
        return self.ids[r] if self.has_id[r] else None

    def name_slots(self, r) -> range:
        """Positions in `names` of row r's image names."""
        return range(int(self.name_end[r - 1]) if r > 0 else 0, int(self.name_end[r]))

    def record(self, r) -> dict:
        """Row r's record, read back from the file."""
        return read_record_at(self.path, int(self.offset[r]), int(self.size[r]))

    def problem(self, r, kind, detail) -> Problem:
        return Problem(kind, self.path, int(self.line[r]), self.id(r), detail)

    def save(self, file):
        """One .npz (no pickled objects), written atomically: a reader never sees half an index."""
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(self, k) for k in self.ARRAYS}
        arrays.update(ids_blob=self.ids.blob, ids_ends=self.ids.ends, names_blob=self.names.blob,
                      names_ends=self.names.ends, n_records=np.array(self.n_records),
                      problems=np.frombuffer("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n"
                                                     for p in self.problems).encode("utf-8"), dtype=np.uint8))
        tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, file)

    @classmethod
    def load(cls, file, path):
        with np.load(file, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        problems = [Problem(**json.loads(line)) for line in a["problems"].tobytes().decode("utf-8").splitlines()]
        return cls(path, a["n_records"], problems, *(a[k] for k in cls.ARRAYS[:5]),
                   ids=Strings(a["ids_blob"], a["ids_ends"]), names=Strings(a["names_blob"], a["names_ends"]),
                   name_end=a["name_end"])


def build_index(path, tokenizer, max_seq_len, progress=False, chunk=2048) -> RecordIndex:
    """Read and check every record of the file (trainer/records.py) and measure the good ones' token lengths
    (conversation_lengths, a chunk of records at a time, so only `chunk` records are ever held as dicts).
    Records whose first turn is too long are problems ('too_long'), not rows."""
    from tqdm import tqdm
    path = str(path)
    rows = {k: [] for k in ("offset", "size", "line", "length", "has_id")}
    ids, names, name_end, problems, pending = [], [], [], [], []
    n_records = 0

    def measure():
        measured = conversation_lengths(tokenizer, [e.record for e in pending], max_seq_len)
        for e, (n_tokens, kept, total, status) in zip(pending, measured):
            found = length_problem(e, path, n_tokens, kept, total, status, max_seq_len)
            problems.extend([found] if found else [])
            if status == "too_long":
                continue
            for k, v in zip(rows, (e.offset, e.size, e.line, n_tokens, e.id is not None)):
                rows[k].append(v)
            ids.append(e.id or "")
            names.extend(record_images(e.record))
            name_end.append(len(names))
        pending.clear()

    for item in tqdm(iter_records(path), desc=f"indexing {os.path.basename(path)}", disable=not progress,
                     unit="rec", mininterval=1):
        n_records += 1
        if not isinstance(item, Entry):
            problems.append(item)
            continue
        found = check_record(item, path)
        if found:
            problems += found
            continue
        pending.append(item)
        if len(pending) == chunk:
            measure()
    measure()
    if n_records == 0:
        raise DataError([], f"{path}: no records")
    problems.sort(key=lambda p: p.line or 0)
    dtypes = {"offset": np.int64, "size": np.int64, "line": np.int64, "length": np.int32, "has_id": np.bool_}
    return RecordIndex(path, n_records, problems, *(np.array(rows[k], dtype=dtypes[k]) for k in rows),
                       ids=Strings.of(ids), names=Strings.of(names), name_end=np.array(name_end, dtype=np.int64))


def index_file(path, tokenizer, max_seq_len, index_dir) -> Path:
    """Where the index of this (file contents, tokenizer, max_seq_len, chat format) is kept."""
    h = hashlib.blake2b(digest_size=10)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    from model import tokenizer as chat_format  # the renderer: a changed format counts tokens differently
    h.update(Path(chat_format.__file__).read_bytes())
    h.update(f"|{max_seq_len}|{INDEX_VERSION}".encode())
    return Path(index_dir) / f"{Path(path).stem}-{h.hexdigest()}.npz"


def load_index(path, tokenizer, max_seq_len, index_dir=None, build=True, progress=False):
    """(the RecordIndex of a dataset file, "read" or "built"): read from index_dir if it is there, else built
    (and saved there, if index_dir is given). build=False: None when it is not there."""
    if index_dir is None:
        return build_index(path, tokenizer, max_seq_len, progress), "built"
    file = index_file(path, tokenizer, max_seq_len, index_dir)
    if file.is_file():
        return RecordIndex.load(file, path), "read"
    if not build:
        return None, "missing"
    index = build_index(path, tokenizer, max_seq_len, progress)
    index.save(file)
    return index, f"built (saved as {file})"


def held_out_record(record_id, line, fraction) -> bool:
    """Whether a record is in the validation share: decided by a hash of its id (of its line when it has
    none), so the split is the same on every rank, at every start and on every machine."""
    key = f"id:{record_id}" if record_id is not None else f"line:{line}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") < fraction * 2 ** 64


def held_out(index, fraction) -> np.ndarray:
    """held_out_record of every row of the index, as a boolean array."""
    return np.array([held_out_record(index.id(r), int(index.line[r]), fraction) for r in range(len(index))],
                    dtype=bool)


def open_dataset(data_path, images_dir, tokenizer, max_seq_len, index_dir=None, progress=False, **kw):
    """A VLMDataset of every usable record of a file (its index read from index_dir, or built)."""
    index, _ = load_index(data_path, tokenizer, max_seq_len, index_dir, progress=progress)
    return VLMDataset(index, images_dir, tokenizer, max_seq_len, **kw)
