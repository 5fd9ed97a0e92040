"""The one training loop behind 1-pretrain_vlm.py and 2-sft_vlm.py. A stage is a recipe: its data, the
weights it starts from, the file it writes and its defaults. Everything else is shared.

Runs as one process or under torchrun (DDP: nccl on CUDA, gloo on CPU). The CLIP tower is frozen, so each
image is encoded once into the feature cache and training reads features, not pixels.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import (CheckpointError, load_strict, read_state_dict, resolve_checkpoint, save_checkpoint,
                              trained_context)
from model.cli import DTYPES, HelpFormatter, add_max_image_pixels, default_device
from model.LMConfig import LMConfig
from model.model import MiniMindVLM
from model.tokenizer import DEFAULT_TOKENIZER, image_token_ids, load_tokenizer
from model.images import BadImage
from model.hardware import autocast_dtype, reuse_freed_memory
from model.vision import (DEFAULT_VISION_MODEL, cached_features, encode_images, load_vision_model,
                          vision_fingerprint)

from .bad_samples import BadSamples, filler_row
from .data import ImageFileDataset, LengthGroupedBatchSampler, VLMCollator, VLMDataset, collate_images
from .data_check import run_check
from .data_index import held_out, held_out_record, load_index
from .feature_cache import FeatureCache, image_cache_key
from .records import DataError
from .resume import (StopRequest, ignore_sigint, keep_step_checkpoint, kill_for_tests, load_resume_state,
                     save_resume_state)


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
    p = argparse.ArgumentParser(description=r.description, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--out_dir", default="out", help="where checkpoints, sidecar JSON, logs and loss curves go")
    a("--epochs", type=int, default=r.epochs, help="passes over the data")
    a("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: run all epochs); "
                                                "also the length of the LR schedule")
    a("--batch_size", type=int, default=r.batch_size, help="samples per step per process")
    a("--learning_rate", type=float, default=r.learning_rate, help="peak LR (cosine decay to a tenth of it)")
    a("--device", default=default_device(), help="where training runs (under torchrun: each rank's GPU)")
    a("--dtype", default="auto", choices=DTYPES,
      help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32")
    a("--use_wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works without account)")
    a("--wandb_project", default=f"MiniMind-V-{r.stage}", help="Weights & Biases project")
    a("--num_workers", type=int, default=2, help="DataLoader worker processes (image decoding)")
    a("--data_path", default=r.data_path, help="LLaVA-format .json list or .jsonl (default: upstream v1's file, "
                                                "where its README puts it)")
    a("--images_dir", default=r.images_dir, help="directory the records' image names are relative to; a name is "
                                                 "looked up as given, then with upstream's 'COCO_train2014_' prefix")
    a("--val_data_path", default=None, help="held-out LLaVA-format file for the validation loss")
    a("--val_images_dir", default=None, help="images of --val_data_path (None: --images_dir)")
    a("--val_fraction", type=float, default=0.0, help="hold out this share of --data_path's records for the "
                                                       "validation loss instead (chosen by a hash of the record id)")
    a("--eval_interval", type=int, default=500, help="optimizer steps between validation losses (also one at the end)")
    a("--data_index", default=None, help="where record indexes (token lengths, positions) are kept between runs "
                                         "(None: {out_dir}/data_index)")
    a("--ddp", action="store_true", help="use DDP (implied when started by torchrun)")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this")
    a("--warmup_iters", type=int, default=0, help="linear LR warm-up, in optimizer steps")
    a("--log_interval", type=int, default=100, help="optimizer steps between loss logs")
    a("--save_interval", type=int, default=1000, help="optimizer steps between checkpoint saves")
    a("--dim", type=int, default=512, help="decoder width (512: 27M model, 768: 109M model)")
    a("--n_layers", type=int, default=8, help="decoder blocks (8 for dim 512, 16 for dim 768)")
    a("--n_heads", type=int, default=16, help="query heads (upstream: 16)")
    a("--n_kv_heads", type=int, default=8, help="key/value heads shared by the query heads (upstream: 8)")
    a("--max_seq_len", type=int, default=None, help="training sequence length (tokens, 50 per image); the "
      "checkpoint records it, and serving admits it as the context (default: the starting checkpoint's, else "
      f"{r.max_seq_len})")
    a("--use_moe", action="store_true", help="mixture-of-experts feed-forward layers")
    a("--vision_model", default=DEFAULT_VISION_MODEL, help="local CLIP ViT-B/32 directory (Hugging Face layout)")
    a("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer directory")
    a("--init_from", default="auto", help=f"starting weights: auto = {{out_dir}}/{{dim}}[_moe]{r.init_suffix} "
                                           "(.safetensors or .pth), a path, or 'none' for random init")
    a("--seed", type=int, default=1337, help="random seed (weights init, data order)")
    a("--save_format", choices=["safetensors", "pth"], default="safetensors",
      help="weights file format: safetensors, or pth (upstream-style torch.save state dict)")
    a("--keep_last", type=int, default=0, help="also keep the last N step-numbered checkpoints "
                                                "({name}_step{N}) besides the latest (0: only the latest)")
    a("--resume", action="store_true", help="continue the interrupted run in --out_dir exactly where it stopped "
                                            "(model, optimizer, LR schedule, data position, RNGs, wandb run)")
    a("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
      help="torch.compile the model: its first steps are slow while it compiles (~15-40 s on 2 CPU cores), later "
           "ones faster (27M on a 2-core AMX Xeon: +9-12%% in benchmarks/benchmark.py's second epoch, +29%% in a "
           "longer run). auto = on for runs of at least "
           f"{COMPILE_MIN_STEPS} optimizer steps, where a C++ compiler is found on a CPU")
    a("--length_group", type=int, default=64, help="batches formed together from samples sorted by length, so "
                                                   "padding is small (1: plain shuffled batches)")
    a("--feature_cache", default=None, help="image feature cache directory (None: {out_dir}/feature_cache)")
    a("--check_data", nargs="?", const="quick", choices=["quick", "full"], default=None,
      help="check --data_path and its images, print a report and exit (1 if anything is wrong) without training; "
           "quick: records, image headers and file ends, token lengths; full: also decode every image")
    a("--on_bad_sample", choices=["error", "skip"], default="error",
      help="a record or image that cannot be used: error = stop with a message naming it (after saving a "
           "checkpoint to --resume from); skip = leave it out, count it, list it in {name}_skipped.jsonl")
    add_max_image_pixels(p)
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


def fill_feature_cache(datasets, vision_model, cache, args, amp_dtype, rank, world):
    """Encode every not-yet-cached image of the datasets once, split across ranks. Returns (images, newly
    encoded, {path: (problem kind, message)} for the images that could not be decoded, the same on every
    rank)."""
    paths = sorted({p for d in datasets for i in range(len(d)) for p in d.image_paths(i)})
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
    cache.flush()
    if world > 1:  # every rank learns every rank's bad images (they decide together what to do)
        gathered = [None] * world
        dist.all_gather_object(gathered, bad)  # (also: every rank has written its share of the cache)
        bad = {p: b for part in gathered for p, b in part.items()}
        cache.refresh()
    return len(paths), len(todo), bad


def batch_image_features(batch, cache, vision_model, amp_dtype, device):
    """Per-row image features for the model: cached ones read, the rest (decoded by the workers) encoded now
    and cached."""
    flat = cached_features(vision_model, batch["image_keys"], cache, batch["pixel_keys"], batch["pixel_values"],
                           amp_dtype) if batch["image_keys"] else None
    rows, i = [], 0
    for n in batch["image_counts"]:
        rows.append(flat[i:i + n].to(device, torch.float32) if n else None)
        i += n
    return rows


COMPILE_MIN_STEPS = 2000  # --compile auto: enough steps for the compile time (~15-40 s) to pay for itself


def compile_wanted(flag: str, total_steps: int, device) -> bool:
    """--compile on/off as given; auto: on for long runs where torch.compile can build its kernels (on a CPU,
    inductor compiles C++ and needs a C++ compiler)."""
    if flag != "auto":
        return flag == "on"
    if total_steps < COMPILE_MIN_STEPS:
        return False
    if device.type == "cpu":
        import shutil
        return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))
    return device.type == "cuda"


def start_weights_path(recipe: Recipe, args) -> str:
    """The starting weights --init_from names ('auto': the previous stage's output in --out_dir), resolved as
    resolve_checkpoint does; 'none' for random weights."""
    if args.init_from == "none":
        return "none"
    moe = "_moe" if args.use_moe else ""
    return resolve_checkpoint(f"{args.out_dir}/{args.dim}{moe}{recipe.init_suffix}"
                              if args.init_from == "auto" else args.init_from)


def training_length(recipe: Recipe, args, init: str) -> int:
    """The sequence length a run trains at (and --check_data checks at): --max_seq_len, else the length the
    starting checkpoint was trained with (stage 2 trains at stage 1's unless told otherwise), else the recipe's."""
    if args.max_seq_len:
        return args.max_seq_len
    known = trained_context(init)[0] if init != "none" and os.path.exists(init) else None
    return known or recipe.max_seq_len


def make_adamw(params, lr):
    """AdamW with the fused kernel (one pass over all parameters; on the 2-core dev CPU a 27M-model step
    took 20 ms fused, 63 ms with the default per-parameter loop, 105 ms with foreach), else the default."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr)


def save_loss_curve(log, path, title):
    """Training loss and, where the log has it, validation loss against the step, on one plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")  # late differences (0.01 vs 0.003: memorising?) stay visible
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
        args.max_seq_len = training_length(recipe, args, start_weights_path(recipe, args))
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
            if isinstance(e, DataError) and len(e.problems) > DataError.SHOWN:
                e.save_list(Path(args.out_dir) / f"{run_name(recipe, args)}_bad_records.jsonl")
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(1) from None


def run_name(recipe: Recipe, args) -> str:
    """The stem of the run's files in --out_dir: {dim}[_moe]_vlm_{stage}."""
    return f"{args.dim}{'_moe' if args.use_moe else ''}_vlm_{recipe.stage}"


def run(recipe: Recipe, args):
    """Train one stage: the phases below, in order. Returns the checkpoint path."""
    reuse_freed_memory()  # a step's freed blocks serve the next step (model/hardware.py)
    r = Run(recipe, args)
    r.setup()
    r.load_data()
    r.build_optimizer()
    r.resume()
    r.loop()
    return r.finish()


class Run:
    """One training run's state, built phase by phase (see run())."""

    def __init__(self, recipe: Recipe, args):
        self.recipe, self.args = recipe, args
        self.step, self.epoch, self.step_in_epoch, self.start_epoch, self.start_micro = 0, 0, 0, 0, 0
        self.wandb, self.wandb_id, self.log, self.shown = None, None, [], {}

    # -- setup: processes, model, outputs --------------------------------------------------------------------

    def setup(self):
        args, recipe = self.args, self.recipe
        self.ddp, self.rank, self.world, self.device = init_distributed(args)
        self.master = self.rank == 0
        torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        self.amp_dtype = autocast_dtype(self.device.type, args.dtype)
        self.tokenizer = load_tokenizer(args.tokenizer)
        self.cfg = LMConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                            use_moe=args.use_moe, vocab_size=len(self.tokenizer),
                            image_ids=image_token_ids(self.tokenizer))
        self.raw_model = MiniMindVLM(self.cfg)
        self.init = self.load_start_weights(start_weights_path(recipe, args))
        args.max_seq_len = training_length(recipe, args, self.init)
        self.raw_model.to(self.device)
        self.vision_model = load_vision_model(args.vision_model, self.device)
        self.name = run_name(recipe, args)
        out = Path(args.out_dir)
        self.out_path = out / f"{self.name}.{args.save_format}"
        self.resume_path = out / f"{self.name}_resume.pt"
        self.log_path = out / f"{self.name}_log.jsonl"
        self.bad = BadSamples(args.on_bad_sample, out / f"{self.name}_skipped.jsonl", self.master)

    def load_start_weights(self, init):
        if init == "none":
            return init
        if not os.path.exists(init):
            shown = init if Path(init).suffix else f"{init}.safetensors or {init}.pth"
            raise SystemExit(f"starting weights {shown} not found. {self.recipe.init_help}\n"
                             "Or pass --init_from none to start from random weights.")
        load_strict(self.raw_model, read_state_dict(init), allow_missing=self.recipe.allow_missing, where=init)
        return init

    # -- data: records, image features, batches ----------------------------------------------------------------

    def load_data(self):
        args = self.args
        cache_dir = None if args.no_feature_cache else (args.feature_cache or f"{args.out_dir}/feature_cache")
        self.cache = FeatureCache(cache_dir, vision_fingerprint(args.vision_model), writer=f"rank{self.rank}")
        self.dataset, self.val_dataset = dataset, val = self.open_datasets()
        self.bad.report_reading(dataset)
        if val is not None:
            self.bad.report_reading(val, "reading the validation data")
        if cache_dir is not None:
            parts = [d for d in (dataset, val) if d is not None]
            n_images, n_new, bad_images = fill_feature_cache(parts, self.vision_model, self.cache, args,
                                                             self.amp_dtype, self.rank, self.world)
            if self.master:
                print(f"feature cache {self.cache.dir}: {n_images} images, {n_new} newly encoded by rank 0")
            for d in parts:
                self.bad.leave_out_bad_images(d, bad_images)
        if len(dataset) == 0:
            raise DataError([], f"{args.data_path}: no usable records left")
        if val is not None:
            if len(val) == 0:
                raise DataError([], f"{val.data_path}: no usable validation records")
            by_length = np.argsort(-val.lengths, kind="stable").tolist()  # little padding; no randomness
            batches = [by_length[i:i + args.batch_size] for i in range(0, len(by_length), args.batch_size)]
            self.val_batches = batches[self.rank::self.world]
        # One sampler for every case, so a 2-rank run sees exactly the batches of 1 rank with twice the batch.
        lengths = dataset.lengths if args.length_group > 1 else [0] * len(dataset)
        self.sampler = LengthGroupedBatchSampler(lengths, args.batch_size, self.world, self.rank, args.seed,
                                                 args.length_group, args.accumulation_steps)
        self.collate = VLMCollator(pad_id=self.tokenizer.pad_token_id or 0)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=args.num_workers,
                                 collate_fn=self.collate,
                                 worker_init_fn=ignore_sigint, pin_memory=self.device.type == "cuda",
                                 persistent_workers=args.num_workers > 0)
        self.steps_per_epoch = max(1, len(self.loader) // args.accumulation_steps)
        self.total_steps = args.max_steps if args.max_steps > 0 else args.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def open_datasets(self):
        """(training dataset, validation dataset or None). Each file's record index is read from --data_index,
        or built by rank 0 and saved there while the other ranks wait, then read."""
        args = self.args
        index_dir = args.data_index or f"{args.out_dir}/data_index"

        def index_of(path):
            index, how = (load_index(path, self.tokenizer, args.max_seq_len, index_dir, progress=True)
                          if self.master else (None, ""))
            if self.ddp:
                dist.barrier()
            if not self.master:  # rank 0's file, or (a disk rank 0 does not share) our own
                index, how = load_index(path, self.tokenizer, args.max_seq_len, index_dir)
            if self.master:
                print(f"{path}: {index.n_records} records, index {how}")
            return index

        def dataset(index, images_dir, part, rows=None, keep_problem=None):
            d = VLMDataset(index, images_dir, self.tokenizer, args.max_seq_len, self.cache, args.max_image_pixels,
                           rows=rows, problem_filter=keep_problem)
            if self.master:
                print(f"{index.path}: {len(d)} {part} samples; image files in {images_dir}: {d.image_lookup_text()}")
            return d

        if args.val_data_path and args.val_fraction:  # (before any file is read)
            raise SystemExit("--val_data_path and --val_fraction: give one of them")
        if args.val_fraction and not 0 < args.val_fraction < 1:
            raise SystemExit(f"--val_fraction {args.val_fraction}: must be between 0 and 1")
        index = index_of(args.data_path)
        if args.val_data_path:
            val = dataset(index_of(args.val_data_path), args.val_images_dir or args.images_dir, "validation")
            return dataset(index, args.images_dir, "training"), val
        if not args.val_fraction:
            return dataset(index, args.images_dir, "training"), None
        held = held_out(index, args.val_fraction)
        in_val = lambda p: held_out_record(p.id, p.line, args.val_fraction)  # noqa: E731
        return (dataset(index, args.images_dir, "training", np.flatnonzero(~held), lambda p: not in_val(p)),
                dataset(index, args.val_images_dir or args.images_dir, "validation", np.flatnonzero(held), in_val))

    # -- model and optimizer ---------------------------------------------------------------------------------

    def build_optimizer(self):
        args, model = self.args, self.raw_model
        if self.ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.cfg.use_moe)
        self.compiled = compile_wanted(args.compile, self.total_steps, self.device)
        if self.compiled:  # dynamic shapes: batches are padded to their own length, which varies
            model = torch.compile(model, dynamic=True)
        self.model = model
        self.optimizer = make_adamw([p for p in self.raw_model.parameters() if p.requires_grad], args.learning_rate)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        self.layout = {"world": self.world, "batch_size": args.batch_size, "accumulation": args.accumulation_steps}

    # -- resume: position, loss log, skipped list, wandb -------------------------------------------------------

    def resume(self):
        args = self.args
        if args.resume:
            self.step, self.start_epoch, self.start_micro, self.wandb_id = load_resume_state(
                self.resume_path, self.raw_model, self.optimizer, self.scaler, self.layout, self.steps_per_epoch,
                self.master)
        self.bad.start(self.step if args.resume else None)
        if self.ddp:
            dist.barrier()  # rank 0 has rewritten the skipped list before any rank appends to it
        if args.use_wandb and self.master:
            import wandb
            wandb.init(project=args.wandb_project, name=self.name, config=vars(args), dir=args.out_dir,
                       id=self.wandb_id, resume="allow")
            self.wandb, self.wandb_id = wandb, wandb.run.id
        if self.master:
            print(f"{self.recipe.stage}: {self.raw_model.num_parameters() / 1e6:.3f}M parameters (dim {self.cfg.dim}, "
                  f"{self.cfg.n_layers} layers{', MoE' if self.cfg.use_moe else ''}), {len(self.dataset)} samples, "
                  f"{self.world} process(es) x batch {args.batch_size} x accumulation {args.accumulation_steps}, "
                  f"sequences up to {args.max_seq_len} tokens, "
                  f"{self.total_steps} steps, autocast {self.amp_dtype or 'off (fp32)'}, torch.compile "
                  f"{'on' if self.compiled else 'off'}{' (auto)' if args.compile == 'auto' else ''}, start {self.init}")
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            if args.resume and self.log_path.is_file():  # the curve up to the resumed step; later steps are redone
                lines = self.log_path.read_text().splitlines()
                self.log = [r for r in map(json.loads, lines) if r["step"] <= self.step]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self.log))

    # -- the loop ----------------------------------------------------------------------------------------------

    def loop(self):
        args, accumulation = self.args, self.args.accumulation_steps
        self.t0, self.tokens, self.samples, self.loss_sum = time.time(), 0, 0, torch.zeros((), device=self.device)
        self.stop = StopRequest(self.ddp)
        self.filler = filler_row(self.cfg, self.device)
        self.model.train()
        self.progress = tqdm(total=self.total_steps, initial=self.step, desc=self.recipe.stage,
                             disable=not self.master, unit="step")
        self.epoch = self.start_epoch
        for self.epoch in range(self.start_epoch, self.epochs):
            if self.step >= self.total_steps:  # a resumed run that had already finished
                break
            skip = self.start_micro if self.epoch == self.start_epoch else 0
            self.sampler.set_epoch(self.epoch, start=skip)
            self.step_in_epoch = skip // accumulation
            for micro, batch in enumerate(self.loader, start=skip):
                if micro >= self.steps_per_epoch * accumulation:
                    break  # a last, incomplete accumulation group would leak its gradients into the next epoch
                last_micro = (micro + 1) % accumulation == 0
                lr = lr_at(self.step, self.total_steps, args.learning_rate, args.warmup_iters)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.handle_bad_samples(batch)
                input_ids, labels, features = self.inputs(batch)
                sync = self.model.no_sync() if self.ddp and not last_micro else nullcontext()
                with sync, self.autocast:
                    loss = self.model(input_ids, features, labels=labels, loss_only=True).loss / accumulation
                with sync:
                    self.scaler.scale(loss).backward()
                if batch["input_ids"] is not None:  # a filler row's zero loss is not logged
                    self.loss_sum += loss.detach()
                    self.tokens += int(input_ids.numel())
                    self.samples += int(input_ids.shape[0])
                if not last_micro:
                    continue
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), args.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.step_in_epoch += 1
                self.progress.update(1)
                if self.step % args.log_interval == 0 or self.step == self.total_steps:
                    self.log_loss(lr)
                if self.val_dataset is not None and (self.step % args.eval_interval == 0
                                                     or self.step == self.total_steps):
                    self.log_val_loss()
                if self.master and self.step % args.save_interval == 0:
                    self.save()
                    if args.keep_last > 0:
                        keep_step_checkpoint(self.out_path, self.step, args.keep_last)
                if self.master:
                    kill_for_tests(self.step)
                self.stop_if_signalled()
                if self.step >= self.total_steps:
                    break
            if self.step >= self.total_steps:
                break
        self.progress.close()

    def inputs(self, batch):
        """(input_ids, labels, image features) on the device; the filler row when every sample was bad."""
        if batch["input_ids"] is None:
            return self.filler
        features = batch_image_features(batch, self.cache, self.vision_model, self.amp_dtype, self.device)
        return (batch["input_ids"].to(self.device, non_blocking=True),
                batch["labels"].to(self.device, non_blocking=True), features)

    def handle_bad_samples(self, batch, where=None):
        """error: if any rank's micro-batch has a bad sample, every rank stops (rank 0 saves the last finished
        step first, which --resume continues from). skip: the bad samples are listed."""
        if self.args.on_bad_sample == "skip":
            if batch["problems"]:
                self.bad.skipped(batch["problems"], self.step, self.epoch, self.rank)
            return
        found = self.bad.agree(batch["problems"], self.ddp, self.stop.group)
        if found:
            self.progress.close()
            self.save_and_close()
            where = where or f"in the batch of step {self.step + 1}"
            raise DataError(found, f"bad sample(s) {where} (epoch {self.epoch}); saved "
                            f"{self.out_path} and {self.resume_path} at step {self.step}. Fix or remove the record, "
                            "then run the same command with --resume (or add --on_bad_sample skip)")

    def stop_if_signalled(self):
        """SIGINT / SIGTERM (on any rank): save at this step boundary, then exit 128 + the signal."""
        if self.stop.agreed():
            self.save_and_close(f"\nstopped by {self.stop.name} after step {self.step}: saved {self.out_path} and "
                                f"{self.resume_path}; continue with the same command plus --resume")
            raise SystemExit(128 + self.stop.signum)

    def log_loss(self, lr):
        args = self.args
        if self.ddp:  # log the mean over ranks, i.e. the loss of the global batch
            dist.all_reduce(self.loss_sum)
            self.loss_sum /= self.world
        n = args.log_interval if self.step % args.log_interval == 0 else self.step % args.log_interval
        loss = self.loss_sum.item() / n
        self.loss_sum.zero_()
        elapsed = time.time() - self.t0
        rec = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
               "tokens_per_s": self.tokens * self.world / elapsed, "samples_per_s": self.samples * self.world / elapsed,
               "elapsed_s": elapsed}
        if self.device.type == "cuda":
            rec["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        self.write_log(rec, loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def write_log(self, rec, **shown):
        self.log.append(rec)
        if self.master:
            with open(self.log_path, "a") as f:  # written as it goes: a run that dies keeps its curve
                f.write(json.dumps(rec) + "\n")
            self.shown.update(shown)  # the latest loss, lr and validation loss side by side
            self.progress.set_postfix(self.shown)
            if self.wandb:
                self.wandb.log(rec, step=self.step)

    def log_val_loss(self):
        """The validation loss: the mean token loss over the whole validation set, without gradients. Each rank
        takes its share of the batches; loss sums and token counts are added over ranks, so 1 or N ranks give
        the same figure. Bad validation samples are handled as training's are (--on_bad_sample)."""
        self.raw_model.eval()
        sums, problems = torch.zeros(2, dtype=torch.float64), []
        with torch.no_grad():
            for rows in tqdm(self.val_batches, desc="validation", disable=not self.master, leave=False, unit="batch"):
                batch = self.collate([self.val_dataset[i] for i in rows])
                problems += batch["problems"]
                if batch["input_ids"] is None:
                    continue
                input_ids, labels, features = self.inputs(batch)  # (outside autocast, as in training)
                with self.autocast:
                    loss = self.raw_model(input_ids, features, labels=labels, loss_only=True).loss
                n = (labels[:, 1:] != -100).sum()
                sums += torch.stack([loss.double() * n, n.double()]).cpu()
        self.raw_model.train()
        self.handle_bad_samples({"problems": problems}, f"in the validation data at step {self.step}")
        if self.ddp:
            dist.all_reduce(sums, group=self.stop.group)  # a CPU tensor: the gloo group under nccl too
        val_loss = (sums[0] / sums[1].clamp(min=1)).item()
        self.write_log({"step": self.step, "epoch": self.epoch, "val_loss": val_loss, "val_tokens": int(sums[1]),
                        "elapsed_s": time.time() - self.t0}, val_loss=f"{val_loss:.4f}")

    # -- saving and finishing ----------------------------------------------------------------------------------

    def save(self):
        """Weights + sidecar + loss curve, and everything --resume needs (rank 0 only)."""
        save_checkpoint(self.raw_model, self.out_path, self.cfg, extra={
            "stage": self.recipe.stage, "step": self.step, "args": vars(self.args)})
        if self.log:
            save_loss_curve(self.log, self.out_path.with_name(self.name + "_loss.png"), f"{self.name}: loss")
        save_resume_state(self.resume_path, self.raw_model, self.optimizer, self.scaler, self.step, self.epoch,
                          self.step_in_epoch, self.layout, self.wandb_id)

    def save_and_close(self, message=None):
        """Rank 0 saves (and prints the message); then every rank leaves the process group."""
        if self.master:
            self.save()
            if message:
                print(message, flush=True)
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()

    def finish(self):
        if self.master and self.compiled:
            from torch._dynamo.utils import counters
            print(f"torch.compile: {counters['stats']['unique_graphs']} graph(s) compiled")
        self.bad.summary(self.ddp, self.stop.group)
        self.cache.flush()  # features encoded during the loop (images the fill did not cover), if any
        if self.master:
            self.step_in_epoch = 0
            self.save()
            last = [r for r in self.log if "loss" in r][-1]
            val = [r for r in self.log if "val_loss" in r]
            print(f"saved {self.out_path} after {self.step} steps in {time.time() - self.t0:.0f}s; final loss "
                  f"{last['loss']:.4f}" + (f", validation loss {val[-1]['val_loss']:.4f}" if val else "") +
                  f"; loss curve {self.out_path.with_name(self.name + '_loss.png')}")
            if self.wandb:
                self.wandb.finish()
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()
        return self.out_path
