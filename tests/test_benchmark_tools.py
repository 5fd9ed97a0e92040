"""The benchmarks that run on their own (benchmarks/feature_cache.py, onnx_decode.py) in their quick forms, and
the harness pieces they and startup.py share: /proc readers, the process-tree sampler, a watched run with its
output and CPU account, the file counts. (startup.py's quick form trains four times, over a minute: here its
rank sampler runs on a stand-in process tree instead.) No test asserts a speed.
"""
import json
import os
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import harness  # noqa: E402

# A stand-in for a training rank: a "DataLoader worker" child holding 32 MiB, a progress bar, a line naming the
# worker's pid, 0.2 s of CPU; it lives argv[1] seconds more.
FAKE_RANK = """
import os, subprocess, sys, time
start = time.process_time()
while time.process_time() - start < 0.2:
    pass
worker = subprocess.Popen([sys.executable, "-c", "import time; held = b'x' * (32 << 20); print(flush=True); "
                           "time.sleep(60)"], stdout=subprocess.PIPE)
worker.stdout.readline()  # the worker holds its 32 MiB
print("phase: 50%|#    | 1/2", end="\\r", flush=True)
print("phase: 100%|#####| 2/2", flush=True)
print("rank", os.environ.get("RANK"), "worker", worker.pid, flush=True)
time.sleep(float(sys.argv[1]))
worker.kill()
worker.wait()
"""
# torchrun's part: starts two ranks (RANK 5, then 3) of the script RANK_SCRIPT names, which, like torchrun's
# own, its command line does not (the sampler takes a process that names the script for a rank), and waits.
FAKE_LAUNCHER = """
import os, subprocess, sys
ranks = [subprocess.Popen([sys.executable, os.environ["RANK_SCRIPT"], sys.argv[1]], env=dict(os.environ, RANK=r))
         for r in ("5", "3")]
sys.exit(max(p.wait() for p in ranks))
"""
HELD_MIB = 32


def write_script(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def last_json(argv):
    result, _, _ = harness.run_script(argv, timeout=120)
    assert result is not None, f"{argv[0]} printed no JSON line"
    return result


def assert_has_machine(res):
    m = res["machine"]
    assert m["cores"] == os.cpu_count() and m["cpu"] and isinstance(m["cpu_flags"], list)
    assert m["cpu_kind"] in ("amx", "avx512_bf16", "avx2", "other")


# -- the scripts' quick forms -----------------------------------------------------------------------------------

def test_feature_cache_quick_form(tmp_path):
    import feature_cache
    out = tmp_path / "fc.json"
    res = last_json(["benchmarks/feature_cache.py", "--n", "200", "--workdir", tmp_path / "work", "--out", out])
    assert res == json.loads(out.read_text())
    assert_has_machine(res)
    assert res["n"] == 200 and res["command"].startswith("benchmarks/feature_cache.py --n 200")
    rates = {"fill_entries_per_s", "open_s", "on_disk_per_s", "get_random_warm_per_s", "get_sequential_warm_per_s",
             "get_random_evicted_per_s", "get_sequential_evicted_per_s"}
    for store in ("old", "new"):
        assert rates <= set(res[store]) and all(res[store][k] > 0 for k in rates)
        assert res[store]["bytes"] >= 200 * feature_cache.ENTRY_BYTES
    assert res["old"]["files"] == 200 and res["new"]["files"] < 10  # one .npy per entry against a few shards
    assert "worker_copy_bytes" in res["new"] and "worker_copy_bytes" not in res["old"]
    assert not os.listdir(tmp_path / "work")  # each store deleted once measured
    assert "NEW (shards)" in feature_cache.table(res)  # the table is made from the JSON alone


def test_onnx_decode_quick_form(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx_decode
    out = tmp_path / "onnx.json"
    res = last_json(["benchmarks/onnx_decode.py", "--size", "tiny", "--tokens", "8", "--repeats", "1",
                     "--workdir", tmp_path / "work", "--out", out])
    assert res == json.loads(out.read_text())
    assert_has_machine(res)
    assert (res["size"], res["tokens"], res["repeats"]) == ("tiny", 8, 1)
    onnx, torch_side = res["runtimes"]["onnxruntime"], res["runtimes"]["pytorch"]
    assert onnx["torch_imported"] is False and torch_side["torch_imported"] is True
    for r in (onnx, torch_side):
        assert r["tokens_per_s"] > 0 and r["first_token_s"] > 0 and r["peak_rss_mib"] > 50
    assert "onnxruntime" in onnx_decode.table(res)


# -- the harness's process tools --------------------------------------------------------------------------------

def test_proc_readers_on_live_and_gone_processes():
    pss = harness.pss_kib(os.getpid())
    me = harness.status_kib(os.getpid(), "VmRSS", "VmHWM", "NotAField")
    assert 0 < me["VmRSS"] <= me["VmHWM"] and me["NotAField"] == 0
    assert 0 < pss <= me["VmHWM"]  # PSS <= RSS then <= the peak RSS read after it
    children = harness.process_children()
    assert os.getpid() in children[os.getppid()]
    assert harness.process_tree(os.getppid(), children)[:1] == [os.getppid()]
    assert os.getpid() in harness.process_tree(os.getppid(), children)
    gone = max(children) + 100000  # above every pid in use
    assert harness.try_read(f"/proc/{gone}/status") is None
    assert harness.status_kib(gone, "VmRSS") == {"VmRSS": 0} and harness.pss_kib(gone) == 0


def test_run_watched_samples_a_process_tree_and_reads_its_output(tmp_path):
    rank = write_script(tmp_path / "rank.py", FAKE_RANK)
    memory = {}

    def on_sample(pid, t0):
        tree = memory.setdefault("tree", harness.TreeMemory(pid))
        tree.sample(harness.process_children(), with_pss=True)
    run = harness.run_watched([sys.executable, rank, "0.6"], tmp_path, dict(os.environ, RANK="0"),
                              str(tmp_path / "out.log"), interval=0.05, timeout=60, on_sample=on_sample)
    assert run["rc"] == 0 and not run["timed_out"] and 0.6 < run["exit_s"] < 30
    peaks = memory["tree"].summary()
    assert peaks["processes_at_peak"] == peaks["max_processes"] == 2  # the rank and its worker
    assert peaks["peak_rss_mb"] > HELD_MIB and 0 < peaks["peak_pss_mb"] <= peaks["peak_rss_mb"]
    assert 0 < peaks["main_process_hwm_mb"] < peaks["peak_rss_mb"]  # the root alone does not hold the 32 MiB
    out = run["output"]
    assert set(out.bars) == {"phase"} and out.bars["phase"]["last"].endswith("2/2")  # '\r' ended the first
    assert [line for _, line in out.lines if line.startswith("rank 0 worker")]
    assert "phase: 100%" in (tmp_path / "out.log").read_text()
    assert set(run["cpu"]) == {"run_cpu_s", "sampling_cpu_s", "other_processes_cpu_s", "other_processes_share",
                               "loadavg_1min_max"}
    assert run["cpu"]["run_cpu_s"] >= 0.2 and run["cpu"]["loadavg_1min_max"] > 0  # the rank's CPU, reaped


def test_run_watched_kills_the_whole_session_at_its_timeout(tmp_path):
    rank = write_script(tmp_path / "rank.py", FAKE_RANK)
    run = harness.run_watched([sys.executable, rank, "60"], tmp_path, os.environ, str(tmp_path / "out.log"),
                              interval=0.05, timeout=1.5)
    assert run["timed_out"] and run["rc"] == -9 and run["exit_s"] < 30
    worker = int(next(line for _, line in run["output"].lines if line.startswith("rank")).split()[-1])
    for _ in range(100):  # the killed worker may linger a moment as a zombie before its new parent reaps it
        stat = harness.try_read(f"/proc/{worker}/stat")
        if stat is None or stat.rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the worker {worker} outlived its session's kill")


def test_startup_sampler_finds_each_rank_below_the_launcher(tmp_path):
    import startup
    rank = write_script(tmp_path / startup.SCRIPT, FAKE_RANK)  # named as the training script: a rank
    launcher = write_script(tmp_path / "launcher.py", FAKE_LAUNCHER)
    sampler = startup.RankSampler(pss_interval=0.2)
    run = harness.run_watched([sys.executable, launcher, "0.8"], tmp_path, dict(os.environ, RANK_SCRIPT=rank),
                              str(tmp_path / "out.log"), interval=0.05, timeout=60,
                              on_sample=lambda pid, t0: sampler.sample(pid))
    assert run["rc"] == 0
    ranks = sampler.summary()
    assert [r["rank"] for r in ranks] == [3, 5]  # read from each rank's environment
    for r in ranks:
        assert r["processes_at_peak"] == 2 and r["peak_rss_mb"] > HELD_MIB and r["peak_pss_mb"] > 0
    assert 0 < sampler.launcher_peak_kib / 1024 < HELD_MIB  # the launcher counted apart, not as a rank


def test_startup_table_shows_the_baseline_ratios():
    import startup
    run = {"ranks": 1, "start": "second", "rc": 0, "first_step_s": 10.0, "exit_s": 12.0,
           "peak_rss_mb_per_rank": 900.0, "peak_pss_mb_per_rank": 400.0,
           "cpu": {"run_cpu_s": 11.0, "other_processes_share": 0.05}}
    slower = dict(run, first_step_s=30.0, peak_pss_mb_per_rank=800.0)
    res = {"repo": "/this", "n_records": 5000, "file_mb": 1.2, "n_images": 300, "num_workers": 2, "cpus": 2,
           "runs": [run], "goals": startup.goals_of([run]), "total_s": 60.0,
           "baseline": {"repo": "/before", "runs": [slower]}}
    assert res["goals"]["first_step_goal_met"] and res["goals"]["rss_goal_met"]
    text = startup.table(res)
    assert text.index("repo /before") < text.index("repo /this")
    assert "3.0x" in text and "2.0x" in text  # first step 30 s / 10 s, PSS 800 / 400 MB


def test_files_under_counts_apparent_and_allocated_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one").write_bytes(b"x" * 10000)
    (tmp_path / "two").write_bytes(b"y" * 5000)
    with open(tmp_path / "a" / "sparse", "wb") as f:
        f.truncate(1 << 20)  # 1 MiB that takes no blocks
    files, apparent, allocated = harness.files_under(tmp_path)
    assert (files, apparent) == (3, 15000 + (1 << 20))
    assert 15000 <= allocated < apparent
    harness.drop_page_cache(tmp_path)  # only clean pages go; the files stay as they are
    assert harness.files_under(tmp_path) == (files, apparent, allocated)
    result, seconds = harness.time_call(sorted, [3, 1, 2])
    assert result == [1, 2, 3] and 0 <= seconds < 1
