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
Prints a table, then one JSON object as the last line (also written to --out), with the machine it ran on
(benchmarks/harness.py's record; the /proc sampling and the output reader are the harness's too).
"""
import argparse
import json
import os
import random
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (ROOT, TreeMemory, git_info, process_children, run_benchmark, run_watched,  # noqa: E402
                     status_kib, try_read)

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
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(os.path.abspath(args.workdir),
                                        f"startup-{os.path.basename(os.path.abspath(args.repo))}.json")
    return args


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

def is_rank(pid):
    """A training process: runs the script and is not the torchrun launcher."""
    raw = try_read(f"/proc/{pid}/cmdline", binary=True)
    if not raw:
        return False
    argv = raw.decode(errors="replace").split("\0")
    return any(a.endswith(SCRIPT) for a in argv) and "torch.distributed.run" not in argv and \
        not os.path.basename(argv[0]).startswith("torchrun")


def rank_number(pid, fallback):
    env = try_read(f"/proc/{pid}/environ", binary=True) or b""
    m = re.search(rb"(?:^|\0)RANK=(\d+)", env)
    return int(m.group(1)) if m else fallback


def rank_pids(root, children):
    """The top-most training processes below (or at) the root; below them are their workers."""
    ranks, stack = [], [root]
    while stack:
        p = stack.pop()
        if is_rank(p):
            ranks.append(p)
        else:
            stack += children.get(p, [])
    return ranks


class RankSampler:
    """Each rank's memory under a run's process (its workers included: a TreeMemory per rank), PSS at most
    every pss_interval s, and the peak RSS of the torchrun launcher, which is not a rank."""

    def __init__(self, pss_interval):
        self.ranks, self.launcher_peak_kib = {}, 0  # ranks: {pid: (rank number, TreeMemory)}
        self.pss_interval, self.pss_t = pss_interval, 0.0

    def sample(self, root):
        with_pss = self.pss_interval > 0 and time.time() - self.pss_t >= self.pss_interval
        if with_pss:
            self.pss_t = time.time()
        children = process_children()
        if root not in children:
            return
        if not is_rank(root):  # torchrun's launcher
            self.launcher_peak_kib = max(self.launcher_peak_kib, status_kib(root, "VmRSS")["VmRSS"])
        for pid in rank_pids(root, children):
            if pid not in self.ranks:
                self.ranks[pid] = (rank_number(pid, len(self.ranks)), TreeMemory(pid))
            self.ranks[pid][1].sample(children, with_pss)

    def summary(self):
        return [{"rank": rank, **memory.summary()} for rank, memory in sorted(self.ranks.values(), key=lambda r: r[0])]


# -- one run ----------------------------------------------------------------------------------------------------

def first_loss_seen(log_path):
    text = try_read(log_path)
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
    sampler, first_step = RankSampler(args.pss_interval), None

    def on_sample(pid, t0):
        nonlocal first_step
        sampler.sample(pid)
        if first_step is None and first_loss_seen(log_path):
            first_step = time.time() - t0
    run = run_watched(cmd, repo, env, os.path.join(workdir, "runs", f"{tag}-{start}.log"), args.interval,
                      args.timeout, on_sample)
    reader, cpu = run["output"], run["cpu"]
    if first_step is None and first_loss_seen(log_path):  # the first step and the exit within one interval
        first_step = run["exit_s"]
    ranks = sampler.summary()
    result = {"ranks": n_ranks, "start": start, "rc": run["rc"], "timed_out": run["timed_out"],
              "first_step_s": round(first_step, 1) if first_step is not None else None,
              "exit_s": round(run["exit_s"], 1),
              "peak_rss_mb_per_rank": max((r["peak_rss_mb"] for r in ranks), default=None),
              "peak_pss_mb_per_rank": max((r["peak_pss_mb"] for r in ranks), default=None),
              "per_rank": ranks, "launcher_peak_rss_mb": round(sampler.launcher_peak_kib / 1024, 1) if n_ranks > 1
              else None, "cpu": cpu, "removed_data_caches": removed, "phases": reader.bars,
              "lines": reader.lines[-40:], "log": reader.log_path, "command": cmd}
    for desc, bar in reader.bars.items():
        print(f"   {bar['first_s']:7.1f}s - {bar['last_s']:7.1f}s  {desc}  ({bar['last'][-90:]})")
    for t, line in reader.lines:
        if not line.startswith(("[W", "W1", "I1")):
            print(f"   {t:7.1f}s  {line[:150]}")
    print(f"   -> rc {result['rc']}, first step {result['first_step_s']} s, exit {result['exit_s']} s, peak RSS per "
          f"rank {result['peak_rss_mb_per_rank']} MB (PSS {result['peak_pss_mb_per_rank']} MB), "
          f"ranks {[(r['rank'], r['peak_rss_mb'], r['processes_at_peak']) for r in ranks]}; CPU s: run "
          f"{cpu['run_cpu_s']}, other processes {cpu['other_processes_cpu_s']} "
          f"({cpu['other_processes_share']:.0%} of the machine), load max {cpu['loadavg_1min_max']}", flush=True)
    return result


# -- the measurement and its table ------------------------------------------------------------------------------

def goals_of(runs):
    """The issue's goals against these runs: the worst second start's first step, the largest rank's RSS."""
    second = [r for r in runs if r["start"] == "second"]
    worst = max((r["first_step_s"] if r["first_step_s"] is not None else float("inf") for r in second), default=None)
    goals = {"second_start_first_step_s": None if worst == float("inf") else worst,  # None: a run never stepped
             "peak_rss_mb_per_rank": max((r["peak_rss_mb_per_rank"] or 0 for r in runs), default=None)}
    goals["first_step_goal_met"] = goals["second_start_first_step_s"] is not None and \
        goals["second_start_first_step_s"] <= GOAL_FIRST_STEP_S
    goals["rss_goal_met"] = goals["peak_rss_mb_per_rank"] is not None and goals["peak_rss_mb_per_rank"] <= GOAL_RSS_MB
    return goals


def measure(args) -> dict:
    """Both starts of every rank count, of --baseline_repo (if given) and then of --repo, on data built once."""
    t_start = time.time()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
    data_dir, info = build_data(workdir, args.n_records, args.n_images, args.seed)
    tower = build_tower(workdir)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]

    def runs_of(repo):
        return [run_once(args, repo, n, start, data_dir, info, tower, workdir) for n in ranks
                for start in ("first", "second")]
    baseline = runs_of(args.baseline_repo) if args.baseline_repo else None
    runs = runs_of(args.repo)
    result = {"repo": os.path.abspath(args.repo), **git_info(args.repo), "n_records": info["records"],
              "file_mb": round(info["bytes"] / MB, 1), "n_images": args.n_images, "num_workers": args.num_workers,
              "cpus": os.cpu_count(), "runs": runs, "goals": goals_of(runs), "total_s": round(time.time() - t_start, 1)}
    if baseline:
        result["baseline"] = {"repo": os.path.abspath(args.baseline_repo), **git_info(args.baseline_repo),
                              "runs": baseline}
    return result


def runs_table(repo, runs, res):
    lines = [f"repo {repo}; {res['n_records']} records ({res['file_mb']:.1f} MB), {res['n_images']} images, "
             f"{res['num_workers']} workers per rank, {res['cpus']} CPUs",
             f"{'ranks':>5} {'start':>7} {'first step s':>13} {'exit s':>8} {'peak RSS/rank MB':>17} "
             f"{'peak PSS/rank MB':>17} {'rc':>4} {'run CPU s':>9} {'others CPU':>10}"]
    for r in runs:
        lines.append(f"{r['ranks']:>5} {r['start']:>7} {str(r['first_step_s']):>13} {r['exit_s']:>8} "
                     f"{str(r['peak_rss_mb_per_rank']):>17} {str(r['peak_pss_mb_per_rank']):>17} {r['rc']:>4} "
                     f"{r['cpu']['run_cpu_s']:>9} {r['cpu']['other_processes_share']:>10.0%}")
    return "\n".join(lines)


def ratios_table(baseline, runs):
    def ratio(b, r, k):
        return f"{b[k] / r[k]:.1f}x" if b[k] and r[k] else "-"
    lines = [f"{'ranks':>5} {'start':>7} {'first step: baseline / this':>28} {'PSS: baseline / this':>21}"]
    for b, r in zip(baseline, runs):
        lines.append(f"{r['ranks']:>5} {r['start']:>7} {ratio(b, r, 'first_step_s'):>28} "
                     f"{ratio(b, r, 'peak_pss_mb_per_rank'):>21}")
    return "\n".join(lines)


def table(res) -> str:
    """The baseline's runs and this repo's, the ratios between them, and the goals."""
    baseline = res.get("baseline")
    parts = [runs_table(res["repo"], res["runs"], res)]
    if baseline:
        parts = [runs_table(baseline["repo"], baseline["runs"], res)] + parts + \
            [ratios_table(baseline["runs"], res["runs"])]
    g = res["goals"]
    goals = (f"goals: second start's first step {g['second_start_first_step_s']} s (<= {GOAL_FIRST_STEP_S:.0f}: "
             f"{g['first_step_goal_met']}); peak RSS per rank {g['peak_rss_mb_per_rank']} MB "
             f"(<= {GOAL_RSS_MB:.0f}: {g['rss_goal_met']}); benchmark took {res['total_s']:.0f} s")
    return "\n\n".join(parts) + "\n" + goals


def main(argv=None):
    return run_benchmark(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
