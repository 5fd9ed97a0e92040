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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from model.LMConfig import IMAGE_MARKER
from model.vision import BadImage, check_image_file

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
    """Records that cannot be used. The message lists them (kind, file:line, id, what is wrong)."""

    def __init__(self, problems, header="bad data"):
        self.problems = list(problems)
        lines = [f"  [{p.kind}] {p.message()}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more")
        super().__init__("\n".join([header + (":" if lines else "")] + lines))


class RecordError(ValueError):
    """One record's problem, raised while turning it into tokens; `kind` is a PROBLEMS key."""

    def __init__(self, kind, detail):
        super().__init__(detail)
        self.kind = kind


@dataclass
class Entry:
    """A record and the line of its file it starts on."""
    line: int
    record: dict

    @property
    def id(self):
        rid = self.record.get("id") if isinstance(self.record, dict) else None
        return None if rid is None else str(rid)


def read_records(path):
    """([Entry], [Problem]) from a JSON list or a JSON-lines file. In a JSON-lines file a bad line is a problem
    and reading goes on; a JSON list that does not parse cannot be read past the error (one problem, no
    records). Records keep their line numbers either way."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path} does not exist")
    raw = Path(path).read_bytes()
    if raw.lstrip()[:1] == b"[":
        return _read_json_list(path, raw)
    entries, problems = [], []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem("bad_encoding", path, lineno, None, f"not UTF-8 at byte {e.start} of the line"))
            continue
        try:
            entries.append(Entry(lineno, json.loads(text)))
        except json.JSONDecodeError as e:
            problems.append(Problem("bad_json", path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})"))
    return entries, problems


def _read_json_list(path, raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [Problem("bad_encoding", path, raw[:e.start].count(b"\n") + 1, None,
                            "not UTF-8; the JSON list cannot be read past this line")]
    decoder, entries = json.JSONDecoder(), []
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip(p):  # whitespace and one comma
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p
    try:
        pos = skip(pos)
        while pos < len(text) and text[pos] != "]":
            line += text.count("\n", counted, pos)
            counted = pos
            rec, pos = decoder.raw_decode(text, pos)
            entries.append(Entry(line, rec))
            pos = skip(pos)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
            elif pos < len(text) and text[pos] != "]":
                raise json.JSONDecodeError("Expecting ',' or ']'", text, pos)
        if pos >= len(text):
            raise json.JSONDecodeError("the list is not closed with ']'", text, pos)
    except json.JSONDecodeError as e:
        return entries, [Problem("bad_json", path, e.lineno, None,
                                 f"invalid JSON: {e.msg} (column {e.colno}); the list cannot be read past it")]
    return entries, []


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


def image_paths(rec, images_dir) -> list:
    return [os.path.join(images_dir, p) for p in record_images(rec)]


def conversation_to_messages(rec) -> list:
    """A checked record's turns as [{"role", "content"}, ...] (model/tokenizer.py renders them)."""
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in rec["conversations"]]


def file_problems(entry: Entry, file: str, images_dir) -> list:
    """Missing or empty image files of a record: what a stat can tell, without decoding."""
    try:
        for p in image_paths(entry.record, images_dir):
            check_image_file(p, f"image {p}")
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
