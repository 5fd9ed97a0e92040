"""The one training loop behind 1-pretrain_vlm.py and 2-sft_vlm.py. A stage is a recipe: its data, the
weights it starts from, the file it writes and its defaults. Everything else is shared.

Runs as one process or under torchrun (DDP: nccl on CUDA, gloo on CPU). The CLIP tower is frozen, so each
image is encoded once into the feature cache and training reads features, not pixels.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import (CheckpointError, atomic_write, load_strict, read_state_dict, resolve_checkpoint,
                         save_checkpoint, sidecar_path)
from .data_check import DataError, Problem, add_check_args, run_check
from .data import (DEFAULT_TOKENIZER, ImageFileDataset, LengthGroupedBatchSampler, VLMCollator, VLMDataset,
                      collate_images, image_cache_key, image_token_ids, load_tokenizer)
from .feature_cache import FeatureCache
from model.LMConfig import LMConfig
from model.model import MiniMindVLM
from model.vision import (DEFAULT_VISION_MODEL, BadImage, autocast_dtype, encode_images, load_vision_model,
                           vision_fingerprint)


@dataclass
class Recipe:
    stage: str  # "pretrain" | "sft": names the output file
    description: str
    data_path: str
    images_dir: str
    init_suffix: str  # start from out/{dim}[_moe]{init_suffix}(.safetensors|.pth)
    init_help: str  # where to get that file
    allow_missing: tuple  # parameter prefixes the starting file may lack
    epochs: int
    batch_size: int
    learning_rate: float
    max_seq_len: int


def build_parser(r: Recipe) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=r.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="out", help="where checkpoints, sidecar JSON, logs and loss curves go")
    a("--epochs", type=int, default=r.epochs)
    a("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: run all epochs); "
                                                "also the length of the LR schedule")
    a("--batch_size", type=int, default=r.batch_size, help="samples per step per process")
    a("--learning_rate", type=float, default=r.learning_rate, help="peak LR (cosine decay to a tenth of it)")
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32")
    a("--use_wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without account)")
    a("--wandb_project", default=f"MiniMind-V-{r.stage}")
    a("--num_workers", type=int, default=2, help="DataLoader worker processes (image decoding)")
    a("--data_path", default=r.data_path, help="LLaVA-format .json list or .jsonl")
    a("--images_dir", default=r.images_dir, help="directory the records' image paths are relative to")
    a("--ddp", action="store_true", help="use DDP (implied when started by torchrun)")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--grad_clip", type=float, default=1.0)
    a("--warmup_iters", type=int, default=0, help="linear LR warm-up, in optimizer steps")
    a("--log_interval", type=int, default=100, help="optimizer steps between loss logs")
    a("--save_interval", type=int, default=1000, help="optimizer steps between checkpoint saves")
    a("--dim", type=int, default=512, help="decoder width (512: 27M model, 768: 109M model)")
    a("--n_layers", type=int, default=8, help="decoder blocks (8 for dim 512, 16 for dim 768)")
    a("--n_heads", type=int, default=16, help="query heads (upstream: 16)")
    a("--n_kv_heads", type=int, default=8, help="key/value heads shared by the query heads (upstream: 8)")
    a("--max_seq_len", type=int, default=r.max_seq_len, help="training sequence length (tokens, 50 per image)")
    a("--use_moe", action="store_true", help="mixture-of-experts feed-forward layers")
    a("--vision_model", default=DEFAULT_VISION_MODEL, help="local CLIP ViT-B/32 directory (Hugging Face layout)")
    a("--tokenizer", default=DEFAULT_TOKENIZER)
    a("--init_from", default="auto", help=f"starting weights: auto = {{out_dir}}/{{dim}}[_moe]{r.init_suffix} "
                                           "(.safetensors or .pth), a path, or 'none' for random init")
    a("--seed", type=int, default=1337)
    a("--save_format", choices=["safetensors", "pth"], default="safetensors",
      help="weights file format: safetensors, or pth (upstream-style torch.save state dict)")
    a("--keep_last", type=int, default=0, help="also keep the last N step-numbered checkpoints "
                                                "({name}_step{N}) besides the latest (0: only the latest)")
    a("--resume", action="store_true", help="continue the interrupted run in --out_dir exactly where it stopped "
                                            "(model, optimizer, LR schedule, data position, RNGs, wandb run)")
    a("--compile", action="store_true", help="torch.compile the model (first steps are slow while it compiles)")
    a("--length_group", type=int, default=64, help="batches formed together from samples sorted by length, so "
                                                   "padding is small (1: plain shuffled batches)")
    a("--feature_cache", default=None, help="image feature cache directory (None: {out_dir}/feature_cache)")
    a("--check_data", nargs="?", const="quick", choices=["quick", "full"], default=None,
      help="check --data_path and its images, print a report and exit (1 if anything is wrong) without training; "
           "quick: records, image headers and file ends, token lengths; full: also decode every image")
    a("--on_bad_sample", choices=["error", "skip"], default="error",
      help="a record or image that cannot be used: error = stop with a message naming it (after saving a "
           "checkpoint to --resume from); skip = leave it out, count it, list it in {name}_skipped.jsonl")
    add_check_args(p)  # --max_image_pixels
    a("--no_feature_cache", action="store_true", help="no on-disk cache: images are encoded as batches need them and kept in RAM "
                                                       "(up to 4 GB) for later epochs of this run only")
    return p


def init_distributed(args):
    """(ddp, rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        if args.ddp:
            raise SystemExit("--ddp needs to be launched with torchrun (e.g. torchrun --nproc_per_node 2 ...)")
        return False, 0, 1, torch.device(args.device)
    cuda = torch.cuda.is_available() and not args.device.startswith("cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return True, rank, world, torch.device(f"cuda:{local}")
    return True, rank, world, torch.device("cpu")


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 10 + 0.5 * (peak - peak / 10) * (1 + math.cos(math.pi * progress))


def fill_feature_cache(dataset, vision_model, cache, args, amp_dtype, rank, world, device):
    """Encode every not-yet-cached image of the dataset once, split across ranks. Returns (images, newly
    encoded, {path: (problem kind, message)} for the images that could not be decoded, the same on every
    rank)."""
    paths = sorted({p for i in range(len(dataset)) for p in dataset.image_paths(i)})
    todo = [p for p in paths[rank::world] if not cache.on_disk(image_cache_key(p))]
    bad = {}
    if todo:
        loader = DataLoader(ImageFileDataset(todo, args.max_image_pixels), batch_size=64,
                            num_workers=args.num_workers, collate_fn=collate_images)
        for keys, pixels, errors in tqdm(loader, desc=f"encoding {len(todo)} images", disable=rank != 0,
                                         unit="batch"):
            bad.update({p: (e.kind, str(e)) for p, e in errors})
            if pixels is not None:
                for k, f in zip(keys, encode_images(vision_model, pixels, amp_dtype)):
                    cache.put(k, f)
    if world > 1:  # every rank learns every rank's bad images (they decide together what to do)
        gathered = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = {p: b for part in gathered for p, b in part.items()}
    return len(paths), len(todo), bad


def batch_image_features(batch, cache, vision_model, amp_dtype, device):
    """Per-row image features for the model: cached ones read, the rest encoded now (and cached)."""
    fresh = {}
    todo = [i for i, k in enumerate(batch["pixel_keys"]) if k not in cache]  # workers decode; encode only misses
    if todo:
        for i, f in zip(todo, encode_images(vision_model, batch["pixel_values"][todo], amp_dtype)):
            cache.put(batch["pixel_keys"][i], f)
            fresh[batch["pixel_keys"][i]] = f
    flat = [fresh[k] if k in fresh else cache.get(k) for k in batch["image_keys"]]
    rows, i = [], 0
    for n in batch["image_counts"]:
        rows.append(torch.stack(flat[i:i + n]).to(device, torch.float32) if n else None)
        i += n
    return rows


def make_adamw(params, lr):
    """AdamW with the fused kernel (one pass over all parameters; on the 2-core dev CPU a 27M-model step
    took 20 ms fused, 63 ms with the default per-parameter loop, 105 ms with foreach), else the default."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr)


def save_loss_curve(log, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(recipe: Recipe, argv=None):
    """Run a stage (see run); errors about the user's data, files or weights end it with a message and exit
    status 1, not a traceback."""
    args = build_parser(recipe).parse_args(argv)
    if args.check_data:
        if int(os.environ.get("RANK", 0)) != 0:
            raise SystemExit(0)  # under torchrun, rank 0 alone reports
        try:
            raise SystemExit(run_check(args, full=args.check_data == "full"))
        except (FileNotFoundError, DataError) as e:
            raise SystemExit(f"error: {e}") from None
    try:
        return run(recipe, args)
    except (DataError, CheckpointError, BadImage, FileNotFoundError) as e:
        shared = isinstance(e, DataError)  # every rank found the same problems: one message is enough
        if not shared or int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(1) from None


def run(recipe: Recipe, args):
    ddp, rank, world, device = init_distributed(args)
    master = rank == 0
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    amp_dtype = autocast_dtype(device.type, args.dtype)

    tokenizer = load_tokenizer(args.tokenizer)
    cfg = LMConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                   use_moe=args.use_moe, vocab_size=len(tokenizer),
                   image_ids=image_token_ids(tokenizer))
    model = MiniMindVLM(cfg)
    moe = "_moe" if args.use_moe else ""
    init = f"{args.out_dir}/{args.dim}{moe}{recipe.init_suffix}" if args.init_from == "auto" else args.init_from
    if init != "none":
        init = resolve_checkpoint(init)
        if not os.path.exists(init):
            shown = init if Path(init).suffix else f"{init}.safetensors or {init}.pth"
            raise SystemExit(f"starting weights {shown} not found. {recipe.init_help}\n"
                             "Or pass --init_from none to start from random weights.")
        load_strict(model, read_state_dict(init), allow_missing=recipe.allow_missing, where=init)
    model.to(device)
    vision_model = load_vision_model(args.vision_model, device)

    name = f"{args.dim}{moe}_vlm_{recipe.stage}"
    out_path = Path(args.out_dir) / f"{name}.{args.save_format}"
    resume_path = Path(args.out_dir) / f"{name}_resume.pt"
    bad = BadSamples(args.on_bad_sample, out_path.with_name(name + "_skipped.jsonl"), master)

    cache_dir = None if args.no_feature_cache else (args.feature_cache or f"{args.out_dir}/feature_cache")
    cache = FeatureCache(cache_dir, vision_fingerprint(args.vision_model))
    dataset = VLMDataset(args.data_path, args.images_dir, tokenizer, args.max_seq_len, cache,
                         args.max_image_pixels, progress=master)
    bad.report_reading(dataset)
    if cache_dir is not None:
        n_images, n_new, bad_images = fill_feature_cache(dataset, vision_model, cache, args, amp_dtype, rank,
                                                         world, device)
        if master:
            print(f"feature cache {cache.dir}: {n_images} images, {n_new} newly encoded by rank 0")
        if bad_images:  # their records: stop on them, or leave them out (the same on every rank)
            found, keep = [], []
            for i in range(len(dataset)):
                errors = [bad_images[p] for p in dataset.image_paths(i) if p in bad_images]
                if errors:
                    found.append(dataset.problem(i, *errors[0]))
                else:
                    keep.append(i)
            bad.found(found, "decoding images", step=0)
            dataset.keep(keep)
    if len(dataset) == 0:
        raise DataError([], f"{args.data_path}: no usable records left")

    # One sampler for every case, so a 2-rank run sees exactly the batches of a 1-rank run with twice the batch.
    lengths = dataset.lengths if args.length_group > 1 else [0] * len(dataset)
    sampler = LengthGroupedBatchSampler(lengths, args.batch_size, world, rank, args.seed, args.length_group,
                                        args.accumulation_steps)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        collate_fn=VLMCollator(pad_id=tokenizer.pad_token_id or 0), worker_init_fn=_ignore_sigint,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    steps_per_epoch = max(1, len(loader) // args.accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    raw_model = model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=cfg.use_moe)
    if args.compile:  # dynamic shapes: batches are padded to their own length, which varies
        model = torch.compile(model, dynamic=True)
    optimizer = make_adamw([p for p in raw_model.parameters() if p.requires_grad], args.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    layout = {"world": world, "batch_size": args.batch_size, "accumulation": args.accumulation_steps}
    step, start_epoch, start_micro, wandb_id = 0, 0, 0, None
    if args.resume:
        step, start_epoch, start_micro, wandb_id = load_resume_state(
            resume_path, raw_model, optimizer, scaler, layout, steps_per_epoch, master)
    bad.start(step if args.resume else None)
    if ddp:
        dist.barrier()  # rank 0 has rewritten the skipped list before any rank appends to it
    wandb = None
    if args.use_wandb and master:
        import wandb
        wandb.init(project=args.wandb_project, name=name, config=vars(args), dir=args.out_dir,
                   id=wandb_id, resume="allow")
        wandb_id = wandb.run.id
    if master:
        print(f"{recipe.stage}: {raw_model.num_parameters() / 1e6:.3f}M parameters (dim {cfg.dim}, {cfg.n_layers} "
              f"layers{', MoE' if cfg.use_moe else ''}), {len(dataset)} samples, {world} process(es) x batch "
              f"{args.batch_size} x accumulation {args.accumulation_steps}, {total_steps} steps, "
              f"autocast {amp_dtype or 'off (fp32)'}, start {init}")

    log_path = out_path.with_name(name + "_log.jsonl")
    log = []
    if master:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if args.resume and log_path.is_file():  # keep the curve up to the resumed step; later steps are redone
            log = [r for r in map(json.loads, log_path.read_text().splitlines()) if r["step"] <= step]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in log))
    t0, tokens = time.time(), 0
    loss_sum = torch.zeros((), device=device)
    stop = StopRequest(ddp)
    test_signal = os.environ.get("MINIMIND_TEST_SIGNAL")  # "KILL:3": the tests' way to die after step 3
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc=recipe.stage, disable=not master, unit="step")

    def save_all():  # weights + sidecar + curve, and everything --resume needs
        _save(raw_model, out_path, cfg, recipe, args, step, log)
        save_resume_state(resume_path, raw_model, optimizer, scaler, step, epoch, step_in_epoch, layout, wandb_id)

    # The image placeholder with zero features and no labels: its loss is 0, yet every parameter takes part
    filler_ids = torch.tensor([cfg.image_ids], device=device)
    filler_labels = torch.full_like(filler_ids, -100)
    filler_features = [torch.zeros(1, len(cfg.image_ids), cfg.vision_dim, device=device)]

    epoch, step_in_epoch = start_epoch, 0
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:  # a resumed run that had already finished
            break
        skip = start_micro if epoch == start_epoch else 0
        sampler.set_epoch(epoch, start=skip)
        step_in_epoch = skip // args.accumulation_steps
        for micro, batch in enumerate(loader, start=skip):
            if micro >= steps_per_epoch * args.accumulation_steps:
                break  # a last, incomplete accumulation group would leak its gradients into the next epoch
            last_micro = (micro + 1) % args.accumulation_steps == 0
            lr = lr_at(step, total_steps, args.learning_rate, args.warmup_iters)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if args.on_bad_sample == "error":
                found = bad.agree(batch["problems"], ddp, stop.group)  # any rank's bad sample stops every rank
                if found:
                    progress.close()
                    if master:
                        save_all()  # weights at the last finished step: this step is redone by --resume
                    if ddp:
                        dist.barrier()
                        dist.destroy_process_group()
                    raise DataError(found, f"bad sample(s) in the batch of step {step + 1} (epoch {epoch}); saved "
                                    f"{out_path} and {resume_path} at step {step}. Fix or remove the record, then run "
                                    "the same command with --resume (or add --on_bad_sample skip)")
            elif batch["problems"]:
                bad.skipped(batch["problems"], step, epoch, rank)
            if batch["input_ids"] is None:  # every sample was bad: a row with no loss keeps the ranks in step
                input_ids, labels, features = filler_ids, filler_labels, filler_features
            else:
                features = batch_image_features(batch, cache, vision_model, amp_dtype, device)
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
            sync = model.no_sync() if ddp and not last_micro else nullcontext()
            with sync, autocast:
                loss = model(input_ids, features, labels=labels, loss_only=True).loss / args.accumulation_steps
            with sync:
                scaler.scale(loss).backward()
            if batch["input_ids"] is not None:
                loss_sum += loss.detach()
                tokens += int(input_ids.numel())
            if not last_micro:
                continue
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_in_epoch += 1
            progress.update(1)
            if step % args.log_interval == 0 or step == total_steps:
                if ddp:  # log the mean over ranks, i.e. the loss of the global batch
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                loss_val = loss_sum.item() / (args.log_interval if step % args.log_interval == 0
                                              else step % args.log_interval)
                loss_sum.zero_()
                elapsed = time.time() - t0
                rec = {"step": step, "epoch": epoch, "loss": loss_val, "lr": lr,
                       "tokens_per_s": tokens * world / elapsed, "elapsed_s": elapsed}
                log.append(rec)
                if master:
                    with open(log_path, "a") as f:  # written as it goes: a run that dies keeps its curve
                        f.write(json.dumps(rec) + "\n")
                    progress.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
                    if wandb:
                        wandb.log(rec, step=step)
            if master and step % args.save_interval == 0:
                save_all()
                if args.keep_last > 0:
                    keep_step_checkpoint(out_path, step, args.keep_last)
            if test_signal and int(test_signal.split(":")[1]) == step and master:
                os.kill(os.getpid(), getattr(signal, "SIG" + test_signal.split(":")[0]))
            if stop.agreed():  # SIGINT / SIGTERM: save at this step boundary, then exit
                if master:
                    save_all()
                    print(f"\nstopped by {stop.name} after step {step}: saved {out_path} and {resume_path}; "
                          f"continue with the same command plus --resume", flush=True)
                if ddp:
                    dist.barrier()
                    dist.destroy_process_group()
                raise SystemExit(128 + stop.signum)
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    progress.close()
    if master and args.compile:
        from torch._dynamo.utils import counters
        print(f"torch.compile: {counters['stats']['unique_graphs']} graph(s) compiled")
    bad.summary(ddp, stop.group)
    if master:
        step_in_epoch = 0
        save_all()
        print(f"saved {out_path} after {step} steps in {time.time() - t0:.0f}s; final loss "
              f"{log[-1]['loss']:.4f}; loss curve {out_path.with_name(name + '_loss.png')}")
        if wandb:
            wandb.finish()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return out_path


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

    def report_reading(self, dataset):
        """The problems found reading the dataset: the same on every rank."""
        dropped = [p for p in dataset.problems if p.severity == "drop"]
        notes = [p for p in dataset.problems if p.severity == "note"]
        if self.master:
            self._write(self._lines(dropped, "reading the dataset", 0))
            if dropped:
                print(f"left out {len(dropped)} record(s) whose first turn is longer than --max_seq_len "
                      f"{dataset.max_seq_len} (e.g. {dropped[0].where()}); listed in {self.path}")
            if notes:
                print(f"{len(notes)} record(s) longer than --max_seq_len: their later turns are left out whole")
        self.found([p for p in dataset.problems if p.severity == "error"], "reading the dataset", 0)

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


def _ignore_sigint(worker_id):
    """DataLoader workers leave Ctrl-C to the main process, which saves at the next step and stops them;
    a worker that died of it would otherwise break the batch the save waits for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next optimizer step, on every rank at once."""

    def __init__(self, ddp: bool):
        self.signum, self.name, self.ddp = 0, "", ddp
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        # The flag travels on a CPU (gloo) group, so checking it every step never waits for the GPU.
        self.group = dist.new_group(backend="gloo") if ddp and dist.get_backend() != "gloo" else None

    def _handle(self, signum, frame):
        self.signum, self.name = signum, signal.Signals(signum).name

    def agreed(self) -> bool:
        if not self.ddp:
            return self.signum != 0
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)  # every rank stops at the same step
        if flag.item() and not self.signum:
            self.signum, self.name = int(flag.item()), signal.Signals(int(flag.item())).name
        return bool(flag.item())


def rng_state():
    import numpy as np
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    import numpy as np
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(path, model, optimizer, scaler, step, epoch, step_in_epoch, layout, wandb_id):
    """Everything an exact continuation needs, as tensors and plain values (loadable with weights_only=True),
    written atomically. Saved at optimizer-step boundaries, so the accumulation phase is always 0."""
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
             "step_in_epoch": step_in_epoch, "layout": layout, "rng": rng_state(), "wandb_id": wandb_id}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path, model, optimizer, scaler, layout, steps_per_epoch, master):
    """Restore a run saved by save_resume_state; returns (step, epoch, micro-batches to skip, wandb id).
    With another layout (ranks x batch x accumulation) the position in the epoch is mapped by samples seen."""
    if not path.is_file():
        raise SystemExit(f"--resume: {path} does not exist (a run saves it every --save_interval steps and when "
                         "stopped by Ctrl-C or SIGTERM); run without --resume to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"--resume: cannot read {path}: {type(e).__name__}: {e}") from None
    load_strict(model, state["model"], where=str(path))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    step, epoch, in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
    old = state["layout"]
    if old != layout:
        global_old = old["world"] * old["batch_size"] * old["accumulation"]
        global_new = layout["world"] * layout["batch_size"] * layout["accumulation"]
        samples = in_epoch * global_old
        in_epoch_new = samples // global_new
        if master:
            print(f"resume: the layout changed from {old} to {layout}. The position in epoch {epoch}, "
                  f"{samples} samples (step {in_epoch} of {global_old}), maps to step {in_epoch_new} of "
                  f"{global_new}; this epoch's order is re-derived for the new layout, so up to one global batch "
                  "of it may repeat or be skipped. The result is not bit-identical to an uninterrupted run.")
        in_epoch = in_epoch_new
    if in_epoch >= steps_per_epoch:
        epoch, in_epoch = epoch + 1, 0
    if master:
        print(f"resumed from {path}: step {step}, epoch {epoch}, step {in_epoch} of the epoch")
    return step, epoch, in_epoch * layout["accumulation"], state.get("wandb_id")


def keep_step_checkpoint(latest, step, keep_last):
    """Copy the latest checkpoint (and sidecar) to {name}_step{step} and delete all but the newest keep_last."""
    import shutil
    stem = latest.with_suffix("")
    copy = stem.with_name(f"{stem.name}_step{step:08d}{latest.suffix}")
    for src, dst in ((latest, copy), (sidecar_path(latest), sidecar_path(copy))):
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    steps = sorted(latest.parent.glob(f"{stem.name}_step*{latest.suffix}"))
    for old in steps[:-keep_last]:
        old.unlink()
        sidecar_path(old).unlink(missing_ok=True)


def _save(model, path, cfg, recipe, args, step, log):
    save_checkpoint(model, path, cfg, extra={"stage": recipe.stage, "step": step, "args": vars(args)})
    name = path.stem
    if log:
        save_loss_curve(log, path.with_name(name + "_loss.png"), f"{name}: training loss")
