"""ONNX (onnxruntime, no PyTorch in the process) against the PyTorch engine, on the same CPU, model and image:
tokens/s after the first, first-token latency (image encode + prompt) and peak resident memory, each runtime in
a fresh process, alternated, median of --repeats.

  python benchmarks/onnx_decode.py                        # the 27M config, fp32, 128 tokens
  python benchmarks/onnx_decode.py --size tiny --tokens 16 --repeats 1     # checks the machinery only

A seeded random model of the chosen config and a seeded random CLIP tower are exported with
`export_model.py --onnx`; both runtimes decode greedily with the end-of-answer id ignored, so every run
produces --tokens tokens. The ONNX side is scripts/onnx_chat.py --benchmark. The PyTorch side is ChatEngine
loaded with `--dtype float32`, which is what the ONNX graphs compute -- the like-for-like comparison -- and not
the engine's default (`--dtype auto`: int8 decoding products on a CPU, bf16 where the CPU has it); the engine
picks its own row blocking at load (model/batch_invariance.py). bf16 is in BENCHMARKS.md's one-stream table,
and the engine's other dtypes are in benchmarks/decode.py.

Prints a table, then one JSON object as the last line (also written to --out), with the machine it ran on
(benchmarks/harness.py's record).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SIZES, in_fresh_process, random_model_files, run_benchmark, run_script  # noqa: E402

from model.cli import HelpFormatter  # noqa: E402

PROMPT = "Describe this image."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="27m", help="decoder config")
    p.add_argument("--tokens", type=int, default=128, help="answer tokens per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per runtime (the median is reported)")
    p.add_argument("--workdir", help="checkpoint, tower and export (default: a new temporary directory)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def pytorch_answer(ckpt, tower, image, tokens):
    """In a fresh process: one greedy answer of the engine in fp32, timed as scripts/onnx_chat.py --benchmark
    times its own (from the image's encoding to the last token)."""
    from model.engine import ChatEngine
    from model.images import read_image
    engine = ChatEngine.load(ckpt, tower, device="cpu", dtype="float32")
    start = time.perf_counter()
    features = engine.encode([read_image(image)])
    generation = engine.generate([{"role": "user", "content": f"<image>\n{PROMPT}"}], features,
                                 max_new_tokens=tokens, temperature=0, top_p=None)
    first = None
    for _ in generation:
        if first is None:
            first, n_first = time.perf_counter(), generation.completion_tokens
    end = time.perf_counter()
    return {"tokens": generation.completion_tokens, "first_token_s": first - start,
            "tokens_per_s": (generation.completion_tokens - n_first) / (end - first)}


def onnx_answer(export_dir, image, tokens):
    """scripts/onnx_chat.py --benchmark in a process of its own, which never imports torch; its JSON line."""
    result, _, _ = run_script(["scripts/onnx_chat.py", "--export", export_dir, "--image", image, "--prompt", PROMPT,
                               "--benchmark", tokens])
    return result


def pytorch_run(ckpt, tower, image, tokens):
    result, peak_rss_mib = in_fresh_process(pytorch_answer, ckpt, tower, image, tokens)
    return dict(result, peak_rss_mib=peak_rss_mib)


def exported_model(size, workdir):
    """(checkpoint, tower, export directory, image): a seeded random model, exported once, and a noise image."""
    import torch
    from PIL import Image

    from export_model import export
    work, ckpt, tower, _, _ = random_model_files(size, workdir, "bench-onnx-")
    out = os.path.join(work, f"export_{size}")
    if not os.path.isfile(os.path.join(out, "onnx", "decoder.onnx")):
        export(ckpt, out, vision_model=tower, onnx=True)
    image = os.path.join(work, "noise.png")
    Image.fromarray((torch.rand(224, 224, 3, generator=torch.Generator().manual_seed(1)) * 255)
                    .to(torch.uint8).numpy()).save(image)
    return ckpt, tower, out, image


def measure(args) -> dict:
    """--repeats runs of each runtime, alternated (a noisy neighbour slows both alike), and their medians."""
    ckpt, tower, export_dir, image = exported_model(args.size, args.workdir)
    run = {"onnxruntime": lambda: onnx_answer(export_dir, image, args.tokens),
           "pytorch": lambda: pytorch_run(ckpt, tower, image, args.tokens)}
    runs = {name: [] for name in run}
    for _ in range(args.repeats):
        for name in run:
            runs[name].append(run[name]())
    return {"size": args.size, "tokens": args.tokens, "repeats": args.repeats, "runtimes": {
        name: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "first_token_s", "peak_rss_mib")}
        | {"torch_imported": any(r.get("torch_imported", True) for r in rs)} for name, rs in runs.items()}}


def table(res) -> str:
    lines = [f"one stream, {res['size']} config, fp32, {res['tokens']} tokens, median of {res['repeats']}",
             f"{'runtime':<12} {'tok/s':>7} {'first token':>11} {'peak RSS':>9} {'torch in process':>16}"]
    for name, r in res["runtimes"].items():
        lines.append(f"{name:<12} {r['tokens_per_s']:7.1f} {r['first_token_s'] * 1e3:9.0f}ms "
                     f"{r['peak_rss_mib']:6.0f}MiB {str(r['torch_imported']):>16}")
    return "\n".join(lines)


def main(argv=None):
    return run_benchmark(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
