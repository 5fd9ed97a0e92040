"""Training speed: upstream v1's own 1-pretrain_vlm.py against this project's, each the whole script in a process
of its own, on the same data, random CLIP tower, model size, batch and data-loader workers.

  python benchmarks/train.py --upstream_dir /tmp/upstream_bench/mmv1      # 27M, batch 16, 80 and 480 records
  python benchmarks/train.py --size 109m --device cuda                    # ours alone, on data generated here
  python benchmarks/train.py --quick                                      # tiny model, few records: machinery

Steady-state samples/s: each script runs once on the first N1 records and once on the first N2 (--records N1 N2);
(N2 - N1) / (wall(N2) - wall(N1)), so start-up (imports, loading the tower, indexing) cancels.
  upstream-own  v1's script in its own venv (--upstream_python; ../shared/bench/upstream_v1_harness.sh builds both),
                as its README runs it; on a CPU it trains in fp32 and encodes every image at every step
  ours-cold     this project's 1-pretrain_vlm.py (--dtype auto) with an empty feature cache: every image is
                encoded once, in batches, before the first step
  ours-warm     the same with every image's features already cached: a later epoch, or stage 2 on the same images
  ours-compiled-cold, ours-compiled-warm   the same with --compile, which --compile auto turns on for runs of
                2000 steps or more (its compile time is start-up here, and cancels)
Before the timed runs of ours, an untimed one fills the disk caches (images, torch.compile's kernels), so the
first timed run does not pay for them alone.
Achieved TFLOP/s: the model FLOPs of a sample (below) times samples/s, beside this machine's measured matmul
peak in the dtype the run multiplies in.

The data: --upstream_dir's own (dataset/pretrain_data_N.json, dataset/pretrain_images/,
model/clip_model/clip-vit-base-patch32: what the harness generates), or else a set made here in the same layout
(one coloured shape an image, a caption each, a random tower). On CUDA the table adds our runs' peak GPU memory.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ENV, ROOT, SIZES, matmul_peak, run_benchmark  # noqa: E402

from model.cli import HelpFormatter, default_device  # noqa: E402
from model.hardware import autocast_dtype  # noqa: E402

VISION_PARAMS = 87.8e6  # CLIP ViT-B/32's vision tower: 2 x this x 50 tokens FLOPs to encode an image
UPSTREAM_MAX_SEQ_LEN = 200  # v1 pads every sample to max_seq_len - 1 tokens and runs the head on all of them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--upstream_dir", help="an upstream v1 tree (upstream_v1_harness.sh's mmv1/): its own script is "
                   "timed, and its generated data and tower are used for both")
    p.add_argument("--upstream_python", help="the Python that runs it (default: ../venv/bin/python beside it)")
    p.add_argument("--skip_upstream", action="store_true", help="use --upstream_dir's data, but time only ours")
    p.add_argument("--quick", action="store_true", help="tiny model, batch 4, records 8 and 24, no --compile rows")
    p.add_argument("--no_compiled", action="store_true", help="leave out the --compile rows")
    p.add_argument("--device", default=default_device(), help="where our script trains (upstream: cpu)")
    p.add_argument("--size", choices=sorted(SIZES), default="27m", help="decoder config (upstream: MMV_DIM/MMV_LAYERS)")
    p.add_argument("--records", type=int, nargs=2, default=[80, 480], metavar=("N1", "N2"),
                   help="record counts of the two runs (pretrain_data_N.json must exist for both)")
    p.add_argument("--batch_size", type=int, default=16, help="both scripts' --batch_size")
    p.add_argument("--num_workers", type=int, default=1, help="both scripts' --num_workers")
    p.add_argument("--dtype", default="auto", help="our --dtype (upstream trains in fp32 on a CPU)")
    p.add_argument("--extra", default="", help="more flags for our script (e.g. --compile)")
    p.add_argument("--workdir", help="outputs and caches (default: a new temporary directory)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.records, args.batch_size, args.no_compiled = "tiny", [8, 24], 4, True
    return args


# -- data -------------------------------------------------------------------------------------------------------


def make_quick_data(root, n):
    """n records in v1's layout under root: dataset/pretrain_images/*.jpg (a coloured shape each), and a random
    CLIP tower in random-clip/ (the caller writes the record lists)."""
    from PIL import Image, ImageDraw
    from model.vision import make_random_vision_model
    images = os.path.join(root, "dataset", "pretrain_images")
    os.makedirs(images, exist_ok=True)
    records = []
    for i in range(n):
        colour = [(200, 30, 30), (30, 160, 60), (40, 70, 210)][i % 3]
        im = Image.new("RGB", (224, 224), (230, 230, 225))
        ImageDraw.Draw(im).ellipse([40 + i % 50, 50, 170, 180 - i % 40], fill=colour)
        name = f"img_{i:06d}.jpg"
        im.save(os.path.join(images, name))
        records.append({"id": name[:-4], "image": name, "conversations": [
            {"from": "human", "value": "Describe the picture briefly.\n<image>"},
            {"from": "gpt", "value": f"A {['red', 'green', 'blue'][i % 3]} shape on a pale background, number {i}."}]})
    make_random_vision_model(os.path.join(root, "random-clip"))
    return records


def data_paths(root, n):
    return os.path.join(root, "dataset", f"pretrain_data_{n}.json"), os.path.join(root, "dataset", "pretrain_images")


def tower_path(root):
    """The CLIP tower of a data tree: upstream's place for it, or make_quick_data's random one."""
    upstream = os.path.join(root, "model", "clip_model", "clip-vit-base-patch32")
    return upstream if os.path.isdir(upstream) else os.path.join(root, "random-clip")


def tokens_per_sample(json_path, images, tokenizer_dir):
    """(mean real tokens, mean labelled tokens) per sample of our script's rendering of the records."""
    from model.tokenizer import load_tokenizer
    from trainer.data_index import open_dataset
    tok = load_tokenizer(tokenizer_dir)
    ds = open_dataset(json_path, images, tok, 640, index_dir=tempfile.mkdtemp(prefix="bench-index-"))
    lengths = [int(n) for n in ds.lengths]
    labels = [sum(t != -100 for t in ds[i]["labels"][1:]) for i in range(min(len(ds), 64))]
    return sum(lengths) / len(lengths), sum(labels) / len(labels)


def train_flops(size, tokens, head_rows, encode):
    """Model FLOPs of one training sample: 6 x weights x tokens for the matmuls, causal attention, the output head
    over head_rows positions, the projector, and (encode) the tower's forward pass over its image."""
    from model.LMConfig import LMConfig
    c = LMConfig(**SIZES[size])
    hd = c.dim // c.n_heads
    attn = c.dim * c.n_heads * hd * 2 + c.dim * c.n_kv_heads * hd * 2
    ffn = 3 * c.dim * c.hidden_dim
    flops = 6 * c.n_layers * (attn + ffn) * tokens + 6 * c.n_layers * c.dim * tokens ** 2
    flops += 6 * c.dim * c.vocab_size * head_rows + 6 * c.vision_dim * c.dim * 50
    return flops + (2 * VISION_PARAMS * 50 if encode else 0)


# -- runs -------------------------------------------------------------------------------------------------------


def timed(argv, cwd, env, log):
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, argv[:3]))} ... failed ({p.returncode}); {log}:\n{tail}")
    return wall


def upstream_run(args, root, n, work):
    py = args.upstream_python or os.path.join(os.path.dirname(os.path.abspath(root)), "venv", "bin", "python")
    py = py if os.path.isfile(py) else sys.executable
    cfg = SIZES[args.size]
    env = dict(ENV, MMV_DIM=str(cfg["dim"]), MMV_LAYERS=str(cfg["n_layers"]), PYTHONPATH=root)
    out = tempfile.mkdtemp(prefix="upstream-out-", dir=work)
    return timed([py, "1-pretrain_vlm.py", "--epochs", 1, "--batch_size", args.batch_size, "--device", "cpu",
                  "--num_workers", args.num_workers, "--data_path", f"./dataset/pretrain_data_{n}.json",
                  "--log_interval", 100000, "--save_interval", 100000, "--out_dir", out], root, env,
                 os.path.join(work, f"upstream_{n}.log"))


def ours_run(args, root, n, work, cache, name, flags=()):
    data, images = data_paths(root, n)
    cfg = SIZES[args.size]
    out = tempfile.mkdtemp(prefix="ours-out-", dir=work)
    argv = [sys.executable, os.path.join(ROOT, "1-pretrain_vlm.py"), "--data_path", data, "--images_dir", images,
            "--vision_model", tower_path(root),
            "--init_from", "none", "--dim", cfg["dim"], "--n_layers", cfg["n_layers"], "--n_heads", cfg["n_heads"],
            "--n_kv_heads", cfg["n_kv_heads"], "--batch_size", args.batch_size, "--num_workers", args.num_workers,
            "--epochs", 1, "--dtype", args.dtype, "--device", args.device, "--out_dir", out, "--feature_cache", cache,
            "--data_index", os.path.join(work, "index"), "--log_interval", 100000, "--save_interval", 100000]
    wall = timed(argv + list(flags) + args.extra.split(), ROOT, ENV, os.path.join(work, f"{name}_{n}.log"))
    peaks = [r["peak_gpu_memory_mb"] for path in glob.glob(os.path.join(out, "*_log.jsonl"))
             for r in map(json.loads, open(path)) if "peak_gpu_memory_mb" in r]  # logged on CUDA
    return wall, max(peaks, default=None)


def steady(runs, n1, n2):
    """{n: wall seconds} or {n: (wall seconds, peak GPU MB)} -> the row."""
    walls = {n: r[0] if isinstance(r, tuple) else r for n, r in runs.items()}
    row = {"samples_per_s": (n2 - n1) / (walls[n2] - walls[n1]), "wall_s": walls}
    peaks = [r[1] for r in runs.values() if isinstance(r, tuple) and r[1] is not None]
    if peaks:
        row["peak_gpu_memory_mb"] = max(peaks)
    return row


def measure(args):
    work = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    os.makedirs(work, exist_ok=True)
    n1, n2 = args.records
    root = args.upstream_dir
    if not root:
        root = os.path.join(work, "data")
        if not all(os.path.isfile(data_paths(root, n)[0]) for n in (n1, n2)):
            records = make_quick_data(root, n2)
            for n in (n1, n2):
                with open(data_paths(root, n)[0], "w") as f:
                    json.dump(records[:n], f, ensure_ascii=False)
    root = os.path.abspath(root)
    for n in (n1, n2):
        if not os.path.isfile(data_paths(root, n)[0]):
            raise SystemExit(f"{data_paths(root, n)[0]} not found (upstream_v1_harness.sh makes 16, 80 and 480)")
    rows = {}
    if args.upstream_dir and not args.skip_upstream:
        rows["upstream-own"] = steady({n: upstream_run(args, root, n, work) for n in (n1, n2)}, n1, n2)
        print(f"  upstream-own: {rows['upstream-own']['samples_per_s']:.2f} samples/s", file=sys.stderr, flush=True)
    warm_cache = os.path.join(work, "cache-warm")
    variants = [("ours", ["--compile", "off"])] + ([] if args.no_compiled else [("ours-compiled", ["--compile", "on"])])
    for name, flags in variants:
        ours_run(args, root, n2, work, warm_cache, f"{name}-fill", flags)  # fills the disk caches; not timed
        cold = {}
        for n in (n1, n2):  # each cold run starts from an empty feature cache
            cache = os.path.join(work, f"cache-cold-{name}-{n}")
            shutil.rmtree(cache, ignore_errors=True)
            cold[n] = ours_run(args, root, n, work, cache, f"{name}-cold", flags)
        rows[f"{name}-cold"] = steady(cold, n1, n2)
        rows[f"{name}-warm"] = steady({n: ours_run(args, root, n, work, warm_cache, f"{name}-warm", flags)
                                       for n in (n1, n2)}, n1, n2)
        print(f"  {name}: cold {rows[f'{name}-cold']['samples_per_s']:.2f}, warm "
              f"{rows[f'{name}-warm']['samples_per_s']:.2f} samples/s", file=sys.stderr, flush=True)

    tokens, labelled = tokens_per_sample(*data_paths(root, n2), os.path.join(ROOT, "model", "minimind_tokenizer"))
    amp = autocast_dtype(torch.device(args.device).type, args.dtype)
    peaks = {"fp32": matmul_peak(args.device, torch.float32), "bf16": matmul_peak(args.device, torch.bfloat16, (1024, 2048), 4)}
    flops = {"upstream-own": train_flops(args.size, UPSTREAM_MAX_SEQ_LEN - 1, UPSTREAM_MAX_SEQ_LEN - 1, True),
             "cold": train_flops(args.size, tokens, labelled, True), "warm": train_flops(args.size, tokens, labelled, False)}
    base = rows.get("upstream-own", {}).get("samples_per_s")
    for name, r in rows.items():
        peak = "fp32" if name == "upstream-own" or amp is None else "bf16"
        f = flops[name if name in flops else name.rsplit("-", 1)[1]]
        r["gflop_per_sample"] = f / 1e9
        r["tflops_per_s"] = f * r["samples_per_s"] / 1e12
        r["peak_tflops_per_s"], r["peak_dtype"] = peaks[peak], peak
        r["share_of_peak"] = r["tflops_per_s"] / peaks[peak]
        r["vs_upstream_own"] = r["samples_per_s"] / base if base else None
    return {"size": args.size, "device": args.device, "records": [n1, n2], "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "dtype": args.dtype, "autocast": str(amp).replace("torch.", "") if amp else "fp32",
            "tokens_per_sample": tokens, "labelled_per_sample": labelled, "extra_flags": args.extra,
            "matmul_peak_tflops": peaks, "runs": rows}


def table(res) -> str:
    out = [f"training on {res['device']}, {res['size']} config, batch {res['batch_size']}, {res['num_workers']} loader "
           "worker(s), "
           f"steady state over records {res['records'][0]} -> {res['records'][1]}; ours autocast {res['autocast']}; "
           f"matmul peak fp32 {res['matmul_peak_tflops']['fp32']:.2f}, bf16 {res['matmul_peak_tflops']['bf16']:.2f} "
           "TFLOP/s",
           f"{'run':<20}{'samples/s':>10}{'x upstream':>11}{'GFLOP/sample':>13}{'TFLOP/s':>9}{'of peak':>9}"]
    for name, r in res["runs"].items():
        vs = f"{r['vs_upstream_own']:.1f}" if r.get("vs_upstream_own") else "-"
        gpu = f"  peak GPU {r['peak_gpu_memory_mb']:.0f} MB" if "peak_gpu_memory_mb" in r else ""
        out.append(f"{name:<20}{r['samples_per_s']:>10.2f}{vs:>11}{r['gflop_per_sample']:>13.1f}"
                   f"{r['tflops_per_s']:>9.3f}{r['share_of_peak']:>8.1%} {r['peak_dtype']}{gpu}")
    return "\n".join(out)


def main(argv=None):
    return run_benchmark(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
