"""scripts/benchmark.py --quick runs end to end (data, tower, every training mode in its own process,
decoding, the engine's decode and serving sections) and its JSON has every field; length-grouped batches pad less than 30%, while the naive mode pads
pretraining captions to upstream's 200 tokens. (The numbers themselves are for BENCHMARKS.md; no test asserts a speed.)
"""
import json
import subprocess
import sys

from tests.conftest import ROOT

MODE_FIELDS = {"samples_per_s", "tokens_per_s", "step_s", "padding_share", "model_tflops_per_s", "peak_memory_mb",
               "mfu", "loss", "gflop_per_sample"}


def test_quick_benchmark_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "scripts/benchmark.py", "--quick", "--out", str(out), "--workdir",
                        str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == json.loads(out.read_text())
    assert "speed-up over naive" in p.stdout and "samples/s" in p.stdout  # the table
    assert res["config"]["size"] == "tiny" and res["config"]["quick"] is True
    assert set(res["hardware"]) == {"matmul_fp32_gflops", "matmul_bf16_gflops", "memory_gb_per_s"}
    assert set(res["encoder"]) == {"fp32_batch32_images_per_s", "fp32_batch1_images_per_s", "bf16_batch4_images_per_s"}
    for stage in ("pretrain", "sft"):
        assert set(res["train"][stage]) == {"ours_cold", "ours_warm", "naive"}
        for mode in res["train"][stage].values():
            assert set(mode) == MODE_FIELDS and all(v > 0 for k, v in mode.items() if k != "padding_share")
        assert res["train"][stage]["ours_warm"]["padding_share"] < 0.3  # length-grouped batches pad little
    # naive cuts and pads every sample to upstream's 200 tokens: short captions are mostly padding (SFT
    # samples are mostly cut instead)
    assert res["config"]["naive_max_seq_len"] == 200 and res["train"]["pretrain"]["naive"]["padding_share"] > 0.3
    assert {"ttft_s", "tokens_per_s", "batch8_tokens_per_s", "naive_ttft_s", "naive_tokens_per_s", "weight_bytes",
            "bandwidth_bound_tokens_per_s"} == set(res["decode"])
    assert {"pretrain_first_epoch", "pretrain_later_epochs", "pretrain_19_epochs", "sft_first_epoch",
            "sft_later_epochs", "sft_19_epochs", "decode", "decode_batch8_vs_naive_single",
            "encoder_batched_vs_per_image"} == set(res["speedup"])
    assert all(v > 0 for v in res["speedup"].values())
    # the engine sections: one stream against upstream's loop, and the API under 1 and 2 concurrent clients
    assert {"upstream", "fp32"} <= set(res["engine_decode"]["variants"])
    assert all(v["tokens_per_s"] > 0 for v in res["engine_decode"]["variants"].values())
    for server in ("batched", "one-at-a-time"):
        clients = res["serving"]["servers"][server]["clients"]
        assert set(clients) == {"1", "2"}
        assert all(c["aggregate_tokens_per_s"] > 0 and 0 < c["ttft_p50_s"] <= c["ttft_p95_s"] for c in clients.values())
    assert "API, batched: N=1" in p.stdout
