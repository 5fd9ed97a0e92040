"""--on_bad_sample: what training does with a record or image that cannot be used, on every rank alike.

  error  stop: before training, with every bad record named; in the loop, every rank stops at the same step
         after rank 0 saved a checkpoint to --resume from.
  skip   leave it out and list it in {name}_skipped.jsonl next to the checkpoint (kind, file, line, id,
         detail, the phase that found it, step, epoch, rank). A rank whose micro-batch was all bad trains on a
         filler row, so DDP's ranks stay in step.
Records too long to train on are always left out, and listed too.
"""
import json
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from .records import DataError, Problem


class BadSamples:
    """--on_bad_sample: a bad record stops the run (error) or is left out and listed (skip), in
    {name}_skipped.jsonl next to the checkpoint, one JSON line per record: kind, file, line, id, detail, the
    phase that found it and the step. Records too long to train on are always left out, and listed too."""

    def __init__(self, mode, path, master):
        self.mode, self.path, self.master, self.count = mode, Path(path), master, 0
        self.pending = []  # lines found before start(): the file is rewritten then

    def start(self, resumed_step=None):
        """Begin the list: a resumed run keeps what the steps it does not redo skipped (the rest is found again)."""
        lines, self.pending = self.pending, None
        if self.master:
            old = self.path.read_text().splitlines() if resumed_step is not None and self.path.is_file() else []
            kept = [r for r in old if json.loads(r)["phase"] == "training" and json.loads(r)["step"] < resumed_step]
            self.path.unlink(missing_ok=True)
            self._write(kept + lines)

    def _write(self, lines):
        if self.pending is not None:
            self.pending += lines
        elif lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # one append per line: ranks may share the file
                for line in lines:
                    f.write(line + "\n")

    def _lines(self, problems, phase, step, epoch=None, rank=0):
        return [json.dumps({**p.to_dict(), "phase": phase, "step": step, "epoch": epoch, "rank": rank},
                           ensure_ascii=False) for p in problems]

    def report_reading(self, dataset, phase="reading the dataset"):
        """The problems found reading a dataset: the same on every rank."""
        dropped = [p for p in dataset.problems if p.severity == "drop"]
        notes = [p for p in dataset.problems if p.severity == "note"]
        if self.master:
            self._write(self._lines(dropped, phase, 0))
            if dropped:
                print(f"left out {len(dropped)} record(s) whose first turn is longer than --max_seq_len "
                      f"{dataset.max_seq_len} (e.g. {dropped[0].where()}); listed in {self.path}")
            if notes:
                print(f"{len(notes)} record(s) longer than --max_seq_len: their later turns are left out whole")
        self.found([p for p in dataset.problems if p.severity == "error"], phase, 0)

    def found(self, problems, phase, step):
        """Problems every rank knows about, found before training."""
        if not problems:
            return
        if self.mode == "error":
            problems = sorted(problems, key=lambda p: p.line or 0)
            raise DataError(problems, f"{len(problems)} bad record(s) found {phase}; stopped before training. "
                                      "Fix them (python check_data.py lists every problem) or leave them out with "
                                      "--on_bad_sample skip")
        if self.master:
            self._write(self._lines(problems, phase, step))
            kinds = ", ".join(f"{k} {n}" for k, n in Counter(p.kind for p in problems).items())
            print(f"skipping {len(problems)} bad record(s) found {phase} ({kinds}); listed in {self.path}")

    def leave_out_bad_images(self, dataset, bad_images):
        """The records that use an image found bad while filling the feature cache ({path: (kind, message)},
        the same on every rank): stop on them, or leave them out of the dataset."""
        if not bad_images:
            return
        found, keep = [], []
        for i in range(len(dataset)):
            errors = [bad_images[p] for p in dataset.image_paths(i) if p in bad_images]
            if errors:
                found.append(dataset.problem(i, *errors[0]))
            else:
                keep.append(i)
        self.found(found, "decoding images", step=0)
        dataset.keep(keep)

    def skipped(self, problems, step, epoch, rank):
        """Bad samples one rank met in a batch (skip mode): written at once, so a crash loses none."""
        self.count += len(problems)
        self._write(self._lines(problems, "training", step, epoch, rank))

    @staticmethod
    def agree(problems, ddp, group):
        """Every rank's problems in this micro-batch, on every rank; [] (the usual case) costs one small
        all-reduce under DDP and nothing otherwise."""
        if not ddp:
            return list(problems)
        n = torch.tensor([len(problems)])
        dist.all_reduce(n, group=group)
        if not n.item():
            return []
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [p.to_dict() for p in problems], group=group)
        return [Problem(**d) for part in gathered for d in part]

    def summary(self, ddp, group):
        n = torch.tensor([self.count])
        if ddp:
            dist.all_reduce(n, group=group)  # a CPU tensor: the gloo group under nccl too
        if self.master and n.item():
            print(f"skipped {n.item()} bad sample(s) during training (--on_bad_sample skip); listed in {self.path}")


def filler_row(cfg, device):
    """(input_ids, labels, image features) of a row that trains on nothing: the image placeholder with zero
    features and no labels. Its loss and gradients are 0, yet every parameter takes part (DDP needs that)."""
    ids = torch.tensor([cfg.image_ids], device=device)
    return ids, torch.full_like(ids, -100), [torch.zeros(1, len(cfg.image_ids), cfg.vision_dim, device=device)]
