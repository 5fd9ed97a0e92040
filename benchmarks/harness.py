"""What every benchmark here shares, so that a new measurement is a function, not a script: the machine it ran
on, fresh processes, timing, peak memory, seeded random models and the JSON record.

  machine()                 CPU model and flags (model/hardware.py's kind), cores, torch version and threads
  in_fresh_process(fn, ...) a module-level function run in a new Python process (spawned: nothing inherited
                            from this one, not even torch's thread pools); its result and its peak RSS
  run_script(argv, ...)     a script in its own process: its last stdout line as JSON, its wall time, peak RSS
  best_rate(fn, repeats)    the best of several timed runs of fn (a noisy neighbour only ever slows a run)
  process_stats(pid)        resident memory, open files and threads of a running process
  matmul_peak, copy_bandwidth   what this machine can do at best: the ceilings a result is a share of
  random_model_files(size)  a seeded random checkpoint and CLIP tower (random weights rarely say EOS, so every
                            answer runs its full length)
  record(result, out)       the result with machine(), as one JSON line on stdout (last) and in `out`
"""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model.hardware import cpu_info  # noqa: E402

SIZES = {"27m": dict(dim=512, n_layers=8, n_heads=16, n_kv_heads=8),
         "109m": dict(dim=768, n_layers=16, n_heads=16, n_kv_heads=8),
         "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)}
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False",
           WANDB_MODE="offline", PYTHONPATH=ROOT)
# Runs a Python script and prints its own peak RSS on stderr as the last line: VmHWM, which starts afresh at
# exec (ru_maxrss would carry a parent's peak over through the fork).
PEAK_RSS_WRAPPER = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '.')\n"
                    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
                    "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
                    "    print('PEAK_RSS_KIB', hwm, file=sys.stderr)")


def machine() -> dict:
    info = cpu_info()
    return {"cpu": info["model"], "cpu_flags": info["flags"], "cpu_kind": info["kind"], "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _call_and_measure(fn, args, kwargs):
    return fn(*args, **kwargs), peak_rss_mib()


def in_fresh_process(fn, *args, **kwargs):
    """(fn's result, the process's peak RSS in MiB): fn (a module-level function) run in a new, spawned
    Python process."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_call_and_measure, (fn, args, kwargs))


def run_script(argv, cwd=ROOT, env=None, timeout=3600):
    """Run a Python script (argv[0], then its arguments) in its own process: (the JSON of its last stdout line,
    or None; wall seconds; peak RSS MiB). Its other output goes to stderr; a failure raises with its tail."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER] + [str(a) for a in argv], cwd=cwd,
                       env=env or ENV, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rss = [line.split()[1] for line in p.stderr.splitlines() if line.startswith("PEAK_RSS_KIB")]
    lines = p.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), file=sys.stderr)
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    return result, wall, int(rss[-1]) / 1024 if rss else None


def best_rate(fn, repeats=3):
    """max over repeats of fn() (each run returns a rate: higher is better)."""
    return max(fn() for _ in range(repeats))


def process_stats(pid) -> dict:
    """{'rss_mib', 'fds', 'threads'} of a running process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, sizes=(512, 1024, 2048), reps=8) -> float:
    """Best TFLOP/s of square matmuls of these sizes in this dtype: the machine's practical peak."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        a @ b
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e12)
    return best


def copy_bandwidth(device="cpu", mb=256, reps=5) -> float:
    """Best GB/s of copying a large tensor (read + write)."""
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


def random_model_files(size, workdir=None, prefix="bench-"):
    """(workdir, checkpoint, CLIP directory, LMConfig, tokenizer): a seeded random model of `size` saved as a
    checkpoint and a seeded random CLIP tower, made once in workdir (a new temporary directory if None)."""
    from model.checkpoint import save_checkpoint
    from model.LMConfig import LMConfig
    from model.model import MiniMindVLM
    from model.tokenizer import DEFAULT_TOKENIZER, image_token_ids, load_tokenizer
    from model.vision import make_random_vision_model
    work = workdir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work, exist_ok=True)
    tok = load_tokenizer(os.path.join(ROOT, DEFAULT_TOKENIZER))
    torch.manual_seed(0)
    cfg = LMConfig(**SIZES[size], vocab_size=len(tok), image_ids=image_token_ids(tok))
    ckpt, tower = os.path.join(work, f"random_{size}.safetensors"), os.path.join(work, "random-clip")
    if not os.path.isfile(ckpt):
        save_checkpoint(MiniMindVLM(cfg), ckpt, cfg)
    if not os.path.isdir(tower):
        make_random_vision_model(tower, seed=0)
    return work, ckpt, tower, cfg, tok


def record(result: dict, out=None, command=None) -> dict:
    """result plus the machine (and the command line), printed as one JSON line (the last line of stdout, which
    run_script and the tests read) and written to `out` if given."""
    result = dict(result, machine=machine(), command=command or " ".join([os.path.relpath(sys.argv[0], ROOT)]
                                                                         + sys.argv[1:]))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result
