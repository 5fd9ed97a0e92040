"""Records of a LLaVA-format dataset file and what can be wrong with them.

A record (JSON list or JSON-lines file):
    {"id": "...", "image": "a.jpg" (or ["a.jpg", "b.jpg"]),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}

Real image datasets are dirty: a crawl of 595K images has truncated JPEGs, CMYK and 16-bit files, empty and
missing files and odd records. Each kind of problem has a name (PROBLEMS) and a severity:
  error  the record cannot be trained on: training stops on it (--on_bad_sample error) or leaves it out and
         lists it (--on_bad_sample skip);
  drop   the record is always left out, with a count: its first turn alone is longer than max_seq_len (the
         image placeholder must never be cut, and a record without its answer teaches nothing);
  note   handled, nothing is lost: reported so that nobody is surprised.
Every problem names its file, the line the record starts on and its id.
"""
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from model.LMConfig import IMAGE_MARKER
from model.images import BadImage, check_image_file

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

PROBLEMS = {  # kind: (severity, what it means)
    "bad_encoding": ("error", "line is not valid UTF-8"),
    "bad_json": ("error", "malformed JSON"),
    "not_a_record": ("error", "not a JSON object"),
    "no_conversations": ("error", "missing or empty 'conversations' list"),
    "bad_turn": ("error", "a turn without 'from' (human/gpt/user/assistant/system) and a string 'value'"),
    "role_order": ("error", "turns are not user/assistant pairs (after an optional system turn)"),
    "empty_answer": ("error", "an empty assistant answer"),
    "bad_image_field": ("error", "'image' is not a file name or a list of file names"),
    "marker_missing": ("error", "an image but no '<image>' in the text"),
    "image_count": ("error", "the number of '<image>' markers and of images differ"),
    "image_missing": ("error", "image file does not exist"),
    "image_empty": ("error", "image file is empty (0 bytes)"),
    "not_an_image": ("error", "file is not an image"),
    "image_too_large": ("error", "image has more pixels than --max_image_pixels (decompression bomb guard)"),
    "image_truncated": ("error", "image file is truncated"),
    "image_damaged": ("error", "image data is damaged"),
    "bad_mask": ("error", "'mask' (where the object is, for evaluation) is not one greyscale image the size of its "
                          "image, per image"),
    "too_long": ("drop", "the first turn alone is longer than max_seq_len"),
    "truncated": ("note", "longer than max_seq_len: later turns left out whole (or the first answer cut)"),
    "wrong_extension": ("note", "file name extension does not match its format (it is read by content)"),
}

@dataclass
class Problem:
    kind: str
    file: str
    line: Optional[int]  # 1-based line where the record starts
    id: Optional[str]
    detail: str

    @property
    def severity(self) -> str:
        return PROBLEMS[self.kind][0]

    def where(self) -> str:
        at = f"{self.file}:{self.line}" if self.line else self.file
        return at + (f" (id {self.id})" if self.id is not None else "")

    def message(self) -> str:
        return f"{self.where()}: {self.detail}"

    def to_dict(self) -> dict:
        return asdict(self)


class DataError(ValueError):
    """Records that cannot be used. The message fits on a screen whatever their number: the count per kind and
    the first SHOWN records (kind, file:line, id, what is wrong); save_list writes all of them to a file and
    the message names it."""
    SHOWN = 20

    def __init__(self, problems, header="bad data"):
        self.problems, self.header, self.list_path = list(problems), header, None
        super().__init__(header)

    def save_list(self, path):
        """Every problem as a JSON line in `path`; the message then ends with where the full list is."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in self.problems),
                              encoding="utf-8")
        self.list_path = str(path)

    def __str__(self):
        if not self.problems:
            return self.header
        n = len(self.problems)
        counts = Counter(p.kind for p in self.problems)
        lines = [f"{self.header}:"]
        if n > 1:
            lines.append("  " + ", ".join(f"{k}: {c}" for k, c in counts.most_common()) + f" ({n} in all)")
        lines += [f"  [{p.kind}] {p.message()}" for p in self.problems[:self.SHOWN]]
        if n > self.SHOWN:
            lines.append(f"  ... and {n - self.SHOWN} more" +
                         (f"; all {n} are listed in {self.list_path}" if self.list_path else ""))
        elif self.list_path:
            lines.append(f"  (also listed in {self.list_path})")
        return "\n".join(lines)


class RecordError(ValueError):
    """One record's problem, raised while turning it into tokens; `kind` is a PROBLEMS key."""

    def __init__(self, kind, detail):
        super().__init__(detail)
        self.kind = kind


@dataclass
class Entry:
    """A record, the line of its file it starts on, and where its bytes are (so it can be read again alone)."""
    line: int
    record: dict
    offset: int = -1  # byte offset of the record in its file
    size: int = 0  # its length in bytes

    @property
    def id(self):
        rid = self.record.get("id") if isinstance(self.record, dict) else None
        return None if rid is None else str(rid)


def read_records(path):
    """([Entry], [Problem]) from a JSON list or a JSON-lines file (see iter_records)."""
    entries, problems = [], []
    for item in iter_records(path):
        (entries if isinstance(item, Entry) else problems).append(item)
    return entries, problems


def iter_records(path):
    """Entries and Problems, in file order, from a JSON list or a JSON-lines file. In a JSON-lines file a bad
    line is a problem and reading goes on; a JSON list that does not parse cannot be read past the error (one
    problem, no more records). Records keep their line numbers and byte positions either way."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path} does not exist")
    raw = Path(path).read_bytes()
    if raw.lstrip()[:1] == b"[":
        yield from _iter_json_list(path, raw)
        return
    offset = 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Problem("bad_encoding", path, lineno, None, f"not UTF-8 at byte {e.start} of the line")
            continue
        try:
            yield Entry(lineno, json.loads(text), start, len(line))
        except json.JSONDecodeError as e:
            yield Problem("bad_json", path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")


def _iter_json_list(path, raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Problem("bad_encoding", path, raw[:e.start].count(b"\n") + 1, None,
                      "not UTF-8; the JSON list cannot be read past this line")
        return
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0
    byte = len(text[:pos].encode("utf-8"))  # the byte offset of character `pos`

    def skip(p):  # whitespace
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def advance(p, q):  # the byte offset of q, from p's
        return len(text[p:q].encode("utf-8"))
    try:
        start = skip(pos)
        byte += advance(pos, start)
        pos = start
        while pos < len(text) and text[pos] != "]":
            line += text.count("\n", counted, pos)
            counted = pos
            rec, end = decoder.raw_decode(text, pos)
            size = advance(pos, end)
            yield Entry(line, rec, byte, size)
            byte += size
            nxt = skip(end)
            if nxt < len(text) and text[nxt] == ",":
                nxt = skip(nxt + 1)
            elif nxt < len(text) and text[nxt] != "]":
                raise json.JSONDecodeError("Expecting ',' or ']'", text, nxt)
            byte += advance(end, nxt)
            pos = nxt
        if pos >= len(text):
            raise json.JSONDecodeError("the list is not closed with ']'", text, pos)
    except json.JSONDecodeError as e:
        yield Problem("bad_json", path, e.lineno, None,
                      f"invalid JSON: {e.msg} (column {e.colno}); the list cannot be read past it")


def read_record_at(path, offset, size):
    """The record whose bytes are at (offset, size) of the file (as Entry.offset/size and RecordIndex give them)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.read(size))


def record_images(rec) -> list:
    img = rec.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


def check_record(entry: Entry, file: str):
    """Problems of one record's text and structure (no files are opened), as a list."""
    rec = entry.record

    def problem(kind, detail):
        return [Problem(kind, file, entry.line, entry.id, detail)]
    if not isinstance(rec, dict):
        return problem("not_a_record", f"a record must be a JSON object, got {type(rec).__name__}")
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        return problem("no_conversations", "needs a non-empty 'conversations' list")
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
            return problem("bad_turn", f"turn {k} needs 'from' in {sorted(ROLES)} and a string 'value', "
                                       f"got {json.dumps(t, ensure_ascii=False)[:80]}")
    roles = [ROLES[t["from"]] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or len(body) % 2 or body != expected[:len(body)]:
        return problem("role_order", f"roles {' > '.join(roles)}: expected user > assistant pairs "
                                     "(after an optional system turn), ending with an answer")
    for k, t in enumerate(turns):
        if roles[k] == "assistant" and not t["value"].strip():
            return problem("empty_answer", f"turn {k} is an empty answer")
    img = rec.get("image")
    if img is not None and not (isinstance(img, str) and img) and not (
            isinstance(img, list) and all(isinstance(p, str) and p for p in img)):
        return problem("bad_image_field", f"'image' must be a file name or a list of them, got {json.dumps(img)[:80]}")
    n_images = len(record_images(rec))
    n_markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    if n_images and not n_markers:
        return problem("marker_missing", f"{n_images} image(s) but no '{IMAGE_MARKER}' marker in the text")
    if n_markers != n_images:
        return problem("image_count", f"{n_markers} '{IMAGE_MARKER}' marker(s) but {n_images} image(s)")
    return []


# Upstream v1's instruction data names an image "000000334872.jpg" while the file in sft_images/ is
# "COCO_train2014_000000334872.jpg" (its SFTDataset adds the prefix when it opens the file). A name is looked
# up as given first, then with each of these prefixes.
UPSTREAM_IMAGE_PREFIXES = ("COCO_train2014_",)


def image_path(images_dir, name, prefix="") -> str:
    """The file of an image name, with `prefix` before its file name."""
    head, tail = os.path.split(name)
    return os.path.join(images_dir, head, prefix + tail)


def resolve_image(images_dir, name) -> tuple:
    """(path, prefix used): `name` as given if that file exists, else with the first of UPSTREAM_IMAGE_PREFIXES
    that exists, else as given ("" : the caller finds it missing)."""
    for prefix in ("",) + UPSTREAM_IMAGE_PREFIXES:
        path = image_path(images_dir, name, prefix)
        if os.path.exists(path):
            return path, prefix
    return image_path(images_dir, name), ""


def find_image(images_dir, name) -> tuple:
    """resolve_image for a file that must be there: BadImage for a missing one (naming every file tried) or an
    empty one."""
    path, prefix = resolve_image(images_dir, name)
    if not os.path.exists(path):
        raise BadImage("image_missing", missing_image_detail(path))
    check_image_file(path, f"image {path}")
    return path, prefix


def image_paths(rec, images_dir) -> list:
    return [resolve_image(images_dir, p)[0] for p in record_images(rec)]


def missing_image_detail(path) -> str:
    head, tail = os.path.split(path)
    tried = " nor ".join(image_path(head, tail, p) for p in UPSTREAM_IMAGE_PREFIXES)
    return f"image {path} does not exist (nor {tried})"


def conversation_to_messages(rec) -> list:
    """A checked record's turns as [{"role", "content"}, ...] (model/tokenizer.py renders them)."""
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in rec["conversations"]]


def file_problems(entry: Entry, file: str, images_dir) -> list:
    """Missing or empty image files of a record: what a stat can tell, without decoding."""
    try:
        for name in record_images(entry.record):
            find_image(images_dir, name)
    except BadImage as err:
        return [Problem(err.kind, file, entry.line, entry.id, str(err))]
    return []


def check_records(entries, file: str, images_dir=None, progress=False):
    """(the entries without a problem, the problems of the others): check_record on each and, given
    images_dir, file_problems too."""
    from tqdm import tqdm
    good, problems = [], []
    for e in tqdm(entries, desc="checking records", disable=not progress, unit="rec", mininterval=1):
        found = check_record(e, file) or (file_problems(e, file, images_dir) if images_dir is not None else [])
        problems += found
        if not found:
            good.append(e)
    return good, problems
