"""The sharded feature cache (trainer/feature_cache.py).

put/get are bit-exact fp16 through a flush and a fresh instance, and get works before the flush; shards
rotate at shard_mb (few files); a fill killed by SIGKILL keeps every completed shard and a resumed fill
encodes only the rest, ending with the features of an uninterrupted fill; two writer processes (rank0,
rank1) fill halves at once and after refresh() each sees every key; a shard without its key file is ignored,
and deleted once old; another fingerprint is another directory; the copy a DataLoader worker gets (pickled)
has the on-disk index but no RAM entries, and is small.
"""
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import torch

from tests.conftest import ROOT
from trainer.feature_cache import ORPHAN_AGE_S, FeatureCache

ENTRY_MB = 50 * 768 * 2 / 2**20  # one fp16 (50, 768) entry
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def features(i):
    """What the 'encoder' gives image i: fixed by i, like a frozen encoder's output for a fixed file."""
    return torch.randn(50, 768, generator=torch.Generator().manual_seed(i))


def key(i):
    return f"{i:040x}"


def shard_files(cache):
    return sorted(p.name for p in cache.dir.iterdir())


# One writer process: puts keys[rank::world] in shards of 4 entries; optionally killed (SIGKILL) right after
# put number `kill_after`; else flushes, waits for every rank's flush (a file barrier) and refreshes.
WRITER = """
import os, sys, time, torch
from trainer.feature_cache import FeatureCache
ENTRY_MB = 50 * 768 * 2 / 2**20
features = lambda i: torch.randn(50, 768, generator=torch.Generator().manual_seed(i))  # as in the test file
key = lambda i: f"{i:040x}"
root, rank, world, n, kill_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cache = FeatureCache(root, "enc", shard_mb=4 * ENTRY_MB, writer=f"rank{rank}")
for j, i in enumerate(range(rank, n, world)):
    cache.put(key(i), features(i))
    if j + 1 == kill_after:
        os.kill(os.getpid(), 9)
cache.flush()
open(os.path.join(root, f"done{rank}"), "w").close()
t = time.time()
while not all(os.path.exists(os.path.join(root, f"done{r}")) for r in range(world)):
    assert time.time() - t < 60
    time.sleep(0.05)
cache.refresh()
assert all(cache.on_disk(key(i)) for i in range(n)), "a rank does not see every key after refresh"
assert all(torch.equal(cache.get(key(i)), features(i).half()) for i in range(n))
print("ok", len(cache.shards))
"""


def writer(root, rank, world, n, kill_after=0):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(rank), str(world), str(n),
                             str(kill_after)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_round_trip_is_bit_exact_and_get_works_before_flush(tmp_path):
    cache = FeatureCache(tmp_path, "enc", ram_budget_gb=0)  # no RAM part: every read is from buffer or disk
    for i in range(5):
        cache.put(key(i), features(i))
    assert key(0) in cache and not cache.on_disk(key(0))  # only in the write buffer
    assert torch.equal(cache.get(key(0)), features(0).half())
    assert shard_files(cache) == []  # nothing written below shard_mb
    assert key(0) not in FeatureCache(tmp_path, "enc")  # not visible to others before flush
    cache.flush()
    assert cache.on_disk(key(0)) and len(shard_files(cache)) == 2
    fresh = FeatureCache(tmp_path, "enc")  # another run, or another DDP rank
    for i in range(5):
        got = fresh.get(key(i))
        assert got.dtype == torch.float16 and got.shape == (50, 768)
        assert torch.equal(got, features(i).half())
    assert fresh.hits == 5 and "missing" not in fresh
    cache.flush()  # nothing pending: no empty shard
    assert len(shard_files(cache)) == 2


def test_shards_rotate_at_shard_mb(tmp_path):
    cache = FeatureCache(tmp_path, "enc", shard_mb=3 * ENTRY_MB, writer="rank0")
    for i in range(10):
        cache.put(key(i), features(i))
    assert len(cache.shards) == 3 and len(cache.pending) == 1  # written as they filled up
    cache.flush()
    files = shard_files(cache)
    assert len(files) == 8 and all(f.startswith("rank0-") for f in files)  # 4 shards x (.npy, .keys)
    rows = [np.load(cache.dir / f, mmap_mode="r").shape for f in files if f.endswith(".npy")]
    assert rows == [(3, 50, 768)] * 3 + [(1, 50, 768)]
    keys = [l for f in files if f.endswith(".keys") for l in (cache.dir / f).read_text().splitlines()]
    assert keys == [key(i) for i in range(10)]
    cache.put(key(3), features(3))  # already on disk: not written again
    cache.flush()
    assert len(shard_files(cache)) == 8


def test_killed_fill_keeps_completed_shards_and_resumes(tmp_path):
    n = 20
    p = writer(tmp_path, 0, 1, n, kill_after=11)  # shards of 4: 2 complete, 3 entries in the buffer die
    out, err = p.communicate(timeout=120)
    assert p.returncode == -9, err
    cache = FeatureCache(tmp_path, "enc", shard_mb=4 * ENTRY_MB, writer="rank0")
    assert [cache.on_disk(key(i)) for i in range(n)] == [True] * 8 + [False] * 12
    assert len(shard_files(cache)) == 4
    encoded = []
    for i in range(n):  # the fill of trainer/train.py: encode what is not on disk yet
        if not cache.on_disk(key(i)):
            encoded.append(i)
            cache.put(key(i), features(i))
    cache.flush()
    assert encoded == list(range(8, n))
    resumed = FeatureCache(tmp_path, "enc", ram_budget_gb=0)
    reference = FeatureCache(tmp_path / "ref", "enc", ram_budget_gb=0)  # an uninterrupted fill
    for i in range(n):
        reference.put(key(i), features(i))
    reference.flush()
    reference = FeatureCache(tmp_path / "ref", "enc", ram_budget_gb=0)
    for i in range(n):
        assert torch.equal(resumed.get(key(i)), reference.get(key(i)))
        assert torch.equal(resumed.get(key(i)), features(i).half())


def test_two_writers_fill_halves_at_once_and_see_all_after_refresh(tmp_path):
    n = 24
    before = FeatureCache(tmp_path, "enc")  # made before the writers ran: refresh() shows their shards
    procs = [writer(tmp_path, r, 2, n) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.startswith("ok"), err
    assert not before.on_disk(key(0))
    before.refresh()
    assert all(before.on_disk(key(i)) for i in range(n))
    assert all(torch.equal(before.get(key(i)), features(i).half()) for i in range(n))
    names = [f for f in shard_files(before) if f.endswith(".npy")]
    assert len(names) == 6 and {f.split("-")[0] for f in names} == {"rank0", "rank1"}


def test_shard_without_key_file_is_ignored_then_cleaned(tmp_path):
    cache = FeatureCache(tmp_path, "enc", writer="rank0")
    cache.put(key(0), features(0))
    cache.flush()
    cache.put(key(1), features(1))
    cache.flush()
    orphan = cache.dir / f"{cache.shards[1]}.keys"
    orphan.unlink()  # as if killed between writing the shard and its key file
    (cache.dir / ".rank0-dead-00000.npy.tmp").write_bytes(b"half a shard")  # killed while writing
    fresh = FeatureCache(tmp_path, "enc")
    assert fresh.on_disk(key(0)) and not fresh.on_disk(key(1)) and len(fresh.shards) == 1
    assert len(shard_files(fresh)) == 4  # young leftovers stay: their writer may still be at work
    old = time.time() - ORPHAN_AGE_S - 10
    for f in fresh.dir.iterdir():
        os.utime(f, (old, old))
    fresh.refresh()
    assert shard_files(fresh) == sorted(f"{cache.shards[0]}{s}" for s in (".keys", ".npy"))


def test_other_fingerprint_is_another_directory(tmp_path):
    a = FeatureCache(tmp_path, "enc1")
    a.put(key(0), features(0))
    a.flush()
    b = FeatureCache(tmp_path, "enc2")
    assert b.dir != a.dir and b.dir.parent == a.dir.parent == tmp_path
    assert key(0) not in b and shard_files(b) == []


def test_ram_only(tmp_path):
    cache = FeatureCache(None, "enc")
    cache.put(key(0), features(0))
    cache.flush()
    cache.refresh()
    assert cache.dir is None and key(0) in cache and not cache.on_disk(key(0))
    assert torch.equal(cache.get(key(0)), features(0).half())


def test_worker_copy_has_the_index_only_and_is_small(tmp_path):
    n = 10_000
    cache = FeatureCache(tmp_path, "enc")
    small = torch.arange(6, dtype=torch.float16).reshape(2, 3)  # small entries: the index is what is measured
    for i in range(n):
        cache.put(key(i), small + i)
    cache.flush()
    cache.put("pending", small)
    assert cache.ram_bytes > 0 and cache.get(key(7)) is not None
    blob = pickle.dumps(cache)
    assert len(blob) < 1_000_000, len(blob)  # 10K keys; a 595K-key index is ~29 MB, shared by fork
    worker = pickle.loads(blob)
    assert worker.ram == {} and worker.pending == {} and worker.maps == {}
    assert worker.on_disk(key(0)) and worker.on_disk(key(n - 1)) and "pending" not in worker
    assert torch.equal(worker.get(key(1234)), small + 1234)
    with open(tmp_path / "copy.pkl", "wb") as f:  # and a second pickling (a worker of a worker) still works
        pickle.dump(worker, f)
