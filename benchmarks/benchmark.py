"""Measure MiniMind-V's training and decoding speed against a naive baseline and against the hardware.

  python scripts/benchmark.py                  # the 27M config (512x8); about 25 minutes on 2 CPU cores
  python scripts/benchmark.py --quick          # a tiny config, about a minute: checks the machinery, not speed

Sections: training (below), the model's own decoding loop, then the inference engine as users run it --
scripts/benchmark_decode.py (one stream through ChatEngine vs upstream v1's decoding loop, side by side) and
scripts/benchmark_serving.py (N = 1, 2, 4, 8 concurrent streaming clients of the API; peak memory of
3-eval_chat.py and web_server.py). Each can also be run alone; --train_only skips all decoding sections.

Prints a table, then one JSON object as the last line (also written to --out).

What is compared, on the same data, config and machine:
  ours   what the training scripts do: frozen-encoder features read from the feature cache (cold: encoded in
         batches as the step needs them; warm: read back from disk), batches grouped by length and padded to
         their own longest sample, one masked assignment for the image splice, the output head run only at
         labelled positions, fused AdamW. Decoding: preallocated KV cache, incremental detokenization.
  naive  the upstream v1 algorithm: every step decodes its images from disk and encodes them in fp32, one at
         a time; every sample is cut and padded to upstream's max_seq_len of 200 tokens (ours trains on up to
         640, leaving out whole later turns); the placeholder is found by a Python scan and
         replaced by concatenation, row by row; full logits; AdamW with its default (per-parameter) loop.
         Decoding: a KV cache grown by torch.cat, ids grown by torch.cat, and every streamed piece made by
         decoding the whole answer so far.
Each training mode runs in a fresh process (spawn), so its peak memory is its own.

MFU: model FLOPs of the step (from the config and the batch's shape: 6 x parameters x tokens for the
matmuls, 6 x L x d x T^2 for causal attention, the output head only where it ran) divided by step time and
by the machine's measured matmul peak (fp32, or bf16 when autocast is on).

The text is synthetic but shaped like the real data (LLaVA-CC3M captions: a short prompt and an 8-30 word
caption; COCO instruct: 1-3 turns with 20-150 word answers); the images are the demo's 224x224 shapes.
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from model.cli import HelpFormatter, default_device  # noqa: E402
from model.engine import IncrementalDecoder  # noqa: E402
from model.tokenizer import build_prompt, image_token_ids, load_tokenizer  # noqa: E402
from trainer.data import IGNORE_INDEX, LengthGroupedBatchSampler, VLMCollator  # noqa: E402
from trainer.data_index import open_dataset  # noqa: E402
from trainer.feature_cache import FeatureCache  # noqa: E402
from model.LMConfig import IMAGE_MARKER, LMConfig  # noqa: E402
from model.model import MiniMindVLM  # noqa: E402
from trainer.train import batch_image_features, make_adamw  # noqa: E402
from model.hardware import autocast_dtype  # noqa: E402
from model.vision import (encode_images, load_vision_model, make_random_vision_model,  # noqa: E402
                          vision_fingerprint)

SIZES = {"27m": dict(dim=512, n_layers=8, n_heads=16, n_kv_heads=8),
         "109m": dict(dim=768, n_layers=16, n_heads=16, n_kv_heads=8),
         "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)}
WORDS = ("the a of and in on with is are this that image picture shows small large red blue green yellow "
         "orange purple circle square triangle cross background light dark left right top bottom near far "
         "there one two three person people dog cat car street building tree sky water table food standing "
         "sitting holding looking front behind next white black grey bright colourful wooden metal old new "
         "scene view photo close up under over between several many some each other its their what where "
         "how why which describe answer question because while during after before around").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="27m", help="decoder config")
    p.add_argument("--quick", action="store_true", help="tiny config, few steps: about a minute")
    p.add_argument("--steps", type=int, help="timed training steps per mode (default: 4; quick: 2)")
    p.add_argument("--batch_size", type=int, help="training batch (default: 16; quick: 4)")
    p.add_argument("--max_seq_len", type=int, default=640, help="our training length (longer turns are left out)")
    p.add_argument("--naive_max_seq_len", type=int, default=200,
                   help="upstream v1's LMConfig.max_seq_len: naive cuts every sample to it and pads to it")
    p.add_argument("--decode_tokens", type=int, help="tokens per decode run (default: 256; quick: 32)")
    p.add_argument("--epochs", type=int, default=19, help="epochs of the end-to-end estimate (upstream pretrain)")
    p.add_argument("--device", default=default_device(), help="device")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="autocast, as in training")
    p.add_argument("--workdir", help="data, tower and cache (default: a new temporary directory)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--skip_naive", action="store_true", help="only measure ours")
    p.add_argument("--train_only", action="store_true",
                   help="only the matmul peak (for MFU) and training: no encoder or decoding section")
    args = p.parse_args(argv)
    q = args.quick
    args.size = "tiny" if q else args.size
    args.steps = args.steps or (2 if q else 4)
    args.batch_size = args.batch_size or (4 if q else 16)
    args.decode_tokens = args.decode_tokens or (32 if q else 256)
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------------
# Data


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_data(workdir, n_images, seed=0):
    """Demo images plus LLaVA-shaped synthetic text: pretrain.jsonl and sft.jsonl over the same images."""
    from make_demo_data import make_demo_data
    if not os.path.isfile(os.path.join(workdir, "sft.jsonl")):
        make_demo_data(workdir, n_train=n_images, n_eval=1, eval_images_dir=None, seed=seed, progress=False)
        rng = random.Random(seed)
        images = sorted(os.listdir(os.path.join(workdir, "images")))[:n_images]
        with open(os.path.join(workdir, "pretrain.jsonl"), "w") as pre, open(os.path.join(workdir, "sft.jsonl"),
                                                                              "w") as sft:
            for i, im in enumerate(images):
                pre.write(json.dumps({"id": i, "image": im, "conversations": [
                    {"from": "human", "value": f"{words(rng, 4, 8)}\n{IMAGE_MARKER}"},
                    {"from": "gpt", "value": words(rng, 8, 30)}]}) + "\n")
                turns = []
                for t in range(rng.randint(1, 3)):
                    q = words(rng, 6, 15)
                    turns += [{"from": "human", "value": f"{IMAGE_MARKER}\n{q}" if t == 0 else q},
                              {"from": "gpt", "value": words(rng, 20, 150)}]
                sft.write(json.dumps({"id": i, "image": im, "conversations": turns}) + "\n")
    return os.path.join(workdir, "images")


# ------------------------------------------------------------------------------------------------------------
# Hardware and encoder


def matmul_peak(device, dtype, sizes, reps):
    """Best GFLOP/s of square matmuls of these sizes in this dtype: the machine's practical peak."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        a @ b
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def memory_bandwidth(device, mb=256, reps=5):
    """Best GB/s of copying a large tensor (read + write): single-stream decoding reads every weight per
    token, so bytes of weights / this bandwidth bounds its speed."""
    x = torch.empty(mb * 2 ** 18, device=device)
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = max(best, 2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def reset_peak_rss():
    """Linux: restart the process's peak-RSS counter (VmHWM), so a peak measures what follows only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def encoder_speed(tower, device, dtype, batch, reps):
    """Images per second of the frozen tower at this batch size (None dtype: fp32)."""
    x = torch.randn(batch, 3, 224, 224)
    encode_images(tower, x[:1], dtype)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        encode_images(tower, x, dtype)
    sync(device)
    return batch * reps / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------------------
# FLOPs


def train_flops(cfg: LMConfig, batch_size, seq_len, n_labels, n_images):
    """Model FLOPs of one training step (forward + backward = 3 x forward) on a (batch_size, seq_len) batch."""
    d, hd, L = cfg.dim, cfg.dim // cfg.n_heads, cfg.n_layers
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    ffn = 3 * d * cfg.hidden_dim * ((cfg.num_experts_per_tok + cfg.n_shared_experts) if cfg.use_moe else 1)
    tokens = batch_size * seq_len
    matmuls = 6 * L * (attn + ffn) * tokens
    attention = 6 * L * d * seq_len ** 2 * batch_size  # QK^T and AV, causal half, x3 for backward
    head = 6 * d * cfg.vocab_size * n_labels
    proj = 6 * cfg.vision_dim * d * 50 * n_images
    return matmuls + attention + head + proj


# ------------------------------------------------------------------------------------------------------------
# Training step: ours and naive


def naive_forward(model, input_ids, image_features, labels):
    """Upstream v1's forward: find each placeholder by scanning the Python token list, splice by concatenation
    row by row, then full logits and cross-entropy over every position."""
    image_ids = model.image_ids.tolist()
    n = len(image_ids)
    h = model.tok_embeddings(input_ids)
    rows = []
    for b in range(input_ids.shape[0]):
        toks, row, img = input_ids[b].tolist(), h[b], 0
        for s in range(len(toks) - n + 1):
            if toks[s:s + n] == image_ids and img < image_features[b].shape[0]:
                proj = model.vision_proj(image_features[b][img])
                row = torch.cat((row[:s], proj, row[s + n:]), dim=0)
                img += 1
        rows.append(row)
    h = torch.stack(rows)
    T = h.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for layer in model.layers:
        h = layer(h, cos, sin, None)
    logits = model.output(model.norm(h))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


class FixedPadCollator(VLMCollator):
    """Upstream v1's dataset: every sample cut to max_seq_len tokens (`input_id[:max_length]`, whatever is cut)
    and padded to it, so every batch is (batch, max_seq_len)."""

    def __init__(self, max_seq_len, pad_id=0):
        super().__init__(pad_id)
        self.max_seq_len = max_seq_len

    def __call__(self, batch):
        out = super().__call__(batch)
        n = self.max_seq_len
        ids, labels = out["input_ids"][:, :n], out["labels"][:, :n]
        out["input_ids"] = F.pad(ids, (0, n - ids.shape[1]), value=self.pad_id)
        out["labels"] = F.pad(labels, (0, n - labels.shape[1]), value=IGNORE_INDEX)
        return out


def train_mode(spec):
    """One training measurement in its own process. spec: dict(mode=ours_cold|ours_warm|naive, stage, ...)."""
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    amp = autocast_dtype(device.type, spec["dtype"])
    tokenizer = load_tokenizer(os.path.join(ROOT, "model/minimind_tokenizer"))
    cfg = LMConfig(**SIZES[spec["size"]], vocab_size=len(tokenizer), image_ids=image_token_ids(tokenizer))
    model = MiniMindVLM(cfg).to(device).train()
    tower = load_vision_model(spec["tower"], device)
    naive = spec["mode"] == "naive"
    cache = None if naive else FeatureCache(spec["cache"], vision_fingerprint(spec["tower"]), ram_budget_gb=0)
    data = os.path.join(spec["workdir"], f"{spec['stage']}.jsonl")
    dataset = open_dataset(data, spec["images"], tokenizer, spec["max_seq_len"], feature_cache=cache)
    n_batches = spec["steps"] + 1  # + 1 warm-up step, not timed
    if naive:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [order[i * spec["batch_size"]:(i + 1) * spec["batch_size"]] for i in range(n_batches)]
        collate = FixedPadCollator(spec["naive_max_seq_len"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        lengths = dataset.lengths
        batches = list(LengthGroupedBatchSampler(lengths, spec["batch_size"], seed=0))[:n_batches]
        collate = VLMCollator()
        optimizer = make_adamw(list(model.parameters()), 1e-4)
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()  # the peak is the training loop's, not the loading's (loading the tower briefly doubles it)
    times, samples, real_tokens, flops, padded = [], 0, 0, 0.0, 0
    for i, idx in enumerate(batches):
        sync(device)
        t = time.perf_counter()
        batch = collate([dataset[j] for j in idx])  # reads images from disk unless their features are cached
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        if naive:  # every image was decoded by dataset[j] (nothing is cached); encode one at a time, fp32
            feats = [encode_images(tower, px[None]) for px in batch["pixel_values"]]
            with autocast:
                loss = naive_forward(model, ids, feats, labels)
        else:
            feats = batch_image_features(batch, cache, tower, amp, device)
            with autocast:
                loss = model(ids, feats, labels=labels, loss_only=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i == 0:
            continue  # warm-up: allocator, kernels, first-touch of the cache files
        times.append(time.perf_counter() - t)
        B, T = ids.shape
        samples += B
        real_tokens += int((ids != 0).sum())  # id 0 is padding only
        padded += B * T
        n_labels = int((labels[:, 1:] != IGNORE_INDEX).sum())
        flops += train_flops(cfg, B, T, B * T if naive else n_labels, B)
    if cache is not None:
        cache.flush()  # the cold run's features, for the warm run (another process); not timed
    step_s = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return {"samples_per_s": samples / sum(times), "tokens_per_s": real_tokens / sum(times),
            "step_s": step_s, "padding_share": 1 - real_tokens / padded, "model_tflops_per_s":
            flops / sum(times) / 1e12, "peak_memory_mb": peak / 2 ** 20,
            "gflop_per_sample": flops / samples / 1e9, "loss": float(loss.detach())}


def run_isolated(fn, spec):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, (spec,))


# ------------------------------------------------------------------------------------------------------------
# Decoding: ours and naive


class ConcatKVCache:
    """Upstream v1's cache: every step concatenates the new key/value onto the whole history."""

    def __init__(self):
        self.kv, self.length, self.pending = {}, 0, 0

    def update(self, layer, k, v):
        if layer in self.kv:
            k, v = torch.cat((self.kv[layer][0], k), dim=1), torch.cat((self.kv[layer][1], v), dim=1)
        self.kv[layer] = (k, v)
        return k, v

    def advance(self, n):
        self.length += n


@torch.inference_mode()
def decode_ours(model, tokenizer, ids, feats, n_tokens, batch=1):
    """(seconds to first piece, decode tokens per second after it) of model.stream_generate + IncrementalDecoder."""
    ids = ids.expand(batch, -1)
    decoders = [IncrementalDecoder(tokenizer) for _ in range(batch)]
    t0 = time.perf_counter()
    first, count = None, 0
    for tok in model.stream_generate(ids, [feats] * batch, max_new_tokens=n_tokens, eos_token_id=-1):
        for d, t in zip(decoders, tok.tolist()):
            d.push(t)
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, batch * (count - 1) / (end - first)


@torch.inference_mode()
def decode_naive(model, tokenizer, ids, feats, n_tokens):
    """Upstream v1's streaming: torch.cat KV cache and ids, every piece by re-decoding the whole answer."""
    cache = ConcatKVCache()
    start = ids.shape[1]
    t0 = time.perf_counter()
    out = model(ids, [feats], past_key_values=cache)
    first, printed = None, ""
    for _ in range(n_tokens):
        next_id = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        ids = torch.cat((ids, next_id), dim=1)
        text = tokenizer.decode(ids[0, start:].tolist(), skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            _piece, printed = text[len(printed):], text
        if first is None:
            first = time.perf_counter()
        out = model(next_id, past_key_values=cache)
    end = time.perf_counter()
    return first - t0, (n_tokens - 1) / (end - first)


def random_model_files(size, workdir=None, prefix="bench-"):
    """(workdir, checkpoint, CLIP directory, LMConfig, tokenizer): a seeded random model of `size` saved as a
    checkpoint and a seeded random CLIP tower, made once in workdir (a new temporary directory if None)."""
    from model.checkpoint import save_checkpoint
    from model.tokenizer import DEFAULT_TOKENIZER
    work = workdir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work, exist_ok=True)
    tok = load_tokenizer(DEFAULT_TOKENIZER)
    torch.manual_seed(0)
    cfg = LMConfig(**SIZES[size], vocab_size=len(tok), image_ids=image_token_ids(tok))
    ckpt, tower = os.path.join(work, f"random_{size}.safetensors"), os.path.join(work, "random-clip")
    if not os.path.isfile(ckpt):
        save_checkpoint(MiniMindVLM(cfg), ckpt, cfg)
    if not os.path.isdir(tower):
        make_random_vision_model(tower, seed=0)
    return work, ckpt, tower, cfg, tok


def print_json(res, out=None):
    """The result as one JSON line, last on stdout (what run_script and the tests read), and in `out` if given."""
    line = json.dumps(res)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
    print(line)


def run_script(name, argv):
    """The JSON (last stdout line) of scripts/<name> run with argv; its tables go to stderr."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name)] + argv, cwd=ROOT,
                       capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), file=sys.stderr)
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"scripts/{name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def decode_section(spec):
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    tokenizer = load_tokenizer(os.path.join(ROOT, "model/minimind_tokenizer"))
    cfg = LMConfig(**SIZES[spec["size"]], vocab_size=len(tokenizer), image_ids=image_token_ids(tokenizer))
    model = MiniMindVLM(cfg).eval()
    prompt = build_prompt([{"role": "user", "content": f"{IMAGE_MARKER}\nDescribe this image."}])
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    feats = torch.randn(1, 50, 768)
    n = spec["decode_tokens"]
    decode_ours(model, tokenizer, ids, feats, 4)  # warm-up
    runs = {"ours": [], "batch8": [], "naive": []}
    for _ in range(2):  # alternate and keep each one's best: a noisy neighbour should not pick the winner
        runs["ours"].append(decode_ours(model, tokenizer, ids, feats, n))
        runs["batch8"].append(decode_ours(model, tokenizer, ids, feats, n, batch=8))
        if not spec["skip_naive"]:
            runs["naive"].append(decode_naive(model, tokenizer, ids, feats, n))
    res = {"ttft_s": min(r[0] for r in runs["ours"]), "tokens_per_s": max(r[1] for r in runs["ours"]),
           "batch8_tokens_per_s": max(r[1] for r in runs["batch8"])}
    if runs["naive"]:
        res["naive_ttft_s"] = min(r[0] for r in runs["naive"])
        res["naive_tokens_per_s"] = max(r[1] for r in runs["naive"])
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return res


# ------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    work = args.workdir or tempfile.mkdtemp(prefix="minimind-bench-")
    n_images = args.batch_size * (args.steps + 1) * 2  # enough for pretrain + warm + naive batches
    t_start = time.time()
    print(f"benchmark: {args.size} config on {device} ({threads} threads), workdir {work}", file=sys.stderr)
    images = make_data(work, n_images)
    tower_dir = os.path.join(work, "random-clip-bench")
    if not os.path.isdir(tower_dir):
        make_random_vision_model(tower_dir, seed=0)

    res = {"config": {"size": args.size, **SIZES[args.size], "batch_size": args.batch_size, "steps": args.steps,
                      "max_seq_len": args.max_seq_len, "naive_max_seq_len": args.naive_max_seq_len,
                      "decode_tokens": args.decode_tokens,
                      "device": str(device), "threads": threads, "quick": args.quick,
                      "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    amp = autocast_dtype(device.type, args.dtype)
    res["config"]["autocast"] = str(amp) if amp else "off (fp32)"

    # Hardware: the matmul peaks that MFU is measured against
    sizes, reps = ([256, 512], 3) if args.quick else ([512, 1024, 2048], 8)
    res["hardware"] = {"matmul_fp32_gflops": matmul_peak(device, torch.float32, sizes, reps),
                       "matmul_bf16_gflops": matmul_peak(device, torch.bfloat16, [256 if args.quick else 1024], 2),
                       "memory_gb_per_s": memory_bandwidth(device, 64 if args.quick else 256)}
    # The frozen encoder
    tower = load_vision_model(tower_dir, device)
    res["encoder"] = {} if args.train_only else {
        "fp32_batch32_images_per_s": encoder_speed(tower, device, None, 8 if args.quick else 32,
                                                   1 if args.quick else 3),
        "fp32_batch1_images_per_s": encoder_speed(tower, device, None, 1, 4 if args.quick else 16),
        "bf16_batch4_images_per_s": encoder_speed(tower, device, torch.bfloat16, 2 if args.quick else 4, 1)}
    del tower

    spec = dict(size=args.size, device=args.device, dtype=args.dtype, threads=threads, workdir=work,
                images=images, tower=tower_dir, batch_size=args.batch_size, steps=args.steps,
                max_seq_len=args.max_seq_len, naive_max_seq_len=args.naive_max_seq_len)
    res["train"] = {}
    for stage in ("pretrain", "sft"):
        cache = os.path.join(work, f"cache-{stage}-{time.time_ns()}")  # cold: a new, empty cache
        modes = {}
        modes["ours_cold"] = run_isolated(train_mode, dict(spec, stage=stage, mode="ours_cold", cache=cache))
        modes["ours_warm"] = run_isolated(train_mode, dict(spec, stage=stage, mode="ours_warm", cache=cache))
        if not args.skip_naive:
            modes["naive"] = run_isolated(train_mode, dict(spec, stage=stage, mode="naive", cache=None))
        res["train"][stage] = modes
        print(f"  {stage}: done ({time.time() - t_start:.0f}s)", file=sys.stderr)

    if not args.train_only:
        res["decode"] = run_isolated(decode_section, dict(spec, decode_tokens=args.decode_tokens,
                                                          skip_naive=args.skip_naive))
        # The inference engine as users run it: one stream against upstream's algorithm, then the API under
        # N concurrent clients and the front ends' memory (each script prints its own tables to stderr here).
        quick = ["--size", "tiny", "--tokens", "16"] if args.quick else ["--size", args.size]
        res["engine_decode"] = run_script("benchmark_decode.py", quick + ["--repeats", "1" if args.quick else "3",
                                                                          "--workdir", os.path.join(work, "decode")])
        res["serving"] = run_script("benchmark_serving.py", quick + ["--workdir", os.path.join(work, "serving")] + (
            ["--clients", "1", "2", "--samples", "2", "--skip_memory"] if args.quick else []))
        d = res["decode"]  # single-stream decoding reads every weight once per token
        d["bandwidth_bound_tokens_per_s"] = res["hardware"]["memory_gb_per_s"] * 1e9 / d["weight_bytes"]
    peak = res["hardware"]["matmul_bf16_gflops" if amp == torch.bfloat16 else "matmul_fp32_gflops"]
    for stage, modes in res["train"].items():
        for m in modes.values():
            m["mfu"] = m["model_tflops_per_s"] * 1e3 / peak
    if not args.skip_naive and not args.train_only:
        ratios = {}
        for stage, m in res["train"].items():
            cold, warm, naive = m["ours_cold"]["step_s"], m["ours_warm"]["step_s"], m["naive"]["step_s"]
            ratios[f"{stage}_first_epoch"] = naive / cold
            ratios[f"{stage}_later_epochs"] = naive / warm
            # A whole run of E epochs: ours encodes each image once (cold epoch), then reads the cache.
            ratios[f"{stage}_{args.epochs}_epochs"] = args.epochs * naive / (cold + (args.epochs - 1) * warm)
        d = res["decode"]
        ratios["decode"] = d["tokens_per_s"] / d["naive_tokens_per_s"]
        ratios["decode_batch8_vs_naive_single"] = d["batch8_tokens_per_s"] / d["naive_tokens_per_s"]
        ratios["encoder_batched_vs_per_image"] = (res["encoder"]["fp32_batch32_images_per_s"]
                                                  / res["encoder"]["fp32_batch1_images_per_s"])
        res["speedup"] = ratios
    res["wall_s"] = time.time() - t_start
    print_table(res)
    line = json.dumps(res)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")
    print(line)


def print_table(res):
    c = res["config"]
    out = [f"MiniMind-V benchmark: {c['size']} (dim {c['dim']}, {c['n_layers']} layers), batch {c['batch_size']}, "
           f"{c['device']} x{c['threads']} threads, {c['cpu_capability']}, autocast {c['autocast']}",
           f"matmul peak: fp32 {res['hardware']['matmul_fp32_gflops']:.1f} GFLOP/s, "
           f"bf16 {res['hardware']['matmul_bf16_gflops']:.1f} GFLOP/s; memory copy "
           f"{res['hardware']['memory_gb_per_s']:.1f} GB/s",
           "encoder (ViT-B/32): " + (", ".join(f"{k.replace('_images_per_s', '')} {v:.1f} img/s"
                                               for k, v in res["encoder"].items()) or "not measured"),
           "", f"{'training':<22}{'samples/s':>10}{'tokens/s':>10}{'step s':>9}{'padding':>9}{'MFU':>7}{'peak MB':>9}"]
    for stage, modes in res["train"].items():
        for mode, m in modes.items():
            out.append(f"{stage + ' ' + mode:<22}{m['samples_per_s']:>10.2f}{m['tokens_per_s']:>10.0f}"
                       f"{m['step_s']:>9.2f}{m['padding_share']:>9.0%}{m['mfu']:>7.1%}{m['peak_memory_mb']:>9.0f}")
    d = res.get("decode", {})
    if d:
        out += ["", f"decode: {d['tokens_per_s']:.1f} tok/s (first token {d['ttft_s'] * 1e3:.0f} ms), batch of 8: "
                    f"{d['batch8_tokens_per_s']:.1f} tok/s; weight-reading bound for one stream "
                    f"{d['bandwidth_bound_tokens_per_s']:.0f} tok/s"]
    if "naive_tokens_per_s" in d:
        out.append(f"naive decode: {d['naive_tokens_per_s']:.1f} tok/s (first token {d['naive_ttft_s'] * 1e3:.0f} ms)")
    if "engine_decode" in res:
        v = res["engine_decode"]["variants"]
        out.append("engine, one stream: " + ", ".join(f"{k} {r['tokens_per_s']:.1f} tok/s ({r['vs_upstream']:.2f}x "
                                                      f"upstream)" for k, r in v.items()))
    if "serving" in res:
        for name, srv in res["serving"]["servers"].items():
            out.append(f"API, {name}: " + ", ".join(
                f"N={n} {r['aggregate_tokens_per_s']:.0f} tok/s, p95 TTFT {r['ttft_p95_s'] * 1e3:.0f} ms"
                for n, r in srv["clients"].items()))
        for dtype, m in res["serving"].get("memory", {}).items():
            if isinstance(m, dict):
                out.append(f"memory ({dtype}): 3-eval_chat.py {m['eval_chat_mib']:.0f} MiB, web_server.py "
                           f"{m['web_server_mib']:.0f} MiB")
    if "speedup" in res:
        out += ["", "speed-up over naive: " + ", ".join(f"{k} {v:.1f}x" for k, v in res["speedup"].items())]
    out.append(f"wall time {res['wall_s']:.0f}s")
    print("\n".join(out))


if __name__ == "__main__":
    main()
