"""What is wrong with a dataset, found before training on it, with the file and line of every bad record.

Real image datasets are dirty: a crawl of 595K images has truncated JPEGs, CMYK and 16-bit files, empty and
missing files and odd records. Each kind of problem has a name (PROBLEMS) and a severity:
  error  the record cannot be trained on: training stops on it (--on_bad_sample error) or leaves it out and
         lists it (--on_bad_sample skip);
  drop   the record is always left out, with a count: its first turn alone is longer than max_seq_len (the
         image placeholder must never be cut, and a record without its answer teaches nothing);
  note   handled, nothing is lost: reported so that nobody is surprised.

    python check_data.py --data_path dataset/pretrain_data.jsonl --images_dir dataset/pretrain_images
    python 1-pretrain_vlm.py --check_data            # the same, on the stage's own data and flags

exits 1 when a record has an error or would be dropped, 0 otherwise. The quick scan reads every record, opens
every image's header (format, size, mode; the pixel limit) and looks for a truncated JPEG/PNG at its end;
`full` decodes every image as training will.
"""
import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from model.LMConfig import IMAGE_MARKER

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
EXTENSIONS = {"JPEG": (".jpg", ".jpeg", ".jfif"), "PNG": (".png",), "GIF": (".gif",), "BMP": (".bmp",),
              "WEBP": (".webp",), "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg")}


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


def inspect_image(path, max_pixels, decode=False):
    """(kind, detail) problems of one image file. Quick: the header (format, size; the pixel limit) and, for
    JPEG and PNG, the end-of-image marker at the end of the file; an image without it is decoded to tell a
    truncated file from trailing bytes. decode=True decodes every image, as training does."""
    from model.vision import BadImage, open_image_header, read_image
    found = []
    try:
        with open_image_header(path, f"image {path}", max_pixels) as im:
            fmt = im.format
        ext = os.path.splitext(path)[1].lower()
        if fmt in EXTENSIONS and ext not in EXTENSIONS[fmt]:
            found.append(("wrong_extension", f"image {path} is a {fmt} file named {ext or 'without extension'}"))
        if decode or not _has_end_marker(path, fmt):
            read_image(path, f"image {path}", max_pixels)
    except BadImage as e:
        found.append((e.kind, str(e)))
    return found


def _has_end_marker(path, fmt) -> bool:
    if fmt not in ("JPEG", "PNG", "MPO"):
        return False  # other formats are decoded
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64))
        tail = f.read()
    return (b"\xff\xd9" in tail) if fmt in ("JPEG", "MPO") else (b"IEND" in tail)


def _inspect(job):
    return job[0], inspect_image(*job)


@dataclass
class Report:
    data_path: str
    n_records: int
    problems: list  # [Problem]
    n_images: int = 0
    decoded: bool = False

    def count(self, severity) -> int:
        """Records with at least one problem of this severity."""
        return len({(p.line, p.file) for p in self.problems if p.severity == severity})

    @property
    def ok(self) -> bool:
        return not any(p.severity in ("error", "drop") for p in self.problems)

    def text(self, show=3) -> str:
        lines = [f"{self.data_path}: {self.n_records} records, {self.n_images} images"
                 f" ({'every image decoded' if self.decoded else 'image headers and ends checked'})"]
        by_kind = Counter(p.kind for p in self.problems)
        for severity, title in (("error", "errors (training stops on them, or skips them with --on_bad_sample skip)"),
                                ("drop", "dropped (always left out of training, with a count)"),
                                ("note", "notes (handled; nothing is lost)")):
            kinds = [k for k, (s, _) in PROBLEMS.items() if s == severity and by_kind[k]]
            if not kinds:
                continue
            lines.append(f"{title}:")
            for k in kinds:
                lines.append(f"  {k:<17} {by_kind[k]:>7}  {PROBLEMS[k][1]}")
                for p in [p for p in self.problems if p.kind == k][:show]:
                    lines.append(f"      {p.message()}")
        n_err, n_drop = self.count("error"), self.count("drop")
        lines.append("OK: nothing to fix" if self.ok else
                     f"FAILED: {n_err} record(s) with errors, {n_drop} record(s) to be dropped")
        return "\n".join(lines)


def scan(data_path, images_dir, tokenizer, max_seq_len, max_image_pixels=None, decode=False, num_workers=0,
         progress=True) -> Report:
    """Every problem of a dataset: records, images (each unique file once), token lengths."""
    from tqdm import tqdm
    from .data import measure_entries
    from model.vision import MAX_IMAGE_PIXELS
    max_image_pixels = max_image_pixels or MAX_IMAGE_PIXELS
    entries, problems = read_records(data_path)
    good = []
    for e in tqdm(entries, desc="checking records", disable=not progress, unit="rec", mininterval=1):
        found = check_record(e, data_path)
        problems += found
        if not found:
            good.append(e)
    users = {}  # image path -> the records that use it
    for e in good:
        for p in image_paths(e.record, images_dir):
            users.setdefault(p, []).append(e)
    jobs = [(p, max_image_pixels, decode) for p in users]
    if num_workers > 0 and len(jobs) > 64:
        from multiprocessing import get_context
        with get_context("spawn").Pool(num_workers) as pool:
            results = list(tqdm(pool.imap(_inspect, jobs, chunksize=32), total=len(jobs), desc="checking images",
                                disable=not progress, unit="img"))
    else:
        results = [_inspect(j) for j in tqdm(jobs, desc="checking images", disable=not progress, unit="img")]
    bad_image = set()
    for path, found in results:
        for kind, detail in found:
            for e in users[path]:
                problems.append(Problem(kind, data_path, e.line, e.id, detail))
                if PROBLEMS[kind][0] == "error":
                    bad_image.add(id(e))
    good = [e for e in good if id(e) not in bad_image]
    problems += measure_entries(tokenizer, good, data_path, max_seq_len, progress)[2]
    problems.sort(key=lambda p: (p.line or 0))
    return Report(data_path, len(entries) + sum(p.kind in ("bad_json", "bad_encoding") for p in problems),
                  problems, len(users), decode)


def add_check_args(parser):
    """Flags the standalone check shares with the training scripts."""
    from model.vision import MAX_IMAGE_PIXELS
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="images with more pixels (width x height) are refused: a guard against decompression bombs")


def run_check(args, full: bool, progress=True) -> int:
    """Scan, print the report, write all problems as JSON lines to args.report if given; the exit code."""
    from .data import load_tokenizer
    report = scan(args.data_path, args.images_dir, load_tokenizer(args.tokenizer), args.max_seq_len,
                  args.max_image_pixels, decode=full, num_workers=args.num_workers, progress=progress)
    print(report.text(getattr(args, "show", 3)))
    if getattr(args, "report", None):
        Path(args.report).write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n"
                                             for p in report.problems), encoding="utf-8")
        print(f"all {len(report.problems)} problems: {args.report}")
    return 0 if report.ok else 1


def main(argv=None):
    from .data import DEFAULT_TOKENIZER
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    a = p.add_argument
    a("--data_path", required=True, help="LLaVA-format .json list or .jsonl")
    a("--images_dir", default=".", help="directory the records' image paths are relative to")
    a("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer for the length check")
    a("--max_seq_len", type=int, default=640, help="training sequence length")
    a("--full", action="store_true", help="decode every image (slower), not only headers and file ends")
    a("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
      help="processes checking images (min(8, CPU count))")
    a("--show", type=int, default=3, help="examples printed per kind of problem")
    a("--report", default=None, help="write every problem as a JSON line here")
    add_check_args(p)
    args = p.parse_args(argv)
    try:
        return run_check(args, args.full)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
