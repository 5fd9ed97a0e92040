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
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def peak_rss_mib(pid="self") -> float:
    """A process's peak resident memory so far (VmHWM), MiB."""
    return status_kib(pid, "VmHWM")["VmHWM"] / 1024


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
    status = status_kib(pid, "VmRSS", "Threads")  # Threads is a count, not KiB
    return {"rss_mib": status["VmRSS"] / 1024, "threads": status["Threads"], "fds": len(os.listdir(f"/proc/{pid}/fd"))}


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
    if not os.path.isfile(ckpt):  # served with the context of a run at the training scripts' default length
        save_checkpoint(MiniMindVLM(cfg), ckpt, cfg, extra={"args": {"max_seq_len": 640}})
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


# -- process trees, child output, CPU shares, files and timing --------------------------------------------------
# What startup.py, feature_cache.py and onnx_decode.py measured with copies of their own:
#
#   try_read(path)              a file's text (bytes with binary=True), or None: a /proc file of a process gone
#   process_children()          {pid: [its children]} of every process on the machine
#   process_tree(pid, children) pid and all its descendants
#   status_kib(pid, *fields)    fields of /proc/PID/status in KiB (VmRSS, VmHWM, ...)
#   pss_kib(pid)                the process's PSS (shared pages split between their sharers)
#   TreeMemory(pid)             peaks over samples of a process tree's summed RSS and PSS
#   CpuAccount()                the machine's CPU time while children ran: theirs, ours, everybody else's
#   OutputReader(pipe, log, t0) a child's output time-stamped into a log, its progress bars and lines noted
#   run_watched(cmd, ...)       a command in a session of its own: sampled while it runs, killed at a timeout
#   git_info(repo)              the commit a checkout is at and how many tracked files it has modified
#   time_call(fn, *args)        fn's result and the seconds it took
#   files_under(d), drop_page_cache(d)   the files below a directory: count and bytes; their cached pages dropped
#   run_benchmark(module, argv) a script's main(): its parse_args, measure and table, then record


def try_read(path, binary=False):
    """The contents of a file, or None where it cannot be read: a process may exit (or not be ours) between
    listing /proc and reading its files, and a run's log may not be written yet."""
    try:
        with open(path, "rb" if binary else "r") as f:
            return f.read()
    except OSError:
        return None


def process_children() -> dict:
    """{pid: [pids of its children]} of every process on the machine (a key for each live process)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = try_read(f"/proc/{name}/stat")
            if stat:  # after the command name, which may itself hold ')' and spaces: state, then the parent
                parents[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    children = {pid: [] for pid in parents}
    for pid, ppid in parents.items():
        if ppid in children:
            children[ppid].append(pid)
    return children


def process_tree(pid, children) -> list:
    """pid, then all its descendants, per a process_children() table."""
    tree, stack = [], [pid]
    while stack:
        p = stack.pop()
        tree.append(p)
        stack += children.get(p, [])
    return tree


def status_kib(pid, *fields) -> dict:
    """{field: value} of /proc/PID/status's numeric fields (KiB for memory ones such as VmRSS and VmHWM); 0 for a
    process gone."""
    out = dict.fromkeys(fields, 0)
    for line in (try_read(f"/proc/{pid}/status") or "").splitlines():
        key = line.split(":", 1)[0]
        if key in out:
            out[key] = int(line.split()[1])
    return out


def pss_kib(pid) -> int:
    """The process's proportional set size, KiB: each shared page split between the processes sharing it, so a
    forked worker costs only what it no longer shares. Reading it walks the page tables (~25 ms of CPU per GB)."""
    m = re.search(r"^Pss:\s+(\d+) kB", try_read(f"/proc/{pid}/smaps_rollup") or "", re.M)
    return int(m.group(1)) if m else 0


class TreeMemory:
    """Peaks over samples of one process tree (a process and its descendants, e.g. a training rank and its
    DataLoader workers): the summed RSS and how many processes held it, the summed PSS, the most processes
    seen at once, and the root process's own VmHWM. RSS counts pages a fork shares in every sharer; PSS does
    not."""

    def __init__(self, pid):
        self.pid = pid
        self.peak_rss_kib = self.peak_pss_kib = self.processes_at_peak = self.max_processes = self.hwm_kib = 0

    def sample(self, children, with_pss=False):
        """One sample, per a process_children() table taken now; PSS only with with_pss (it costs CPU)."""
        procs = process_tree(self.pid, children)
        rss = sum(status_kib(p, "VmRSS")["VmRSS"] for p in procs)
        if rss > self.peak_rss_kib:
            self.peak_rss_kib, self.processes_at_peak = rss, len(procs)
        if with_pss:
            self.peak_pss_kib = max(self.peak_pss_kib, sum(pss_kib(p) for p in procs))
        self.max_processes = max(self.max_processes, len(procs))
        self.hwm_kib = max(self.hwm_kib, status_kib(self.pid, "VmHWM")["VmHWM"])

    def summary(self) -> dict:
        return {"peak_rss_mb": round(self.peak_rss_kib / 1024, 1), "peak_pss_mb": round(self.peak_pss_kib / 1024, 1),
                "processes_at_peak": self.processes_at_peak, "max_processes": self.max_processes,
                "main_process_hwm_mb": round(self.hwm_kib / 1024, 1)}


def machine_busy_s() -> float:
    """CPU seconds all CPUs of the machine have been busy (not idle or waiting for I/O) since boot."""
    ticks = [int(x) for x in try_read("/proc/stat").splitlines()[0].split()[1:]]
    user, nice, system, irq, softirq, steal = ticks[0], ticks[1], ticks[2], ticks[5], ticks[6], ticks[7]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_s(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class CpuAccount:
    """Where the machine's CPU time went from now until result(): to the child processes this process reaped
    meanwhile (a run's whole tree, once waited for), to this process (its sampling), and to every other process
    (the machine may be shared: a run's numbers mean something only where that share is low). sample() notes
    the highest 1-minute load average seen."""

    def __init__(self):
        self.busy0, self.children0, self.self0 = machine_busy_s(), _cpu_s(resource.RUSAGE_CHILDREN), \
            _cpu_s(resource.RUSAGE_SELF)
        self.loadavg_max = 0.0

    def sample(self):
        self.loadavg_max = max(self.loadavg_max, float(try_read("/proc/loadavg").split()[0]))

    def result(self, wall_s) -> dict:
        run = _cpu_s(resource.RUSAGE_CHILDREN) - self.children0
        sampling = _cpu_s(resource.RUSAGE_SELF) - self.self0
        others = max(0.0, machine_busy_s() - self.busy0 - run - sampling)
        return {"run_cpu_s": round(run, 1), "sampling_cpu_s": round(sampling, 1),
                "other_processes_cpu_s": round(others, 1),
                "other_processes_share": round(others / (wall_s * os.cpu_count()), 2),
                "loadavg_1min_max": self.loadavg_max}


# a tqdm-style progress bar: "description: 42%|..." or "description: 17.3it [...", up to its first ':'
PROGRESS = re.compile(r"^\s*(?P<desc>[^:\[\]|]{1,80}):\s+(\d+%\||\d+(\.\d+)?\w*\s*\[)")


class OutputReader(threading.Thread):
    """Reads a child's (merged) output pipe until it closes, writes each line time-stamped (seconds since t0,
    a time.time()) to log_path, and notes when each progress bar (by its description) was first and last seen
    (`bars`) and every other line with its time (`lines`). A bar redraws itself after a '\\r', so '\\r' ends a
    line as '\\n' does; a piece not ended yet is stamped with the time it arrived."""

    def __init__(self, pipe, log_path, t0):
        super().__init__(daemon=True)
        self.pipe, self.log_path, self.t0 = pipe, log_path, t0
        self.bars, self.lines = {}, []

    def run(self):
        buf, buf_t = b"", None
        with open(self.log_path, "w", encoding="utf-8") as log:
            while True:
                chunk = os.read(self.pipe.fileno(), 65536)
                now = time.time()
                if not chunk:
                    break
                parts = re.split(rb"[\r\n]", buf + chunk)
                for k, raw in enumerate(parts[:-1]):
                    self.note(raw.decode("utf-8", errors="replace"), log, buf_t if k == 0 and buf else now)
                buf = parts[-1]
                buf_t = (buf_t if len(parts) == 1 and buf_t else now) if buf else None
            if buf:
                self.note(buf.decode("utf-8", errors="replace"), log, buf_t)

    def note(self, text, log, when):
        if not text.strip():
            return
        t = when - self.t0
        log.write(f"[{t:8.2f}s] {text}\n")
        log.flush()
        m = PROGRESS.match(text)
        if m:
            bar = self.bars.setdefault(m.group("desc").strip(), {"first_s": round(t, 2), "last_s": 0, "last": ""})
            bar["last_s"], bar["last"] = round(t, 2), text.strip()
        else:
            self.lines.append((round(t, 2), text.strip()[:200]))


def run_watched(cmd, cwd, env, log_path, interval=0.2, timeout=3600, on_sample=None) -> dict:
    """Run cmd (its stdout and stderr merged, read by an OutputReader into log_path) in a session of its own,
    calling on_sample(pid, t0) every `interval` s while it runs (t0: the time.time() it was started at, so that
    the callback can time what it sees); after `timeout` s the whole session (the command and whatever it
    started) is killed. {"rc", "exit_s": seconds until the process exited, "timed_out", "output": the
    OutputReader, "cpu": CpuAccount's result over the run}."""
    cpu = CpuAccount()
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    reader = OutputReader(proc.stdout, log_path, t0)
    reader.start()
    timed_out = False
    while proc.poll() is None:
        if on_sample:
            on_sample(proc.pid, t0)
        cpu.sample()
        if time.time() - t0 > timeout:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the session is the command's: its children die with it
            break
        time.sleep(interval)
    rc = proc.wait()
    exit_s = time.time() - t0
    reader.join(timeout=10)
    proc.stdout.close()
    return {"rc": rc, "exit_s": exit_s, "timed_out": timed_out, "output": reader, "cpu": cpu.result(exit_s)}


def git_info(repo) -> dict:
    """{"commit": HEAD's hash (None outside git), "modified_files": tracked files changed in the work tree}."""
    def git(*a):
        r = subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified_files": len(status.splitlines()) if status else 0}


def time_call(fn, *args, **kwargs):
    """(fn(*args, **kwargs), the seconds it took)."""
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t


def files_under(d):
    """(files below directory d, their apparent bytes, the bytes they take on disk in allocated blocks)."""
    stats = [p.stat() for p in Path(d).rglob("*") if p.is_file()]
    return len(stats), sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


def drop_page_cache(d):
    """Ask the kernel to drop the cached pages of every file below d (posix_fadvise DONTNEED: no root needed).
    Only clean pages go, so sync first. Best effort: a virtual disk's host may still hold them."""
    for p in Path(d).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_benchmark(module, argv=None) -> dict:
    """A benchmark script's main(): the module's parse_args(argv), measure(args) and table(res); the table is
    printed after a blank line (below the measurement's progress), then the result goes out through record
    (to args.out)."""
    args = module.parse_args(argv)
    res = module.measure(args)
    print("\n" + module.table(res))
    return record(res, args.out)
