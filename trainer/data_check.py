"""Every problem of a dataset and its images, found before training on it (the kinds: trainer/records.py).

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
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from model.cli import HelpFormatter, add_max_image_pixels
from model.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from model.images import MAX_IMAGE_PIXELS, BadImage, open_image_header, read_image

from .data import measure_entries
from .records import PROBLEMS, Problem, check_records, image_paths, missing_image_detail, read_records

EXTENSIONS = {"JPEG": (".jpg", ".jpeg", ".jfif"), "PNG": (".png",), "GIF": (".gif",), "BMP": (".bmp",),
              "WEBP": (".webp",), "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg")}

def inspect_image(path, max_pixels, decode=False):
    """(kind, detail) problems of one image file. Quick: the header (format, size; the pixel limit) and, for
    JPEG and PNG, the end-of-image marker at the end of the file; an image without it is decoded to tell a
    truncated file from trailing bytes. decode=True decodes every image, as training does."""
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
    max_image_pixels = max_image_pixels or MAX_IMAGE_PIXELS
    entries, problems = read_records(data_path)
    good, found = check_records(entries, data_path, progress=progress)
    problems += found
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
            detail = missing_image_detail(path) if kind == "image_missing" else detail
            for e in users[path]:
                problems.append(Problem(kind, data_path, e.line, e.id, detail))
                if PROBLEMS[kind][0] == "error":
                    bad_image.add(id(e))
    good = [e for e in good if id(e) not in bad_image]
    problems += measure_entries(tokenizer, good, data_path, max_seq_len, progress)[2]
    problems.sort(key=lambda p: (p.line or 0))
    return Report(data_path, len(entries) + sum(p.kind in ("bad_json", "bad_encoding") for p in problems),
                  problems, len(users), decode)


def run_check(args, full: bool, progress=True) -> int:
    """Scan, print the report, write all problems as JSON lines to args.report if given; the exit code."""
    report = scan(args.data_path, args.images_dir, load_tokenizer(args.tokenizer), args.max_seq_len,
                  args.max_image_pixels, decode=full, num_workers=args.num_workers, progress=progress)
    print(report.text(getattr(args, "show", 3)))
    if getattr(args, "report", None):
        Path(args.report).write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n"
                                             for p in report.problems), encoding="utf-8")
        print(f"all {len(report.problems)} problems: {args.report}")
    return 0 if report.ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    add_max_image_pixels(p)
    args = p.parse_args(argv)
    try:
        return run_check(args, args.full)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
