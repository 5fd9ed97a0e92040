"""Image features are a pure function of (image file, frozen encoder): compute each once, keep it.

Entries are fp16 (50, 768) arrays, kept in RAM up to a budget and, when a directory is given, on disk as
`{root}/{encoder fingerprint}/{key[:2]}/{key}.npy` (written atomically; read memory-mapped, without
pickle), so later epochs, later runs, the SFT stage after pretraining and DDP ranks all share them. A
changed encoder (weights or preprocessing) has another fingerprint; a changed image file has another key
(path, size, mtime): stale entries are never read.
"""
import hashlib
import os
from pathlib import Path

import numpy as np
import torch


def image_cache_key(path: str) -> str:
    """Feature-cache key of an image file: its absolute path, size and modification time."""
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()


class FeatureCache:
    def __init__(self, root=None, fingerprint="", ram_budget_gb: float = 4.0):
        self.dir = Path(root) / fingerprint if root else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.ram = {}
        self.ram_budget = int(ram_budget_gb * 2**30)
        self.ram_bytes = 0
        self.hits = self.misses = 0

    def __getstate__(self):  # DataLoader workers get the on-disk part only
        state = self.__dict__.copy()
        state["ram"], state["ram_bytes"] = {}, 0
        return state

    def _file(self, key):
        return self.dir / key[:2] / f"{key}.npy"

    def on_disk(self, key) -> bool:
        return self.dir is not None and self._file(key).is_file()

    def __contains__(self, key):
        return key in self.ram or self.on_disk(key)

    def get(self, key) -> torch.Tensor:
        t = self.ram.get(key)
        if t is None:
            # Memory-mapped: the bytes go from the page cache straight into this tensor, one copy.
            t = torch.tensor(np.load(self._file(key), mmap_mode="r", allow_pickle=False))
            self._keep(key, t)
        self.hits += 1
        return t

    def put(self, key, features: torch.Tensor):
        t = features.detach().to("cpu", torch.float16).contiguous()
        if self.dir is not None:
            f = self._file(key)
            f.parent.mkdir(exist_ok=True)
            tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, t.numpy(), allow_pickle=False)
            os.replace(tmp, f)  # atomic: a reader never sees half a file, two ranks writing the same key is fine
        self._keep(key, t)
        self.misses += 1

    def _keep(self, key, t):
        if key not in self.ram and self.ram_bytes + t.numel() * 2 <= self.ram_budget:
            self.ram[key] = t
            self.ram_bytes += t.numel() * 2
