"""One stream's decoding speed: upstream v1's own code against this project's engine, each variant in a process
of its own and on its main thread (as the scripts run them), on the same seeded random weights, prompt and image
features, greedy.

  python benchmarks/decode.py --upstream_dir /tmp/upstream_bench/mmv1     # 27M, 128 tokens, 3 answers each
  python benchmarks/decode.py --size tiny --tokens 16 --repeats 1         # the machinery only

Variants:
  upstream-own   (--upstream_dir: an upstream v1 checkout, e.g. the one ../shared/bench/upstream_v1_harness.sh
                 builds) its model/model.py's Transformer.generate, imported unchanged, loaded with the same
                 weights (strict), called under torch.no_grad() and streamed as its 3-eval_chat.py streams it (the
                 whole answer decoded after every token); fp32, which is what v1 runs on a CPU
  engine-DTYPE   ChatEngine.load(dtype=DTYPE) answering through Generation, as 3-eval_chat.py does: auto (the
                 default, model/hardware.py's rule), float32, bfloat16 (where the CPU has it) and int8
  steps-DTYPE    that engine's decoding steps alone (Scheduler.decode_step in a bare loop: no Generation, no
                 detokenizer) on the main thread of a bare process: the ceiling the engine's own answers are
                 compared with
tokens/s counts the tokens after the first; each variant reports the median of --repeats answers, and its first-
token latency (prompt with one image's features; the image's encoding is not included).

Prints a table, then one JSON line (also written to --out).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, SIZES, in_fresh_process, random_model_files, run_benchmark  # noqa: E402

from model.cli import HelpFormatter  # noqa: E402
from model.hardware import cpu_has_fast_bf16  # noqa: E402
from model.LMConfig import IMAGE_MARKER  # noqa: E402

MESSAGES = [{"role": "user", "content": f"{IMAGE_MARKER}\nDescribe this image."}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="27m", help="decoder config")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    p.add_argument("--repeats", type=int, default=3, help="timed answers per variant (the median is reported)")
    p.add_argument("--dtypes", nargs="+", help="engine dtypes (default: auto float32 int8, and bfloat16 where the "
                   "CPU has native bf16)")
    p.add_argument("--upstream_dir", help="an upstream v1 checkout (commit b671c1a): its own generate is timed too")
    p.add_argument("--workdir", help="checkpoint and random tower (default: a new temporary directory)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def image_features():
    return torch.randn(1, 50, 768, generator=torch.Generator().manual_seed(0))


def engine_answers(ckpt, tower, dtype, tokens, repeats):
    """In a fresh process: [(tokens/s after the first, first-token seconds)] of `repeats` greedy answers."""
    from model.engine import ChatEngine
    engine = ChatEngine.load(ckpt, tower, device="cpu", dtype=dtype)
    feats = image_features()

    def answer(n):
        gen = engine.generate(MESSAGES, feats, max_new_tokens=n, temperature=0, top_p=None, seed=0)
        t0, first = time.perf_counter(), None
        for _ in gen:
            if first is None:
                first, n_first = time.perf_counter(), gen.completion_tokens
        end = time.perf_counter()
        return (gen.completion_tokens - n_first) / (end - first), first - t0
    answer(4)  # warm-up
    return [answer(tokens) for _ in range(repeats)], engine.plan.describe()


def engine_steps(ckpt, tower, dtype, tokens, repeats):
    """In a fresh process: [steps/s] of the engine's decoding step alone, one request, on the main thread."""
    from model.engine import ChatEngine
    engine = ChatEngine.load(ckpt, tower, device="cpu", dtype=dtype)
    runs = []
    for _ in range(repeats + 1):  # the first is a warm-up
        r = engine.generate(MESSAGES, image_features(), max_new_tokens=tokens + 1, temperature=0, top_p=None).request
        sched = engine.scheduler()
        sched._prefill([r])
        t = time.perf_counter()
        for _ in range(tokens - 1):
            sched.decode_step([r])
        runs.append((tokens - 1) / (time.perf_counter() - t))
    return runs[1:]


def load_upstream_model(upstream_dir, ckpt, cfg):
    """Upstream v1's own Transformer (from upstream_dir/model/, imported as the package `upstream_v1`, unchanged)
    holding the checkpoint's weights: the parameter names are the same, so they load with strict=True."""
    import importlib.util
    import types
    from model.checkpoint import read_safetensors
    pkg = types.ModuleType("upstream_v1")
    pkg.__path__ = [os.path.join(upstream_dir, "model")]
    sys.modules["upstream_v1"] = pkg
    for name in ("LMConfig", "model"):  # model.py imports .LMConfig
        path = os.path.join(upstream_dir, "model", f"{name}.py")
        if not os.path.isfile(path):
            raise SystemExit(f"--upstream_dir: {path} not found (an upstream v1 checkout has model/{name}.py)")
        spec = importlib.util.spec_from_file_location(f"upstream_v1.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    ucfg = sys.modules["upstream_v1.LMConfig"].LMConfig(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len, image_ids=list(cfg.image_ids))
    model = sys.modules["upstream_v1.model"].Transformer(ucfg).eval()
    model.load_state_dict(read_safetensors(ckpt), strict=True)
    return model


def upstream_answers(upstream_dir, ckpt, size, tokens, repeats):
    """In a fresh process: [(tokens/s after the first, first-token seconds)] of upstream v1's own generate."""
    from model.tokenizer import DEFAULT_TOKENIZER, build_prompt, image_token_ids, load_tokenizer
    from model.LMConfig import LMConfig
    tok = load_tokenizer(os.path.join(ROOT, DEFAULT_TOKENIZER))
    cfg = LMConfig(**SIZES[size], vocab_size=len(tok), image_ids=image_token_ids(tok))
    model = load_upstream_model(upstream_dir, ckpt, cfg)
    prompt = torch.tensor([tok(build_prompt(MESSAGES), add_special_tokens=False).input_ids])
    feats = image_features()

    def answer(n):
        t0, first, count = time.perf_counter(), None, 0
        with torch.no_grad():  # as its 3-eval_chat.py calls it
            for y in model.generate(prompt, tok.eos_token_id, prompt.shape[1] + n + 1, temperature=0.0,
                                    image_encoders=feats):
                tok.decode(y[0].tolist())  # its 3-eval_chat.py decodes the whole answer after every token
                count = y.shape[1]
                if first is None:
                    first = time.perf_counter()
        return (count - 1) / (time.perf_counter() - first), first - t0
    answer(4)
    return [answer(tokens) for _ in range(repeats)]


def measure(args):
    """The section as benchmark.py runs it: a dict of variants (each measured in a fresh process)."""
    _, ckpt, tower, cfg, _ = random_model_files(args.size, args.workdir, "bench-decode-")
    dtypes = args.dtypes or (["auto", "float32", "int8"] + (["bfloat16"] if cpu_has_fast_bf16() else []))
    rows = {}
    if args.upstream_dir:
        runs, rss = in_fresh_process(upstream_answers, os.path.abspath(args.upstream_dir), ckpt, args.size,
                                     args.tokens, args.repeats)
        rows["upstream-own"] = summarize(runs, rss, "fp32 (v1's own code)")
    for dtype in dtypes:
        (runs, plan), rss = in_fresh_process(engine_answers, ckpt, tower, dtype, args.tokens, args.repeats)
        rows[f"engine-{dtype}"] = summarize(runs, rss, plan)
        steps, _ = in_fresh_process(engine_steps, ckpt, tower, dtype, args.tokens, args.repeats)
        rows[f"engine-{dtype}"]["bare_steps_per_s"] = statistics.median(steps)
    base = rows.get("upstream-own", {}).get("tokens_per_s")
    for r in rows.values():
        r["vs_upstream_own"] = r["tokens_per_s"] / base if base else None
        if "bare_steps_per_s" in r:
            r["vs_bare_steps"] = r["tokens_per_s"] / r["bare_steps_per_s"]
    return {"size": args.size, "tokens": args.tokens, "repeats": args.repeats, "variants": rows}


def summarize(runs, rss, what):
    return {"tokens_per_s": statistics.median(r[0] for r in runs), "first_token_s": statistics.median(r[1] for r in runs),
            "runs": [r[0] for r in runs], "peak_rss_mib": rss, "weights": what}


def table(res) -> str:
    out = [f"one stream, {res['size']} config, {res['tokens']} greedy tokens after an image, median of {res['repeats']}",
           f"{'variant':<18}{'weights':<32}{'tok/s':>8}{'x upstream':>11}{'first token':>12}{'bare steps/s':>13}"
           f"{'of them':>8}{'peak MiB':>9}"]
    for name, r in res["variants"].items():
        vs = f"{r['vs_upstream_own']:.2f}" if r.get("vs_upstream_own") else "-"
        steps = f"{r['bare_steps_per_s']:.1f}" if "bare_steps_per_s" in r else "-"
        share = f"{r['vs_bare_steps']:.0%}" if "vs_bare_steps" in r else "-"
        out.append(f"{name:<18}{r['weights']:<32}{r['tokens_per_s']:>8.1f}{vs:>11}{r['first_token_s'] * 1e3:>10.0f}ms"
                   f"{steps:>13}{share:>8}{r['peak_rss_mib']:>9.0f}")
    return "\n".join(out)


def main(argv=None):
    return run_benchmark(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
