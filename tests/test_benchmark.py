"""benchmarks/benchmark.py --quick runs every section end to end (training scripts in their own processes with the
steady-state subtraction, one stream's decoding per dtype in fresh processes, the API under 1 and 2 clients) and
its JSON has every field, with the machine. The upstream rows run against a stand-in tree written here (a
training script and a model/ package with upstream v1's interfaces, built on this project's model), since
upstream's code is not part of this repository: what is checked is the machinery that times upstream's own
scripts in processes of their own. (The numbers themselves are for BENCHMARKS.md; no test asserts a speed.)
"""
import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

STANDIN_TRAIN = """
# A stand-in for upstream v1's 1-pretrain_vlm.py with its command line: reads the records, works a while on each.
import argparse, json, time
p = argparse.ArgumentParser()
for flag in ("--epochs", "--batch_size", "--device", "--num_workers", "--data_path", "--log_interval",
             "--save_interval", "--out_dir"):
    p.add_argument(flag)
args = p.parse_args()
for record in json.load(open(args.data_path)):
    time.sleep(0.05)
"""
STANDIN_CONFIG = """
from model_project.LMConfig import LMConfig as _Ours
class LMConfig(_Ours):
    def __init__(self, **kw):
        super().__init__(**kw)
"""
STANDIN_MODEL = """
# upstream v1's Transformer interface (generate(idx, eos, max_new_tokens, temperature, image_encoders) yielding
# the answer so far), on this project's model: a stand-in, not upstream's code.
import torch
from model_project.model import MiniMindVLM
class Transformer(MiniMindVLM):
    def generate(self, idx, eos, max_new_tokens, temperature=0.0, image_encoders=None, **kw):
        start = idx.shape[1]
        for token in self.stream_generate(idx, [image_encoders[0]], max_new_tokens=max_new_tokens - start - 1,
                                          eos_token_id=eos):
            if int(token[0]) == eos:
                return
            idx = torch.cat([idx, token[:, None]], dim=1)
            yield idx[:, start:]
"""


def standin_upstream(root):
    """The stand-in tree, with data in upstream_v1_harness.sh's layout (records 8 and 24, as --quick runs)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from train import data_paths, make_quick_data
    (root / "model").mkdir(parents=True)
    (root / "1-pretrain_vlm.py").write_text(STANDIN_TRAIN)
    for name, text in (("LMConfig.py", STANDIN_CONFIG), ("model.py", STANDIN_MODEL)):
        (root / "model" / name).write_text(textwrap.dedent(text).replace("model_project", "model"))
    records = make_quick_data(str(root), 24)
    for n in (8, 24):
        with open(data_paths(str(root), n)[0], "w") as f:
            json.dump(records[:n], f)
    return root


def test_quick_benchmark_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    upstream = standin_upstream(tmp_path / "upstream")
    p = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--quick", "--out", str(out), "--workdir",
                        str(tmp_path / "work"), "--upstream_dir", str(upstream)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == json.loads(out.read_text())
    assert res["quick"] is True and res["machine"]["cpu_kind"] in ("amx", "avx512_bf16", "avx2", "other")
    assert "samples/s" in p.stdout and "x upstream" in p.stdout and "aggregate tok/s" in p.stdout  # the tables
    train = res["train"]
    assert set(train["runs"]) == {"upstream-own", "ours-cold", "ours-warm"}  # --quick leaves out the --compile rows
    for run in train["runs"].values():  # tiny runs: start-up noise can swamp the difference, so no sign is asserted
        assert set(run) >= {"samples_per_s", "tflops_per_s", "share_of_peak", "gflop_per_sample", "vs_upstream_own"}
        assert set(run["wall_s"]) == {"8", "24"} and min(run["wall_s"].values()) > 0
    standin = train["runs"]["upstream-own"]  # 16 more records x 0.05 s: 20 samples/s, well above the noise
    assert 10 < standin["samples_per_s"] < 25 and standin["vs_upstream_own"] == 1
    assert train["runs"]["ours-cold"]["gflop_per_sample"] > train["runs"]["ours-warm"]["gflop_per_sample"]
    decode = res["decode"]["variants"]
    assert {"upstream-own", "engine-auto", "engine-float32", "engine-int8"} <= set(decode)
    assert all(v["tokens_per_s"] > 0 and v["first_token_s"] > 0 for v in decode.values())
    assert decode["engine-auto"]["vs_upstream_own"] > 0 and decode["engine-auto"]["bare_steps_per_s"] > 0
    for server in ("batched-auto", "one-at-a-time"):
        clients = res["serving"]["servers"][server]["clients"]
        assert set(clients) == {"1", "2"}
        assert all(c["aggregate_tokens_per_s"] > 0 and 0 < c["ttft_p50_s"] <= c["ttft_p95_s"] for c in clients.values())
