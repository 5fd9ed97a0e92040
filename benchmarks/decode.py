"""Single-stream decoding speed of the inference engine, lever by lever, against upstream v1's algorithm and
against the weight-reading bound.

  python scripts/benchmark_decode.py                 # the 27M config (512x8), 128 new tokens, 3 repeats
  python scripts/benchmark_decode.py --size tiny --tokens 16 --repeats 1    # checks the machinery only

A seeded random model of the chosen config is saved as a checkpoint and loaded the way users load one
(ChatEngine.load, with a seeded random CLIP tower); answers stream through ChatEngine.generate / Generation
with greedy decoding, from a prompt with one image's features. Variants, in the same process, alternated:
  upstream  upstream v1's decoding loop (scripts/benchmark.py's decode_naive): KV cache and ids grown by
            torch.cat, each piece by re-decoding the whole answer; fp32 weights
  upstream-own  (--upstream_dir) upstream v1's own Transformer.generate from that checkout, same weights
  fp32      ChatEngine.load(dtype="float32"): fp32 weights
  fp32-1row the same with row_block=1 (CPU only): one row per step instead of 4, faster, but an answer may then
            differ in rounding between running alone and batched
  bf16      ChatEngine.load(dtype="bfloat16"): bf16 decoder and tower weights (only where the CPU/GPU has native
            bf16; --dtype auto picks it there)
tokens/s counts tokens after the first; each variant's median over the repeats is reported. The bound is
the weights' bytes in the variant's dtype divided by the measured copy bandwidth: one stream reads every
weight once per token. "products-only" times just the weight products of a token (one row through every
matrix): the ceiling the matrix kernels themselves set.

Prints a table, then one JSON object as the last line (also written to --out).
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from benchmark import SIZES, decode_naive, memory_bandwidth, print_json, random_model_files  # noqa: E402
from model.checkpoint import load_vlm, read_safetensors  # noqa: E402
from model.cli import HelpFormatter, default_device  # noqa: E402
from model.engine import ChatEngine  # noqa: E402
from model.LMConfig import IMAGE_MARKER  # noqa: E402
from model.hardware import autocast_dtype  # noqa: E402

MESSAGES = [{"role": "user", "content": f"{IMAGE_MARKER}\nDescribe this image."}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="27m", help="decoder config")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    p.add_argument("--repeats", type=int, default=3, help="timed answers per variant (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default=default_device(), help="device")
    p.add_argument("--workdir", help="checkpoint and random tower (default: a new temporary directory)")
    p.add_argument("--upstream_dir", help="an unmodified upstream v1 checkout (git clone "
                   "https://github.com/jingyaogong/minimind-v; git checkout b671c1a): its own model/model.py "
                   "Transformer.generate is timed too, on the same weights")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_engine(engine, feats, n_tokens):
    """(tokens/s after the first, tokens) of one greedy answer streamed through ChatEngine.generate."""
    gen = engine.generate(MESSAGES, feats, max_new_tokens=n_tokens, temperature=0, top_p=None, seed=0)
    first = None
    for _ in gen:
        if first is None:
            first, n_first = time.perf_counter(), gen.completion_tokens
    sync(engine.device)
    end = time.perf_counter()
    return (gen.completion_tokens - n_first) / (end - first), gen.completion_tokens


def decode_upstream(engine, feats, n_tokens):
    ids = torch.tensor([engine.prepare(MESSAGES, 1)], device=engine.device)
    _, tps = decode_naive(engine.model, engine.tokenizer, ids, feats.to(engine.device), n_tokens)
    return tps, n_tokens


@torch.inference_mode()
def products_tokens_per_s(model, reps=30):
    """Tokens/s if a token cost only its weight products: F.linear of one row through every weight matrix a
    decoding step multiplies by (fused as the engine fuses them), in order. The kernels' own ceiling, below the
    copy-bandwidth bound: matrix-vector products do not stream memory as fast as a copy does."""
    mats = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        mats += [torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]), a.wo.weight]
        if hasattr(f, "w1"):
            mats += [torch.cat([f.w1.weight, f.w3.weight]), f.w2.weight]
    mats.append(model.output.weight)
    xs = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=w.dtype, device=w.device) for w in mats}

    def token():
        for w in mats:
            torch.nn.functional.linear(xs[w.shape[1]], w)
    for _ in range(3):
        token()
    sync(model.output.weight.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        token()
    sync(model.output.weight.device)
    return reps / (time.perf_counter() - t0)


def load_upstream_model(upstream_dir, ckpt, cfg):
    """Upstream v1's own Transformer (from upstream_dir/model/, imported as the package `upstream_v1`, unchanged)
    holding the checkpoint's weights: the parameter names are the same, so they load with strict=True."""
    import importlib.util
    import types
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


def decode_upstream_own(model, tokenizer, prompt_ids, feats, n_tokens):
    """Upstream v1's own generate, streamed as its 3-eval_chat.py streams it: greedy, the answer so far
    decoded whole after every token."""
    ids = torch.tensor([prompt_ids])
    steps = model.generate(ids, tokenizer.eos_token_id, ids.shape[1] + n_tokens + 1, temperature=0.0,
                           image_encoders=feats)
    first, n = None, 0
    for y in steps:
        tokenizer.decode(y[0].tolist())
        n = y.shape[1]
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return (n - 1) / (end - first), n


def weight_bytes(model):
    """Bytes of the decoder's unique parameters (the tied embedding/output matrix once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, ckpt, tower, cfg, tok = random_model_files(args.size, args.workdir, "bench-decode-")

    fp32 = ChatEngine.load(ckpt, tower, device=str(device), dtype="float32")
    engines = {"upstream": ChatEngine(load_vlm(ckpt, tok, device)[0], tok, fp32.vision), "fp32": fp32}
    if fp32.row_block > 1:  # fp32 on CPU: steps padded to 4 rows for batch-independent answers; 1 row is faster
        engines["fp32-1row"] = ChatEngine.load(ckpt, tower, device=str(device), dtype="float32", row_block=1)
    if autocast_dtype(device.type, "auto") == torch.bfloat16:
        engines["bf16"] = ChatEngine.load(ckpt, tower, device=str(device), dtype="bfloat16")
    run = {name: decode_upstream if name == "upstream" else decode_engine for name in engines}
    if args.upstream_dir:  # upstream's own code, on the same weights and prompt
        own = load_upstream_model(args.upstream_dir, ckpt, cfg)
        prompt = fp32.prepare(MESSAGES, 1)
        engines["upstream-own"] = own
        run["upstream-own"] = lambda m, f, n: decode_upstream_own(m, tok, prompt, f, n)
    feats = torch.randn(1, 50, 768, generator=torch.Generator().manual_seed(0))

    for name, e in engines.items():  # warm-up
        run[name](e, feats, 4)
    times = {name: [] for name in engines}
    counts = {}
    for _ in range(args.repeats):  # alternate, so a noisy neighbour slows every variant alike
        for name, e in engines.items():
            tps, counts[name] = run[name](e, feats, args.tokens)
            times[name].append(tps)
    bw = memory_bandwidth(device)

    rows = {}
    base = statistics.median(times["upstream"])
    for name, e in engines.items():
        tps = statistics.median(times[name])
        model = getattr(e, "model", e)  # an engine, or upstream's own model
        nbytes = weight_bytes(model)
        bound = bw * 1e9 / nbytes
        products = products_tokens_per_s(model)
        rows[name] = {"tokens_per_s": tps, "runs": times[name], "tokens": counts[name], "vs_upstream": tps / base,
                      "weight_bytes": nbytes, "bound_tokens_per_s": bound, "share_of_bound": tps / bound,
                      "products_only_tokens_per_s": products, "share_of_products_only": tps / products}
    res = {"size": args.size, "device": str(device), "threads": torch.get_num_threads(), "new_tokens": args.tokens,
           "repeats": args.repeats, "copy_gb_per_s": bw, "variants": rows}

    print(f"single-stream decode, {args.size} config, {args.tokens} new tokens, {device}, "
          f"{torch.get_num_threads()} threads, copy bandwidth {bw:.1f} GB/s, median of {args.repeats}")
    print(f"{'variant':<10} {'tok/s':>7} {'x upstream':>10} {'weights MB':>10} {'bound tok/s':>11} {'of bound':>8} "
          f"{'products-only tok/s':>19} {'of it':>6}")
    for name, r in rows.items():
        print(f"{name:<10} {r['tokens_per_s']:7.1f} {r['vs_upstream']:10.2f} {r['weight_bytes'] / 1e6:10.1f} "
              f"{r['bound_tokens_per_s']:11.0f} {r['share_of_bound']:8.0%} {r['products_only_tokens_per_s']:19.0f} "
              f"{r['share_of_products_only']:6.0%}")
    print_json(res, args.out)


if __name__ == "__main__":
    main()
