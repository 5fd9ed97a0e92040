"""Both training scripts, the batch evaluator and DDP runs, end to end on CPU with tiny data.

Pretraining lowers the loss and writes checkpoint, sidecar and curve; SFT starts from stage 1's file; batch
evaluation with and without the grey control; clear errors for missing start weights and a missing CLIP
directory; a 2-process torchrun run, and two 1-process torchrun launches as two nodes (--nnodes 2), train
the same weights as 1 process with twice the batch; batch 4 x 2 accumulation steps trains the same weights
as batch 8; --compile compiles at least one graph and gives eager's losses and weights.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from model.checkpoint import trained_context
from tests.conftest import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", WANDB_MODE="offline",
           PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")


def run(*cmd, cwd=ROOT):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_demo_data import make_demo_data
    d = tmp_path_factory.mktemp("demo")
    make_demo_data(str(d), n_train=48, n_eval=8, eval_images_dir=str(d / "eval_images"), seed=0,
                   image_size=224, progress=False)
    return d


def common(demo_data, tower, out):
    return ["--images_dir", demo_data / "images", "--vision_model", tower, "--out_dir", out, "--dim", 64,
            "--n_layers", 2, "--num_workers", 0, "--log_interval", 1, "--dtype", "float32", "--device", "cpu"]


def losses(out, name):
    return [r["loss"] for r in map(json.loads, open(out / f"{name}_log.jsonl")) if "loss" in r]  # not val records


def test_a_run_and_its_data_check_train_at_one_length(tmp_path, tiny_cfg):
    """--max_seq_len, else the starting checkpoint's training length, else the recipe's: the run and --check_data
    resolve it alike (trainer/train.py: start_weights_path, training_length)."""
    from types import SimpleNamespace

    from model.checkpoint import save_checkpoint
    from model.model import MiniMindVLM
    from trainer.train import start_weights_path, training_length
    recipe = SimpleNamespace(init_suffix="_vlm_pretrain", max_seq_len=640)
    args = SimpleNamespace(init_from="auto", out_dir=str(tmp_path), dim=64, use_moe=False, max_seq_len=None)
    cfg = tiny_cfg()
    save_checkpoint(MiniMindVLM(cfg), tmp_path / "64_vlm_pretrain.safetensors", cfg,
                    extra={"args": {"max_seq_len": 96}})  # what stage 1 records
    init = start_weights_path(recipe, args)
    assert init == str(tmp_path / "64_vlm_pretrain.safetensors") and training_length(recipe, args, init) == 96
    assert training_length(recipe, SimpleNamespace(**dict(vars(args), max_seq_len=50)), init) == 50
    none = SimpleNamespace(**dict(vars(args), init_from="none"))
    assert start_weights_path(recipe, none) == "none" and training_length(recipe, none, "none") == 640


def test_pretrain_sft_eval(demo_data, random_tower, tmp_path):
    out = tmp_path / "out"
    run(sys.executable, "1-pretrain_vlm.py", "--data_path", demo_data / "pretrain.jsonl", "--init_from", "none",
        "--batch_size", 8, "--epochs", 3, "--learning_rate", 3e-3, "--max_seq_len", 120,
        *common(demo_data, random_tower, out))
    pre = losses(out, "64_vlm_pretrain")
    assert len(pre) == 18 and sum(pre[-3:]) / 3 < 0.85 * sum(pre[:3]) / 3, pre
    for f in ("64_vlm_pretrain.safetensors", "64_vlm_pretrain.json", "64_vlm_pretrain_loss.png"):
        assert (out / f).stat().st_size > 0
    meta = json.load(open(out / "64_vlm_pretrain.json"))
    assert meta["config"]["dim"] == 64 and meta["step"] == 18

    # stage 2 starts from stage 1's file by default (--init_from auto)
    p = run(sys.executable, "2-sft_vlm.py", "--data_path", demo_data / "sft.jsonl", "--batch_size", 8,
            "--max_steps", 6, "--learning_rate", 1e-3, *common(demo_data, random_tower, out))
    assert "64_vlm_pretrain.safetensors" in p.stdout
    assert "sequences up to 120 tokens" in p.stdout  # stage 2 trains at stage 1's length unless told otherwise
    assert trained_context(out / "64_vlm_sft.safetensors")[0] == 120  # and records it: the served context
    sft = losses(out, "64_vlm_sft")
    assert len(sft) == 6 and sft[-1] < sft[0]

    for control in ("none", "blank"):
        p = run(sys.executable, "3-eval_chat.py", "--ckpt", out / "64_vlm_sft.safetensors", "--vision_model", random_tower,
                "--data_path", demo_data / "eval_color.jsonl", "--images_dir", demo_data / "images",
                "--out", tmp_path / f"preds_{control}.jsonl", "--max_new_tokens", 4, "--control", control,
                "--feature_cache", out / "feature_cache", "--device", "cpu")
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        assert summary["n"] == 8 and 0 <= summary["exact"] <= summary["contains"] <= 1
        preds = [json.loads(l) for l in open(tmp_path / f"preds_{control}.jsonl")]
        assert len(preds) == 8 and all("prediction" in r for r in preds)

    # gallery mode streams one answer per image; interactive mode reads questions from stdin
    chat = [sys.executable, "3-eval_chat.py", "--ckpt", out / "64_vlm_sft.safetensors", "--vision_model", random_tower,
            "--image_dir", demo_data / "eval_images", "--max_new_tokens", 3, "--device", "cpu"]
    p = run(*chat)
    assert p.stdout.count("[0") == 8 and p.stdout.count("🤖") == 8
    p = subprocess.run([str(c) for c in chat + ["--interactive"]], input="What colour?\nAnd now?\n/exit\n",
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("🤖") == 2 and "[image: " in p.stdout


def test_missing_start_weights_is_explained(demo_data, random_tower, tmp_path):
    p = subprocess.run([sys.executable, "2-sft_vlm.py", "--data_path", str(demo_data / "sft.jsonl"),
                        *map(str, common(demo_data, random_tower, tmp_path))],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "64_vlm_pretrain.pth not found" in p.stderr and "--init_from none" in p.stderr


def test_missing_vision_model_is_explained(demo_data, tmp_path):
    p = subprocess.run([sys.executable, "1-pretrain_vlm.py", "--data_path", str(demo_data / "pretrain.jsonl"),
                        "--init_from", "none", "--vision_model", str(tmp_path / "nope"), "--dim", "64",
                        "--n_layers", "2", "--out_dir", str(tmp_path), "--device", "cpu"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "does not exist" in p.stderr and "clip-vit-base-patch32" in p.stderr



def uniform_data(tmp_path, n):
    """n records with identical text and different images, so every batch has the same number of loss
    tokens (token-mean losses then average exactly across ranks and micro-batches)."""
    from PIL import Image
    imgs = tmp_path / "img"
    imgs.mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        Image.new("RGB", (224, 224), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(imgs / f"{i}.png")
        recs.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "a colour"}]})
    data = tmp_path / f"d{n}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ["--data_path", data, "--images_dir", imgs]


def tiny_run_args(tmp_path, tower):
    return ["--vision_model", tower, "--init_from", "none", "--dim", 64, "--n_layers", 2, "--num_workers", 0,
            "--dtype", "float32", "--epochs", 2, "--learning_rate", 1e-3, "--log_interval", 1,
            "--feature_cache", tmp_path / "cache", "--device", "cpu"]


def assert_same_weights(dir_a, dir_b):
    from model.checkpoint import read_state_dict, resolve_checkpoint
    a = read_state_dict(resolve_checkpoint(dir_a / "64_vlm_pretrain"))
    b = read_state_dict(resolve_checkpoint(dir_b / "64_vlm_pretrain"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k


def test_ddp_two_ranks_equal_one_process_double_batch(tmp_path, random_tower):
    """2 gloo ranks x batch 4 must train the same weights as 1 process x batch 8."""
    args = uniform_data(tmp_path, 32) + tiny_run_args(tmp_path, random_tower)
    run(sys.executable, "1-pretrain_vlm.py", *args, "--batch_size", 8, "--out_dir", tmp_path / "one")
    run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "1-pretrain_vlm.py",
        *args, "--batch_size", 4, "--out_dir", tmp_path / "two")
    assert json.load(open(tmp_path / "two" / "64_vlm_pretrain.json"))["step"] == 8
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    la, lb = losses(tmp_path / "one", "64_vlm_pretrain"), losses(tmp_path / "two", "64_vlm_pretrain")
    assert la == pytest.approx(lb, abs=1e-5)  # the logged loss is the global batch's under DDP too


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_process_double_batch(tmp_path, random_tower):
    """Two torchrun launches as two nodes (--nnodes 2 --node_rank 0/1, static rendezvous at --master_addr),
    1 gloo rank x batch 4 each, train the same weights and log the same losses as 1 process x batch 8. They
    share out_dir and a new feature cache, which they fill together, as nodes on a shared filesystem would."""
    args = uniform_data(tmp_path, 32) + tiny_run_args(tmp_path, random_tower)
    run(sys.executable, "1-pretrain_vlm.py", *args, "--batch_size", 8, "--out_dir", tmp_path / "one")
    port, procs, logs = free_port(), [], []
    try:
        for node in (0, 1):
            logs.append(open(tmp_path / f"node{node}.log", "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                 "1-pretrain_vlm.py", *map(str, args), "--batch_size", "4", "--out_dir", str(tmp_path / "nodes"),
                 "--feature_cache", str(tmp_path / "nodes_cache")],  # the last --feature_cache counts
                cwd=ROOT, env=ENV, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 180  # a hang fails the test; a node that fails stops the wait at once
        while time.monotonic() < deadline and not all(p.poll() == 0 for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        for node, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            assert p.poll() == 0, f"node {node} exited {p.poll()} (None: still running):\n{log.read()[-5000:]}"
    finally:
        for p in procs:  # a hang or a failure: kill both launches and their workers (each is a process group)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    assert json.load(open(tmp_path / "nodes" / "64_vlm_pretrain.json"))["step"] == 8
    assert_same_weights(tmp_path / "one", tmp_path / "nodes")
    la, lb = losses(tmp_path / "one", "64_vlm_pretrain"), losses(tmp_path / "nodes", "64_vlm_pretrain")
    assert la == pytest.approx(lb, abs=1e-5)


def test_accumulation_equals_bigger_batch(tmp_path, random_tower):
    """batch 4 x accumulation 2 trains the same weights as batch 8 (the loss is divided by the accumulation
    steps); a dataset that leaves an incomplete group still gives whole steps, epoch by epoch."""
    common = tiny_run_args(tmp_path, random_tower)
    d32 = uniform_data(tmp_path, 32)
    run(sys.executable, "1-pretrain_vlm.py", *d32, *common, "--batch_size", 8, "--out_dir", tmp_path / "big")
    run(sys.executable, "1-pretrain_vlm.py", *d32, *common, "--batch_size", 4, "--accumulation_steps", 2,
        "--out_dir", tmp_path / "acc")
    assert_same_weights(tmp_path / "big", tmp_path / "acc")
    # 36 samples = 9 micro-batches of 4: 4 full groups per epoch, the 9th micro-batch is dropped
    run(sys.executable, "1-pretrain_vlm.py", *uniform_data(tmp_path, 36), *common, "--batch_size", 4,
        "--accumulation_steps", 2, "--out_dir", tmp_path / "acc36")
    assert json.load(open(tmp_path / "acc36" / "64_vlm_pretrain.json"))["step"] == 8
    assert [r["epoch"] for r in map(json.loads, open(tmp_path / "acc36" / "64_vlm_pretrain_log.jsonl"))] == [0] * 4 + [1] * 4


def test_compile_trains_like_eager(tmp_path, random_tower):
    """--compile (torch.compile, dynamic shapes) runs the real training step and gives eager's losses."""
    common = tiny_run_args(tmp_path, random_tower) + ["--batch_size", 4, "--max_steps", 3]
    data = uniform_data(tmp_path, 12)
    run(sys.executable, "1-pretrain_vlm.py", *data, *common, "--out_dir", tmp_path / "eager")
    p = run(sys.executable, "1-pretrain_vlm.py", *data, *common, "--compile", "--out_dir", tmp_path / "compiled")
    n_graphs = int(p.stdout.split("torch.compile: ")[1].split()[0])
    assert n_graphs >= 1, p.stdout
    eager, compiled = losses(tmp_path / "eager", "64_vlm_pretrain"), losses(tmp_path / "compiled", "64_vlm_pretrain")
    assert len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert_same_weights(tmp_path / "eager", tmp_path / "compiled")


def test_compile_auto_is_on_for_long_runs_where_it_can_build(monkeypatch):
    import shutil
    import torch
    from trainer.train import COMPILE_MIN_STEPS, compile_wanted
    cpu = torch.device("cpu")
    assert compile_wanted("on", 10, cpu) and not compile_wanted("off", 10 ** 6, cpu)
    assert not compile_wanted("auto", COMPILE_MIN_STEPS - 1, cpu)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert compile_wanted("auto", COMPILE_MIN_STEPS, cpu)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler: inductor could not build kernels
    assert not compile_wanted("auto", COMPILE_MIN_STEPS, cpu)
