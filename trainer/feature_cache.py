"""Image features are a pure function of (image file, frozen encoder): compute each once, keep it.

An entry is an fp16 (50, 768) array under its key (image_cache_key: path, size, mtime). On disk:
    {root}/{encoder fingerprint}/{writer}-{run id}-{n:05d}.npy    a shard: a plain (N, 50, 768) fp16 array
    {root}/{encoder fingerprint}/{writer}-{run id}-{n:05d}.keys   its N keys, one a line, in row order
A changed encoder has another fingerprint, a changed image another key: stale entries are never read.
put() buffers in RAM; a shard is written when the buffer reaches shard_mb, and on flush(). Unflushed entries
die with their process (they are encoded again next time). .npy, then .keys, each via a temporary name and
a rename: a shard without .keys is ignored (deleted once old). Every writer (DDP rank, eval run) writes only
its own new files, so many can fill at once; refresh() shows each the others' shards. Readers hold only the
index (all keys, sorted, searched by bisection) and memory-map shards, never unpickle. The old layout's
{key[:2]}/{key}.npy files are not read (re-encoded once; delete those folders).
"""
import hashlib
import os
import re
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import torch

ORPHAN_AGE_S = 3600  # a shard without .keys, or a temporary file, this old is from a dead writer: deleted


def image_cache_key(path: str) -> str:
    """Feature-cache key of an image file: its absolute path, size and modification time."""
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


class FeatureCache:
    """Features by key: in RAM (up to ram_budget_gb, this process only) and, when root is given, in shards
    under {root}/{fingerprint}/ (see the module docstring). root=None: RAM only.

    Callers: put() and get() as they like; flush() when a fill (or any run that put entries) is done, else the
    last < shard_mb of entries is lost at exit; refresh() to see shards that other processes flushed since
    (e.g. after a DDP barrier that follows every rank's flush()). `writer` names this process's shards
    (e.g. "rank0"); whatever it is, a random run id keeps names unique. `key in cache` and get() see RAM, the
    write buffer and indexed shards; on_disk() only indexed shards (what a DataLoader worker's copy can read).
    """

    def __init__(self, root=None, fingerprint="", ram_budget_gb: float = 4.0, shard_mb: float = 1024,
                 writer=None):
        self.dir = Path(root) / fingerprint if root else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.ram = {}
        self.ram_budget = int(ram_budget_gb * 2**30)
        self.ram_bytes = 0
        self.hits = self.misses = 0
        self.shard_bytes = int(shard_mb * 2**20)
        writer = writer or f"{socket.gethostname()}-{os.getpid()}"
        self.writer = re.sub(r"[^A-Za-z0-9_.]+", "_", str(writer))
        self.run_id = uuid.uuid4().hex[:8]
        self.n_written = 0
        self.pending = {}  # key -> fp16 tensor, put but not yet in a shard
        self.pending_bytes = 0
        # The index: sorted keys, and per key its shard (a number into self.shards) and row.
        self.shards = []  # shard file stems, in the order they were indexed
        self.index_keys = np.zeros(0, dtype="S1")
        self.index_shard = np.zeros(0, dtype=np.int32)
        self.index_row = np.zeros(0, dtype=np.int32)
        self.maps = {}  # shard number -> memory-mapped array, opened when first read
        self.refresh()

    def __getstate__(self):  # DataLoader workers get the on-disk part only (the index, not RAM or mappings)
        state = self.__dict__.copy()
        state.update(ram={}, ram_bytes=0, pending={}, pending_bytes=0, maps={})
        return state

    # -- reading ----------------------------------------------------------------------------------------------

    def _find(self, key):
        """(shard number, row) of a key in a flushed shard, or None."""
        k = key.encode()
        if len(self.index_keys) == 0 or len(k) > self.index_keys.dtype.itemsize:
            return None
        i = int(np.searchsorted(self.index_keys, k))
        if i < len(self.index_keys) and self.index_keys[i] == k:
            return int(self.index_shard[i]), int(self.index_row[i])
        return None

    def on_disk(self, key) -> bool:
        """In a flushed shard this object has indexed (what DataLoader workers can read too)."""
        return self._find(key) is not None

    def __contains__(self, key):
        return key in self.ram or key in self.pending or self.on_disk(key)

    def _shard(self, s):
        m = self.maps.get(s)
        if m is None:
            m = self.maps[s] = np.load(self.dir / f"{self.shards[s]}.npy", mmap_mode="r", allow_pickle=False)
        return m

    def get(self, key) -> torch.Tensor:
        t = self.ram.get(key)
        if t is None:
            t = self.pending.get(key)
        if t is None:
            where = self._find(key)
            if where is None:
                raise KeyError(key)
            # Memory-mapped: the bytes go from the page cache straight into this tensor, one copy.
            t = torch.from_numpy(np.array(self._shard(where[0])[where[1]]))
            self._keep(key, t)
        self.hits += 1
        return t

    # -- writing ----------------------------------------------------------------------------------------------

    def put(self, key, features: torch.Tensor):
        if "\n" in key or "\r" in key:
            raise ValueError(f"a feature-cache key cannot contain a line break: {key!r}")
        t = features.detach().to("cpu", torch.float16).contiguous()
        if self.dir is not None and key not in self.pending and not self.on_disk(key):
            if self.pending and t.shape != next(iter(self.pending.values())).shape:
                self.flush()  # a shard holds one shape
            self.pending[key] = t
            self.pending_bytes += t.numel() * 2
            if self.pending_bytes >= self.shard_bytes:
                self.flush()
        self._keep(key, t)
        self.misses += 1

    def flush(self):
        """Write the entries put since the last shard as a new shard, and index it. Nothing to do without
        pending entries or without a directory."""
        if self.dir is None or not self.pending:
            return
        keys, tensors = list(self.pending), list(self.pending.values())
        name = f"{self.writer}-{self.run_id}-{self.n_written:05d}"
        self.n_written += 1
        shape = (len(tensors), *tensors[0].shape)
        data, tmp = self.dir / f"{name}.npy", self.dir / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:  # header, then row after row: no second copy of the shard in RAM
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                     "fortran_order": False, "shape": shape})
            for t in tensors:
                f.write(t.numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
        ktmp = self.dir / f".{name}.keys.tmp"
        with open(ktmp, "w", encoding="utf-8") as f:
            f.write("".join(k + "\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())
        os.replace(ktmp, self.dir / f"{name}.keys")  # last: from now on the shard exists for every reader
        self.pending, self.pending_bytes = {}, 0
        self._add_to_index([(name, keys)])

    def refresh(self):
        """Index the shards that appeared since (flushed by other processes); delete old leftovers of killed
        writers."""
        if self.dir is None:
            return
        known, new, now = set(self.shards), [], time.time()
        for p in sorted(self.dir.iterdir()):
            name = p.name
            if name.endswith(".keys") and p.stem not in known:
                data = p.with_suffix(".npy")
                if not data.is_file():
                    continue
                keys = p.read_text(encoding="utf-8").splitlines()
                try:
                    rows = np.load(data, mmap_mode="r", allow_pickle=False).shape[0]
                except (ValueError, OSError):
                    rows = -1
                if rows == len(keys):  # else damaged from outside: not used
                    new.append((p.stem, keys))
            elif name.endswith(".tmp") or (name.endswith(".npy") and not p.with_suffix(".keys").exists()):
                try:
                    if now - p.stat().st_mtime > ORPHAN_AGE_S:
                        p.unlink()
                except FileNotFoundError:  # renamed or deleted meanwhile by its writer
                    pass
        self._add_to_index(new)

    def _add_to_index(self, shards):
        """Merge (stem, keys) shards into the sorted index; a key already indexed keeps its first place."""
        shards = [(stem, keys) for stem, keys in shards if keys]
        if not shards:
            return
        first = len(self.shards)
        self.shards += [stem for stem, _ in shards]
        keys = np.concatenate([self.index_keys] + [np.array([k.encode() for k in ks], dtype="S")
                                                   for _, ks in shards])
        shard = np.concatenate([self.index_shard] + [np.full(len(ks), first + i, np.int32)
                                                     for i, (_, ks) in enumerate(shards)])
        row = np.concatenate([self.index_row] + [np.arange(len(ks), dtype=np.int32) for _, ks in shards])
        order = np.argsort(keys, kind="stable")
        keys, shard, row = keys[order], shard[order], row[order]
        first_of_each = np.ones(len(keys), bool)
        first_of_each[1:] = keys[1:] != keys[:-1]
        self.index_keys, self.index_shard, self.index_row = keys[first_of_each], shard[first_of_each], row[first_of_each]

    def _keep(self, key, t):
        if key not in self.ram and self.ram_bytes + t.numel() * 2 <= self.ram_budget:
            self.ram[key] = t
            self.ram_bytes += t.numel() * 2
