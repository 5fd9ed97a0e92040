"""ONNX (onnxruntime, no PyTorch in the process) against the PyTorch engine, on the same CPU, model and image:
tokens/s after the first, first-token latency (image encode + prompt) and peak resident memory, each runtime in
a fresh process, alternated, median of --repeats.

  python benchmarks/onnx_decode.py                        # the 27M config, fp32, 128 tokens
  python benchmarks/onnx_decode.py --size tiny --tokens 16 --repeats 1     # checks the machinery only

A seeded random model of the chosen config and a seeded random CLIP tower are exported with
`export_model.py --onnx`; both runtimes decode greedily with the end-of-answer id ignored, so every run
produces --tokens tokens. PyTorch runs ChatEngine in fp32 with one row per step (--row_block 1: what ONNX
computes) -- the like-for-like comparison; bf16 is in BENCHMARKS.md's one-stream table.

Prints a table, then one JSON object as the last line (also written to --out).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, SIZES, random_model_files, record  # noqa: E402

from model.cli import HelpFormatter  # noqa: E402

# The PyTorch side, in its own process: the engine, greedy, timed like scripts/onnx_chat.py --benchmark.
TORCH_RUN = """
import json, sys, time
from model.engine import ChatEngine
from model.images import read_image
ckpt, tower, image, n = sys.argv[1:5]
engine = ChatEngine.load(ckpt, tower, device="cpu", dtype="float32", row_block=1)
start = time.perf_counter()
features = engine.encode([read_image(image)])
generation = engine.generate([{"role": "user", "content": "<image>\\nDescribe this image."}], features,
                             max_new_tokens=int(n), temperature=0, top_p=None)
first = None
for _ in generation:
    if first is None:
        first, n_first = time.perf_counter(), generation.completion_tokens
end = time.perf_counter()
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"tokens": generation.completion_tokens, "first_token_s": first - start,
                  "tokens_per_s": (generation.completion_tokens - n_first) / (end - first),
                  "peak_rss_mib": int(hwm) / 1024}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="27m", help="decoder config")
    p.add_argument("--tokens", type=int, default=128, help="answer tokens per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per runtime (the median is reported)")
    p.add_argument("--workdir", help="checkpoint, tower and export (default: a new temporary directory)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def last_json(cmd):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    import torch
    from PIL import Image

    from export_model import export
    work, ckpt, tower, _, _ = random_model_files(args.size, args.workdir, "bench-onnx-")
    out = os.path.join(work, f"export_{args.size}")
    if not os.path.isfile(os.path.join(out, "onnx", "decoder.onnx")):
        export(ckpt, out, vision_model=tower, onnx=True)
    image = os.path.join(work, "noise.png")
    Image.fromarray((torch.rand(224, 224, 3, generator=torch.Generator().manual_seed(1)) * 255)
                    .to(torch.uint8).numpy()).save(image)
    commands = {"onnxruntime": [sys.executable, "scripts/onnx_chat.py", "--export", out, "--image", image,
                                "--prompt", "Describe this image.", "--benchmark", str(args.tokens)],
                "pytorch": [sys.executable, "-c", TORCH_RUN, ckpt, tower, image, str(args.tokens)]}
    runs = {name: [] for name in commands}
    for _ in range(args.repeats):  # alternated: a noisy neighbour slows both alike
        for name, cmd in commands.items():
            runs[name].append(last_json(cmd))
    res = {"size": args.size, "tokens": args.tokens, "repeats": args.repeats, "runtimes": {
        name: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "first_token_s", "peak_rss_mib")}
        | {"torch_imported": any(r.get("torch_imported", True) for r in rs)} for name, rs in runs.items()}}
    print(f"one stream, {args.size} config, fp32, {args.tokens} tokens, median of {args.repeats}")
    print(f"{'runtime':<12} {'tok/s':>7} {'first token':>11} {'peak RSS':>9} {'torch in process':>16}")
    for name, r in res["runtimes"].items():
        print(f"{name:<12} {r['tokens_per_s']:7.1f} {r['first_token_s'] * 1e3:9.0f}ms {r['peak_rss_mib']:6.0f}MiB "
              f"{str(r['torch_imported']):>16}")
    record(res, args.out)


if __name__ == "__main__":
    main()
