"""Serving under load and the front ends' memory: N concurrent streaming clients of the OpenAI-compatible API
(real HTTP, the official openai client), and the peak resident memory of 3-eval_chat.py and web_server.py.

  python benchmarks/serving.py                      # the 27M config, N = 1 2 4 8; about 8 minutes
  python benchmarks/serving.py --size tiny --clients 1 2 --tokens 16 --skip_memory   # the machinery only
  python benchmarks/serving.py --baseline_repo /tmp/old   # also an older checkout's server, in the same run

A seeded random model of the chosen config is saved as a checkpoint, with a seeded random CLIP tower (random
weights rarely say EOS, so every answer runs its full --tokens). Servers, one after another on the same
machine, each in its own process:
  batched-DTYPE  serve_openai_api.py as shipped with --dtype DTYPE (each of --dtypes: auto, the default, and
                 bfloat16 where the CPU has it): continuous batching, up to --max_batch answers per step
  one-at-a-time  --dtype auto with --max_batch 1: the next request waits until the current answer is done
  baseline       (--baseline_repo) that checkout's serve_openai_api.py, with only the flags it knows
For each N, N clients start together (a barrier), each streaming a greedy answer about its own image; a round
is repeated until every N has at least --samples time-to-first-token samples. Reported per N: aggregate
tokens/s (all answer tokens / the round's wall time), per-client tokens/s (after its first token), p50/p95
time to first token (request sent -> first text), and the ratios to N = 1.

Memory (peak RSS, VmHWM): the API server after its first round; `3-eval_chat.py` answering one image; and
`web_server.py` after its first answer (asked through gradio_client) -- each with --dtype bfloat16 (where the
CPU has it) and float32.

Prints tables, then one JSON object as the last line (also written to --out).
"""
import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ENV, ROOT, SIZES, peak_rss_mib, random_model_files, run_benchmark, run_script  # noqa: E402

from model.cli import HelpFormatter  # noqa: E402
from model.hardware import cpu_has_fast_bf16  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="27m", help="decoder config")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent clients per round")
    p.add_argument("--tokens", type=int, default=128, help="answer tokens per request (max_tokens)")
    p.add_argument("--samples", type=int, default=8, help="time-to-first-token samples per N (at least)")
    p.add_argument("--max_batch", type=int, default=8, help="the batched server's --max_batch")
    p.add_argument("--dtypes", nargs="+", help="the batched servers' --dtype (default: auto, and bfloat16 where the "
                   "CPU has native bf16)")
    p.add_argument("--baseline_repo", help="a checkout whose serve_openai_api.py is measured too")
    p.add_argument("--skip_memory", action="store_true", help="only the concurrency sweep")
    p.add_argument("--workdir", help="checkpoint and random tower (default: a new temporary directory)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo, script, args, ready_path, timeout=300):
    """(process, url) of `script` in `repo`, once `ready_path` answers."""
    port = free_port()
    log = open(os.path.join(tempfile.gettempdir(), f"bench-{script}-{port}.log"), "w")
    proc = subprocess.Popen([sys.executable, script, "--port", str(port), "--host", "127.0.0.1"] + args,
                            cwd=repo, env=dict(ENV, PYTHONPATH=repo), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{script} in {repo} exited ({proc.returncode}); see {log.name}")
        try:
            urllib.request.urlopen(url + ready_path, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{script} did not answer {ready_path} within {timeout} s; see {log.name}")


def image_data_urls(n, seed=0):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    urls = []
    for _ in range(n):
        pixels = (torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def stream_one(url, image_url, tokens, barrier, out, k):
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": "Describe this image."}]}]
    barrier.wait()
    start = time.perf_counter()
    first, n = None, 0
    for chunk in client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=tokens,
                                                stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = first or end
    out[k] = {"start": start, "ttft": first - start, "end": end, "tokens": n,
              "tokens_per_s": (n - 1) / (end - first) if n > 1 and end > first else 0.0}


def sweep(url, clients, tokens, samples, images):
    """{N: results} for every N in clients: rounds of N concurrent streams until `samples` TTFTs per N."""
    results = {}
    for n in clients:
        rounds = []
        while len(rounds) * n < samples or not rounds:
            out = [None] * n
            barrier = threading.Barrier(n)
            threads = [threading.Thread(target=stream_one, args=(url, images[k], tokens, barrier, out, k))
                       for k in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if any(o is None for o in out):
                raise RuntimeError(f"a client failed at N={n} (see the traceback above)")
            rounds.append(out)
        ttfts = sorted(o["ttft"] for r in rounds for o in r)
        aggregate = [sum(o["tokens"] for o in r) / (max(o["end"] for o in r) - min(o["start"] for o in r))
                     for r in rounds]
        results[n] = {
            "rounds": len(rounds),
            "aggregate_tokens_per_s": statistics.median(aggregate),
            "per_client_tokens_per_s": statistics.median(o["tokens_per_s"] for r in rounds for o in r),
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "tokens_per_answer": statistics.median(o["tokens"] for r in rounds for o in r)}
        print(f"  N={n}: {results[n]['aggregate_tokens_per_s']:.0f} tok/s aggregate, "
              f"p95 first token {results[n]['ttft_p95_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    base = results[clients[0]]
    for r in results.values():
        r["aggregate_vs_first"] = r["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
        r["ttft_p95_vs_first"] = r["ttft_p95_s"] / base["ttft_p95_s"]
    return results


def script_peak_rss(args):
    """Peak RSS (MiB) of `python args...` run from the repository root, or None if it failed."""
    try:
        return run_script(args)[2]
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return None


def web_peak_rss(model_args, image):
    from gradio_client import Client, handle_file
    proc, url = start_server(ROOT, "web_server.py", model_args, "/")
    try:
        client = Client(url + "/", verbose=False)
        client.predict("Describe this image.", handle_file(image), [], 0.0, 0, 0.85, 32, api_name="/on_question")
        return peak_rss_mib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def weights_mib(ckpt, tower, dtype):
    """MiB of the weights an engine holds for --dtype `dtype`: the decoder's (the tied matrix once), its int8
    decoding copies if any (all but the embedding's own use, the projector and the norms), and the tower's."""
    from model.checkpoint import read_safetensors
    from model.hardware import inference_plan
    plan = inference_plan("cpu", dtype)
    decoder = {k: t.numel() for k, t in read_safetensors(ckpt).items() if k != "tok_embeddings.weight"}
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    n = sum(decoder.values()) * size(plan.dense)
    if plan.int8_decoding:
        n += sum(v for k, v in decoder.items() if k.endswith("weight") and "norm" not in k and "vision_proj" not in k)
    n += sum(t.numel() for t in read_safetensors(os.path.join(tower, "model.safetensors")).values()) * size(
        plan.encoder or torch.float32)
    return n / 2 ** 20


def memory_section(ckpt, tower, work, dtypes):
    from PIL import Image
    images = os.path.join(work, "one_image")
    os.makedirs(images, exist_ok=True)
    image = os.path.join(images, "noise.png")
    Image.fromarray((torch.rand(224, 224, 3, generator=torch.Generator().manual_seed(1)) * 255)
                    .to(torch.uint8).numpy()).save(image)
    imports = os.path.join(work, "imports_only.py")
    with open(imports, "w") as f:
        f.write("import model.engine  # torch, tokenizers, PIL: what every front end imports before any weight\n")
    rows = {"imports_only_mib": script_peak_rss([imports])}
    for dtype in dtypes:
        model_args = ["--ckpt", ckpt, "--vision_model", tower, "--device", "cpu", "--dtype", dtype]
        rows[dtype] = {
            "eval_chat_mib": script_peak_rss(["3-eval_chat.py"] + model_args + ["--image_dir", images,
                                                                                "--max_new_tokens", "64"]),
            "web_server_mib": web_peak_rss(model_args, image),
            "weights_mib": weights_mib(ckpt, tower, dtype)}
        print(f"  {dtype}: 3-eval_chat.py {rows[dtype]['eval_chat_mib']:.0f} MiB, web_server.py "
              f"{rows[dtype]['web_server_mib']:.0f} MiB (weights {rows[dtype]['weights_mib']:.0f} MiB, imports "
              f"{rows['imports_only_mib']:.0f} MiB)", file=sys.stderr, flush=True)
    return rows


def measure(args):
    """The section as benchmark.py runs it."""
    work, ckpt, tower, _, _ = random_model_files(args.size, args.workdir, "bench-serving-")
    images = image_data_urls(max(args.clients))
    common = ["--ckpt", ckpt, "--vision_model", tower, "--device", "cpu"]
    dtypes = args.dtypes or (["auto"] + (["bfloat16"] if cpu_has_fast_bf16() else []))
    servers = {f"batched-{d}": (ROOT, common + ["--dtype", d, "--max_batch", str(args.max_batch)]) for d in dtypes}
    servers["one-at-a-time"] = (ROOT, common + ["--dtype", "auto", "--max_batch", "1"])
    if args.baseline_repo:
        servers["baseline"] = (os.path.abspath(args.baseline_repo), common)
    res = {"size": args.size, "tokens": args.tokens, "servers": {}}
    for name, (repo, flags) in servers.items():
        print(f"{name}: {repo}/serve_openai_api.py {' '.join(flags[6:])}", file=sys.stderr, flush=True)
        proc, url = start_server(repo, "serve_openai_api.py", flags, "/v1/models")
        try:
            sweep(url, [1], 4, 1, images)  # warm-up
            rows = sweep(url, args.clients, args.tokens, args.samples, images)
            res["servers"][name] = {"flags": " ".join(flags[6:]), "clients": rows,
                                    "server_peak_rss_mib": peak_rss_mib(proc.pid)}
        finally:
            proc.kill()
            proc.wait()
    if not args.skip_memory:
        print("memory", file=sys.stderr, flush=True)
        res["memory"] = memory_section(ckpt, tower, work, dtypes + ["float32"])
    return res


def table(res) -> str:
    out = [f"concurrent streaming API clients, {res['size']} config, {res['tokens']} tokens each",
           f"{'server':<18} {'N':>2} {'aggregate tok/s':>15} {'x N=1':>6} {'per client':>10} {'TTFT p50':>9} "
           f"{'TTFT p95':>9} {'x N=1':>6}"]
    for name, s in res["servers"].items():
        for n, r in s["clients"].items():
            out.append(f"{name:<18} {n:>2} {r['aggregate_tokens_per_s']:15.1f} {r['aggregate_vs_first']:6.2f} "
                       f"{r['per_client_tokens_per_s']:10.1f} {r['ttft_p50_s'] * 1e3:7.0f}ms "
                       f"{r['ttft_p95_s'] * 1e3:7.0f}ms {r['ttft_p95_vs_first']:6.2f}")
    for dtype, m in res.get("memory", {}).items():
        if isinstance(m, dict):
            out.append(f"peak memory, --dtype {dtype}: 3-eval_chat.py {m['eval_chat_mib']:.0f} MiB, web_server.py "
                       f"{m['web_server_mib']:.0f} MiB")
    return "\n".join(out)


def main(argv=None):
    return run_benchmark(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
