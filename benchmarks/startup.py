"""Start-up benchmark at full size: how long 1-pretrain_vlm.py takes from launch to its first optimizer step, and
how much memory each rank holds (its DataLoader workers included), on a LLaVA-CC3M-sized pretrain file.

  python benchmarks/startup.py                          # 595,375 records, 1 and 2 ranks, this repo
  python benchmarks/startup.py --n_records 5000         # a quick check of the machinery
  python benchmarks/startup.py --repo /tmp/before       # the same measurement of another checkout
  python benchmarks/startup.py --baseline_repo /tmp/before   # both, in one run: the table and the ratios

The data is built once in --workdir and reused: chat-translated.json in upstream MiniMind-V v1's shape (a JSON
list of {"id", "image", "conversations": [human, gpt]} records, a Chinese caption instruction with <image> first
or last, a Chinese caption of 10-40 characters, 21 on average; 152 MB (145 MiB) at the default size, one
record per line), whose "image" names cycle over --n_images generated 224x224 JPEGs in pretrain_images/; and a
random CLIP ViT-B/32 tower (model.vision.make_random_vision_model).

Each rank count runs twice, as subprocesses of the --repo checkout (cwd = --repo, PYTHONPATH = --repo):
  first   a fresh out_dir and no data caches (anything the training wrote next to the data file is removed;
          caches kept elsewhere, e.g. under ~/.cache, are not)
  second  the same out_dir and data directory, so the feature cache and any data caches of the first are reused
with a tiny model (dim 64, 2 layers), 3 steps of batch 8, 2 DataLoader workers, fp32 on the CPU. 2 ranks are
started by `python -m torch.distributed.run --standalone` (gloo on lo, OMP_NUM_THREADS=1).

Measured per run:
  first step   seconds from launch to the first loss line in {out_dir}/64_vlm_pretrain_log.jsonl
  exit         seconds from launch to the exit of the whole process tree
  peak RSS     per rank: the VmRSS of the rank's process plus all its descendants (DataLoader workers), summed
               per sample (every --interval s, from /proc), the maximum over time; the table shows the largest
               rank. The torchrun launcher is not a rank and is not counted. Forked workers share pages with
               their rank, which RSS counts in each (a rank of 2 GB with 2 workers reads as up to 6 GB); PSS
               (shared pages split between the sharers: what the rank really costs the machine) is shown next
               to it, sampled every --pss_interval s. MB = MiB.
  run CPU s    CPU seconds of the run's whole process tree (less sensitive to a busy machine than wall time)
  others CPU   the share of the machine's CPU time that processes outside the run used while it ran (the
               machine may be shared: compare numbers only where this is low)
Where the time went is read from the training's own output (progress bars and lines, time-stamped as they
arrive); every run's full output is kept in {workdir}/runs/{repo name}-{N}rank-{start}.log.

Goals (the issue): second start's first step within 60 s; peak RSS per rank <= 1.5 GiB (1536 MiB).
Prints a table, then one JSON object as the last line (also written to --out).
"""
import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model.cli import HelpFormatter  # noqa: E402

SCRIPT = "1-pretrain_vlm.py"
DATA_FILE = "chat-translated.json"
IMAGES = "pretrain_images"
LOG_NAME = "64_vlm_pretrain_log.jsonl"  # {dim}_vlm_pretrain_log.jsonl of --dim 64
GOAL_FIRST_STEP_S = 60.0
GOAL_RSS_MB = 1536.0
MB = 1024 * 1024

INSTRUCTIONS = [
    "提供给定图像的简要描述。", "简要描述这张图片。", "用简洁的语言描述这张图片。", "对图像进行简短的描述。",
    "给出图片的简短说明。", "总结图片的视觉内容。", "请简单描述这张图片的内容。", "写一段简短的图片说明。",
    "简洁地解释图中所示的内容。", "分享对这张图片的简明解读。", "描述以下图像的主要内容。",
]
SUBJECTS = ["一个男人", "一位女士", "孩子们", "一只狗", "一只猫", "游客", "一群人", "演员", "运动员", "艺术家",
            "一辆汽车", "老房子", "一座城市", "一棵树", "花朵", "一家人", "学生", "厨师", "音乐家", "一匹马",
            "足球运动员", "新娘", "一名士兵", "模特", "鸟", "政治家", "农民", "一艘船"]
VERBS = ["站在", "坐在", "走过", "看着", "躺在", "穿过", "出现在", "停在", "漂浮在", "展示在", "准备在",
         "庆祝于", "等待在", "奔跑在", "表演于", "拍摄于"]
PLACES = ["海滩上", "街道旁", "公园里", "舞台上", "雪地中", "城市的夜景中", "白色背景上", "森林里", "河边",
          "古老的教堂前", "厨房里", "山顶上", "比赛期间", "活动现场", "商店门口", "田野中", "湖边", "桥上",
          "体育场内", "花园中", "房间里", "屋顶上"]
EXTRAS = ["阳光明媚", "在日落时分", "背景是蓝天", "手里拿着一杯咖啡", "穿着红色的衣服", "微笑着", "在雨中",
          "特写镜头", "黑白照片", "矢量插图", "秋天的树叶", "节日期间", "圣诞节装饰", "在夏天", "一起玩耍",
          "远处的山脉", "复古风格", "高清图片"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--n_records", type=int, default=595375, help="records in the pretrain file (LLaVA-CC3M: 595,375)")
    p.add_argument("--n_images", type=int, default=300, help="distinct 224x224 JPEGs the records' image names cycle over")
    p.add_argument("--workdir", default="/tmp/startup_bench", help="data, tower, run directories and logs "
                                                                   "(built once, reused)")
    p.add_argument("--out", default=None, help="also write the JSON here (None: {workdir}/startup-{repo name}.json)")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts to measure")
    p.add_argument("--repo", default=ROOT, help="the checkout whose 1-pretrain_vlm.py is measured")
    p.add_argument("--baseline_repo", default=None, help="also measure this checkout (e.g. a clone of an older "
                                                         "commit) in the same run, first, and print the ratios")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the training")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples of the process tree (RSS)")
    p.add_argument("--pss_interval", type=float, default=5.0,
                   help="seconds between PSS samples (reading PSS costs ~25 ms of CPU per GB-sized process; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    return p.parse_args(argv)


# -- data -------------------------------------------------------------------------------------------------------

def caption(rng):
    """A Chinese caption of 10-40 characters (21 on average), CC3M-like: a subject, what it does, where, maybe
    more."""
    text = rng.choice(SUBJECTS) + rng.choice(VERBS) + rng.choice(PLACES)
    while len(text) < rng.randint(10, 30):
        text += "，" + rng.choice(EXTRAS)
    return text + ("。" if rng.random() < 0.3 else "")


def make_image(path, rng):
    from PIL import Image, ImageDraw
    bg = tuple(rng.randrange(256) for _ in range(3))
    img = Image.new("RGB", (224, 224), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randrange(200), rng.randrange(200)
        box = [x0, y0, x0 + rng.randint(20, 120), y0 + rng.randint(20, 120)]
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img.save(path, quality=90)


def build_data(workdir, n_records, n_images, seed):
    """{workdir}/cc3m-{n_records}x{n_images}/ with chat-translated.json and pretrain_images/; built once (a
    MANIFEST, written last, lists what belongs there)."""
    d = os.path.join(workdir, f"cc3m-{n_records}x{n_images}")
    manifest = os.path.join(d, "MANIFEST.json")
    if os.path.isfile(manifest):
        return d, json.load(open(manifest))
    t0 = time.time()
    rng = random.Random(seed)
    os.makedirs(os.path.join(d, IMAGES), exist_ok=True)
    names = [f"GCC_train_{i:09d}.jpg" for i in range(n_images)]
    for name in names:
        make_image(os.path.join(d, IMAGES, name), rng)
    tmp = os.path.join(d, DATA_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n_records):
            instruction = rng.choice(INSTRUCTIONS)
            prompt = f"<image>\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n<image>"
            rec = {"id": f"GCC_train_{i:09d}", "image": names[i % n_images],
                   "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption(rng)}]}
            f.write(json.dumps(rec, ensure_ascii=False) + (",\n" if i + 1 < n_records else "\n"))
        f.write("]\n")
    os.replace(tmp, os.path.join(d, DATA_FILE))
    info = {"data_file": DATA_FILE, "images_dir": IMAGES, "images": names, "records": n_records,
            "bytes": os.path.getsize(os.path.join(d, DATA_FILE))}
    with open(manifest, "w") as f:
        json.dump(info, f)
    print(f"built {d}: {n_records} records, {info['bytes'] / MB:.1f} MB, {n_images} images in {time.time() - t0:.1f} s",
          flush=True)
    return d, info


def clear_data_caches(data_dir, info):
    """Remove whatever is in the data directory besides the generated files: caches a run wrote there."""
    removed = []
    keep = {info["data_file"], info["images_dir"], "MANIFEST.json"}
    for name in os.listdir(data_dir):
        if name not in keep:
            removed.append(name)
    images = os.path.join(data_dir, info["images_dir"])
    known = set(info["images"])
    removed += [os.path.join(info["images_dir"], n) for n in os.listdir(images) if n not in known]
    for name in removed:
        path = os.path.join(data_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return removed


def build_tower(workdir):
    out = os.path.join(workdir, "random-clip-vit-base-patch32-seed0")
    if not os.path.isfile(os.path.join(out, "config.json")):  # written last
        from model.vision import make_random_vision_model
        make_random_vision_model(out, 0)
    return out


# -- the process tree -------------------------------------------------------------------------------------------

def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:  # the process is gone, or not ours
        return None


def process_table():
    """{pid: ppid} of every process on the machine."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read(f"/proc/{name}/stat")
            if stat:
                table[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def status_kb(pid, fields):
    text = read(f"/proc/{pid}/status") or ""
    out = dict.fromkeys(fields, 0)
    for line in text.splitlines():
        key = line.split(":", 1)[0]
        if key in out:
            out[key] = int(line.split()[1])
    return out


def pss_kb(pid):
    text = read(f"/proc/{pid}/smaps_rollup") or ""
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def is_rank(pid):
    """A training process: runs the script and is not the torchrun launcher."""
    raw = read(f"/proc/{pid}/cmdline", "rb")
    if not raw:
        return False
    argv = raw.decode(errors="replace").split("\0")
    return any(a.endswith(SCRIPT) for a in argv) and "torch.distributed.run" not in argv and \
        not os.path.basename(argv[0]).startswith("torchrun")


def rank_number(pid, fallback):
    env = read(f"/proc/{pid}/environ", "rb") or b""
    m = re.search(rb"(?:^|\0)RANK=(\d+)", env)
    return int(m.group(1)) if m else fallback


class TreeSampler:
    """Peak (over time) of each rank's summed RSS and PSS, its workers included."""

    def __init__(self, root, pss_interval):
        self.root, self.ranks, self.launcher_peak_kb = root, {}, 0
        self.pss_interval, self.pss_t = pss_interval, 0.0

    def sample(self):
        with_pss = self.pss_interval > 0 and time.time() - self.pss_t >= self.pss_interval
        if with_pss:
            self.pss_t = time.time()
        table = process_table()
        children = {}
        for pid, ppid in table.items():
            children.setdefault(ppid, []).append(pid)

        def descendants(pid):
            out, stack = [], [pid]
            while stack:
                p = stack.pop()
                out.append(p)
                stack += children.get(p, [])
            return out
        if self.root not in table:
            return
        rank_pids, stack = [], [self.root]
        while stack:  # the top-most training processes below (or at) the root; below them are their workers
            p = stack.pop()
            if is_rank(p):
                rank_pids.append(p)
            else:
                stack += children.get(p, [])
                if p == self.root:
                    self.launcher_peak_kb = max(self.launcher_peak_kb, status_kb(p, ["VmRSS"])["VmRSS"])
        for pid in rank_pids:
            if pid not in self.ranks:
                self.ranks[pid] = {"rank": rank_number(pid, len(self.ranks)), "peak_rss_kb": 0, "peak_pss_kb": 0,
                                   "procs_at_peak": 0, "max_procs": 0, "hwm_kb": 0}
            r = self.ranks[pid]
            procs = descendants(pid)
            rss = sum(status_kb(p, ["VmRSS"])["VmRSS"] for p in procs)
            pss = sum(pss_kb(p) for p in procs) if with_pss else 0
            if rss > r["peak_rss_kb"]:
                r["peak_rss_kb"], r["procs_at_peak"] = rss, len(procs)
            r["peak_pss_kb"] = max(r["peak_pss_kb"], pss)
            r["max_procs"] = max(r["max_procs"], len(procs))
            r["hwm_kb"] = max(r["hwm_kb"], status_kb(pid, ["VmHWM"])["VmHWM"])

    def summary(self):
        ranks = sorted(self.ranks.values(), key=lambda r: r["rank"])
        return [{"rank": r["rank"], "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 1),
                 "peak_pss_mb": round(r["peak_pss_kb"] / 1024, 1), "processes_at_peak": r["procs_at_peak"],
                 "max_processes": r["max_procs"], "main_process_hwm_mb": round(r["hwm_kb"] / 1024, 1)}
                for r in ranks]


# -- one run ----------------------------------------------------------------------------------------------------

PROGRESS = re.compile(r"^\s*(?P<desc>[^:\[\]|]{1,80}):\s+(\d+%\||\d+(\.\d+)?\w*\s*\[)")


class OutputReader(threading.Thread):
    """Reads the run's merged stdout/stderr, writes it time-stamped to a log, and notes when each line and
    each progress bar (by its description) was first and last seen."""

    def __init__(self, pipe, log_path, t0):
        super().__init__(daemon=True)
        self.pipe, self.log_path, self.t0 = pipe, log_path, t0
        self.bars, self.lines = {}, []

    def run(self):
        buf, buf_t = b"", None  # a piece not ended yet (a progress bar ends at the next \r), when it arrived
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
            desc = m.group("desc").strip()
            bar = self.bars.setdefault(desc, {"first_s": round(t, 2), "last_s": 0, "last": ""})
            bar["last_s"], bar["last"] = round(t, 2), text.strip()
        else:
            self.lines.append((round(t, 2), text.strip()[:200]))


def machine_busy_s():
    """CPU seconds all CPUs of the machine have been busy (not idle or waiting for I/O) since boot."""
    f = [int(x) for x in read("/proc/stat").splitlines()[0].split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")


def cpu_s(usage):
    return usage.ru_utime + usage.ru_stime


def first_loss_seen(log_path):
    text = read(log_path)
    return bool(text) and any('"loss"' in line for line in text.splitlines())


def run_once(args, repo, n_ranks, start, data_dir, info, tower, workdir):
    repo = os.path.abspath(repo)
    tag = f"{os.path.basename(repo.rstrip('/'))}-{n_ranks}rank"
    out_dir = os.path.join(workdir, "runs", tag)
    log_path = os.path.join(out_dir, LOG_NAME)
    removed = []
    if start == "first":
        shutil.rmtree(out_dir, ignore_errors=True)
        removed = clear_data_caches(data_dir, info)
    elif os.path.exists(log_path):
        os.remove(log_path)  # the first start's loss lines would read as this start's first step
    train_args = [SCRIPT, "--data_path", os.path.join(data_dir, info["data_file"]),
                  "--images_dir", os.path.join(data_dir, info["images_dir"]), "--init_from", "none",
                  "--vision_model", tower, "--dim", "64", "--n_layers", "2", "--max_steps", "3", "--batch_size", "8",
                  "--num_workers", str(args.num_workers), "--log_interval", "1", "--save_interval", "100000",
                  "--device", "cpu", "--dtype", "float32", "--out_dir", out_dir]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=repo, PYTHONUNBUFFERED="1")
    if n_ranks == 1:
        cmd = [args.python] + train_args
    else:
        cmd = [args.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_ranks)] + train_args
        env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    print(f"\n== {n_ranks} rank(s), {start} start: {' '.join(cmd)}" +
          (f"\n   removed data caches: {', '.join(removed)}" if removed else ""), flush=True)
    busy0, ours0, self0 = machine_busy_s(), cpu_s(resource.getrusage(resource.RUSAGE_CHILDREN)), \
        cpu_s(resource.getrusage(resource.RUSAGE_SELF))
    load_max = 0.0
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    reader = OutputReader(proc.stdout, os.path.join(workdir, "runs", f"{tag}-{start}.log"), t0)
    reader.start()
    sampler, first_step, timed_out = TreeSampler(proc.pid, args.pss_interval), None, False
    while proc.poll() is None:
        sampler.sample()
        load_max = max(load_max, float(read("/proc/loadavg").split()[0]))
        if first_step is None and first_loss_seen(log_path):
            first_step = time.time() - t0
        if time.time() - t0 > args.timeout:
            timed_out = True
            os.killpg(proc.pid, 9)  # the session this run started: its launcher, ranks and workers
            break
        time.sleep(args.interval)
    rc = proc.wait()
    exit_s = time.time() - t0
    reader.join(timeout=10)
    # CPU: the run's own (its reaped process tree), this benchmark's sampling, and everybody else's
    ours = cpu_s(resource.getrusage(resource.RUSAGE_CHILDREN)) - ours0
    sampling = cpu_s(resource.getrusage(resource.RUSAGE_SELF)) - self0
    others = max(0.0, machine_busy_s() - busy0 - ours - sampling)
    cpu = {"run_cpu_s": round(ours, 1), "sampling_cpu_s": round(sampling, 1), "other_processes_cpu_s": round(others, 1),
           "other_processes_share": round(others / (exit_s * os.cpu_count()), 2), "loadavg_1min_max": load_max}
    if first_step is None and first_loss_seen(log_path):  # the first step and the exit within one interval
        first_step = exit_s
    ranks = sampler.summary()
    result = {"ranks": n_ranks, "start": start, "rc": rc, "timed_out": timed_out,
              "first_step_s": round(first_step, 1) if first_step is not None else None, "exit_s": round(exit_s, 1),
              "peak_rss_mb_per_rank": max((r["peak_rss_mb"] for r in ranks), default=None),
              "peak_pss_mb_per_rank": max((r["peak_pss_mb"] for r in ranks), default=None),
              "per_rank": ranks, "launcher_peak_rss_mb": round(sampler.launcher_peak_kb / 1024, 1) if n_ranks > 1
              else None, "cpu": cpu, "removed_data_caches": removed, "phases": reader.bars,
              "lines": reader.lines[-40:], "log": reader.log_path, "command": cmd}
    for desc, bar in reader.bars.items():
        print(f"   {bar['first_s']:7.1f}s - {bar['last_s']:7.1f}s  {desc}  ({bar['last'][-90:]})")
    for t, line in reader.lines:
        if not line.startswith(("[W", "W1", "I1")):
            print(f"   {t:7.1f}s  {line[:150]}")
    print(f"   -> rc {rc}, first step {result['first_step_s']} s, exit {result['exit_s']} s, peak RSS per rank "
          f"{result['peak_rss_mb_per_rank']} MB (PSS {result['peak_pss_mb_per_rank']} MB), "
          f"ranks {[(r['rank'], r['peak_rss_mb'], r['processes_at_peak']) for r in ranks]}; CPU s: run "
          f"{cpu['run_cpu_s']}, other processes {cpu['other_processes_cpu_s']} "
          f"({cpu['other_processes_share']:.0%} of the machine), load max {load_max}", flush=True)
    return result


def git_info(repo):
    def git(*a):
        r = subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified_files": len(status.splitlines()) if status else 0}


def print_table(repo, runs, info, args):
    print(f"\nrepo {os.path.abspath(repo)}; {info['records']} records ({info['bytes'] / MB:.1f} MB), "
          f"{args.n_images} images, {args.num_workers} workers per rank, {os.cpu_count()} CPUs")
    print(f"{'ranks':>5} {'start':>7} {'first step s':>13} {'exit s':>8} {'peak RSS/rank MB':>17} "
          f"{'peak PSS/rank MB':>17} {'rc':>4} {'run CPU s':>9} {'others CPU':>10}")
    for r in runs:
        print(f"{r['ranks']:>5} {r['start']:>7} {str(r['first_step_s']):>13} {r['exit_s']:>8} "
              f"{str(r['peak_rss_mb_per_rank']):>17} {str(r['peak_pss_mb_per_rank']):>17} {r['rc']:>4} "
              f"{r['cpu']['run_cpu_s']:>9} {r['cpu']['other_processes_share']:>10.0%}")


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
    data_dir, info = build_data(workdir, args.n_records, args.n_images, args.seed)
    tower = build_tower(workdir)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]

    def measure(repo):
        return [run_once(args, repo, n, start, data_dir, info, tower, workdir) for n in ranks
                for start in ("first", "second")]
    baseline = measure(args.baseline_repo) if args.baseline_repo else None
    runs = measure(args.repo)

    if baseline:
        print_table(args.baseline_repo, baseline, info, args)
    print_table(args.repo, runs, info, args)
    if baseline:
        print(f"\n{'ranks':>5} {'start':>7} {'first step: baseline / this':>28} {'PSS: baseline / this':>21}")
        for b, r in zip(baseline, runs):
            ratio = lambda k: (f"{b[k] / r[k]:.1f}x" if b[k] and r[k] else "-")  # noqa: E731
            print(f"{r['ranks']:>5} {r['start']:>7} {ratio('first_step_s'):>28} {ratio('peak_pss_mb_per_rank'):>21}")
    second = [r for r in runs if r["start"] == "second"]
    worst = max((r["first_step_s"] if r["first_step_s"] is not None else float("inf") for r in second), default=None)
    goals = {"second_start_first_step_s": None if worst == float("inf") else worst,  # None: a run never stepped
             "peak_rss_mb_per_rank": max((r["peak_rss_mb_per_rank"] or 0 for r in runs), default=None)}
    goals["first_step_goal_met"] = goals["second_start_first_step_s"] is not None and \
        goals["second_start_first_step_s"] <= GOAL_FIRST_STEP_S
    goals["rss_goal_met"] = goals["peak_rss_mb_per_rank"] is not None and goals["peak_rss_mb_per_rank"] <= GOAL_RSS_MB
    total = time.time() - t_start
    print(f"goals: second start's first step {goals['second_start_first_step_s']} s (<= {GOAL_FIRST_STEP_S:.0f}: "
          f"{goals['first_step_goal_met']}); peak RSS per rank {goals['peak_rss_mb_per_rank']} MB "
          f"(<= {GOAL_RSS_MB:.0f}: {goals['rss_goal_met']}); benchmark took {total:.0f} s")
    result = {"repo": os.path.abspath(args.repo), **git_info(args.repo), "n_records": info["records"],
              "file_mb": round(info["bytes"] / MB, 1), "n_images": args.n_images, "num_workers": args.num_workers,
              "cpus": os.cpu_count(), "runs": runs, "goals": goals, "total_s": round(total, 1)}
    if baseline:
        result["baseline"] = {"repo": os.path.abspath(args.baseline_repo), **git_info(args.baseline_repo),
                              "runs": baseline}
    out = args.out or os.path.join(workdir, f"startup-{os.path.basename(os.path.abspath(args.repo))}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(json.dumps(result, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
