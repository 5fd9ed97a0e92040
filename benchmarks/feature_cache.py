"""Feature cache on disk: the sharded store (trainer/feature_cache.py) against the old one-.npy-per-image layout.

  python benchmarks/feature_cache.py               # 50,000 entries: ~3.8 GB written per store
  python benchmarks/feature_cache.py --n 2000      # a quick check of the machinery

Entries are synthetic fp16 (50, 768) arrays (what CLIP ViT-B/32 gives per image), keyed like image_cache_key
(sha1 hex). Both stores run in this process, one after the other, in --workdir; each store's files are deleted
once measured (so the disk holds one store at a time) and the workdir at the end, unless --keep.

  OLD  the baseline: the previous layout, re-implemented minimally below (OldPerFileStore): one .npy per entry
       under {fingerprint}/{key[:2]}/{key}.npy, written to a temporary name and renamed, read memory-mapped.
  NEW  trainer/feature_cache.FeatureCache: shards of --shard_mb plus .keys files, a sorted in-RAM index.

Measured per store (RAM part off: ram_budget_gb=0, so every get reads the store):
  fill         put() of every entry, then flush() (NEW) and os.sync(), so both are timed to durable storage
  open         constructing a fresh cache object on the filled store (NEW: reading every .keys, sorting)
  on_disk      lookups per second (what each DataLoader worker asks per image)
  get          entries per second read by a fresh object, random order and sequential (write order), twice:
               "warm": with the store in the page cache (it was just written; the machine has the RAM), and
               "evicted": after posix_fadvise(DONTNEED) on every file, which drops its clean cached pages
               without root; best effort: a virtual disk's host may still cache, so it is not a cold disk.
  files, bytes the files of the store, their sizes (apparent) and what they take on disk (allocated blocks)
  worker copy  NEW only: bytes of the pickled cache (what a DataLoader worker started by spawn receives)
Prints a table, then one JSON object as the last line (also written to --out), with the machine it ran on
(benchmarks/harness.py's record).
"""
import argparse
import hashlib
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import drop_page_cache, files_under, run_benchmark, time_call  # noqa: E402

from model.cli import HelpFormatter  # noqa: E402
from trainer.feature_cache import FeatureCache  # noqa: E402

SHAPE = (50, 768)
ENTRY_BYTES = SHAPE[0] * SHAPE[1] * 2


class OldPerFileStore:
    """BASELINE (the layout trainer/feature_cache.py had before shards): one .npy per entry, nothing else."""

    def __init__(self, root, fingerprint):
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, key):
        return self.dir / key[:2] / f"{key}.npy"

    def on_disk(self, key):
        return self._file(key).is_file()

    def put(self, key, features):
        f = self._file(key)
        f.parent.mkdir(exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, features.detach().to("cpu", torch.float16).contiguous().numpy(), allow_pickle=False)
        os.replace(tmp, f)

    def get(self, key):
        # The old code made the tensor with torch.tensor(memmap); with 2 intra-op threads on a busy 2-core
        # machine that took 4-9 ms per entry (0.3 ms with 1 thread). Measured here with the same copy as NEW,
        # so the table compares the layouts, not that call.
        return torch.from_numpy(np.array(np.load(self._file(key), mmap_mode="r", allow_pickle=False)))

    def flush(self):
        pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="entries per store (76,800 bytes each)")
    p.add_argument("--workdir", help="where the stores are written (default: a new temporary directory, deleted "
                                     "at the end)")
    p.add_argument("--shard_mb", type=float, default=1024, help="NEW store: shard size in MB")
    p.add_argument("--read_n", type=int, default=0, help="entries per timed read pass (0: all --n)")
    p.add_argument("--keep", action="store_true", help="keep the stores and the workdir")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic features and of the random order")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def fill(cache, keys, pool):
    """put() every key, then flush() and sync: timed to durable storage."""
    for i, k in enumerate(keys):
        cache.put(k, torch.from_numpy(pool[i % len(pool)].copy()))  # a fresh tensor per entry, as the encoder gives
    cache.flush()
    os.sync()


def read_all(cache, keys):
    total = 0.0
    for k in keys:
        total += float(cache.get(k)[0, 0])  # touch the entry: a lazy read must be done
    return total


def read_rate(make, keys):
    cache = make()  # a fresh object: nothing of the fill is in its RAM
    return len(keys) / time_call(read_all, cache, keys)[1]


def measure_store(name, make, keys, pool, read_keys, random_keys):
    res = {"fill_entries_per_s": len(keys) / time_call(fill, make(), keys, pool)[1]}
    cache, res["open_s"] = time_call(make)
    probe = random_keys[:min(len(random_keys), 20_000)]
    found, seconds = time_call(lambda: all(cache.on_disk(k) for k in probe))
    assert found
    res["on_disk_per_s"] = len(probe) / seconds
    if isinstance(cache, FeatureCache):
        res["worker_copy_bytes"] = len(pickle.dumps(cache))
        res["index_bytes"] = cache.index_keys.nbytes + cache.index_shard.nbytes + cache.index_row.nbytes
    del cache
    res["files"], res["bytes"], res["allocated_bytes"] = files_under(make().dir)
    for cond in ("warm", "evicted"):
        for order, ks in (("random", random_keys), ("sequential", read_keys)):
            if cond == "evicted":
                drop_page_cache(make().dir)
            res[f"get_{order}_{cond}_per_s"] = read_rate(make, ks)
    print(f"  {name}: done", file=sys.stderr)
    return res


def measure(args) -> dict:
    """Both stores, one after the other, in --workdir (each deleted once measured unless --keep)."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-feature-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    need = args.n * ENTRY_BYTES * 1.05 + 2**28
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed for --n {args.n} "
                         "(one store on disk at a time); pass a smaller --n or another --workdir")
    g = np.random.default_rng(args.seed)
    pool = [g.standard_normal(SHAPE, dtype=np.float32).astype(np.float16) for _ in range(64)]
    keys = [hashlib.sha1(f"image{i}".encode()).hexdigest() for i in range(args.n)]
    read_n = args.read_n or args.n
    rng = np.random.default_rng(args.seed)
    random_keys = [keys[i] for i in rng.permutation(args.n)[:read_n]]
    read_keys = keys[:read_n]
    print(f"{args.n} entries of {ENTRY_BYTES} bytes ({args.n * ENTRY_BYTES / 2**30:.2f} GiB) per store in {work}",
          file=sys.stderr)
    res = {"n": args.n, "entry_bytes": ENTRY_BYTES, "shard_mb": args.shard_mb, "workdir": str(work)}
    try:
        stores = {"old": lambda: OldPerFileStore(work / "old", "enc"),
                  "new": lambda: FeatureCache(work / "new", "enc", ram_budget_gb=0, shard_mb=args.shard_mb,
                                              writer="bench")}
        for name, make in stores.items():
            res[name] = measure_store(name, make, keys, pool, read_keys, random_keys)
            if not args.keep:
                shutil.rmtree(work / name)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return res


def table(res) -> str:
    rows = [("fill (put + flush + sync), entries/s", "fill_entries_per_s", "{:,.0f}"),
            ("open a fresh cache, s", "open_s", "{:.3f}"),
            ("on_disk lookups/s", "on_disk_per_s", "{:,.0f}"),
            ("get random, warm page cache, entries/s", "get_random_warm_per_s", "{:,.0f}"),
            ("get sequential, warm page cache, entries/s", "get_sequential_warm_per_s", "{:,.0f}"),
            ("get random, pages evicted, entries/s", "get_random_evicted_per_s", "{:,.0f}"),
            ("get sequential, pages evicted, entries/s", "get_sequential_evicted_per_s", "{:,.0f}"),
            ("files", "files", "{:,}"),
            ("bytes (apparent)", "bytes", "{:,}"),
            ("bytes (allocated on disk)", "allocated_bytes", "{:,}"),
            ("worker copy (pickled), bytes", "worker_copy_bytes", "{:,}"),
            ("index in RAM, bytes", "index_bytes", "{:,}")]
    lines = [f"feature cache, {res['n']:,} fp16 (50, 768) entries; NEW shards of {res['shard_mb']:g} MB",
             f"{'':<44}{'OLD (baseline)':>16}{'NEW (shards)':>16}"]
    for label, k, fmt in rows:
        cells = [fmt.format(res[s][k]) if k in res[s] else "-" for s in ("old", "new")]
        lines.append(f"{label:<44}{cells[0]:>16}{cells[1]:>16}")
    return "\n".join(lines)


def main(argv=None):
    return run_benchmark(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
