"""Checkpoints: safetensors by default, upstream-style .pth on request, atomic writes, upstream v1 files,
--keep_last, and --resume that continues a killed run to exactly the weights of one that never stopped.

- safetensors and .pth round trips keep both tied names and give exact logits.
- A process killed (SIGKILL) between writing a checkpoint and renaming it leaves the previous file intact;
  a truncated file is an error naming it.
- Upstream v1 state dicts (27M and MoE, `_orig_mod.` prefixes, no sidecar) load with the right inferred
  config and identical logits.
- A run killed with SIGKILL (at an epoch boundary, then again inside an epoch after a resume) and resumed
  ends with the weights of an uninterrupted run, and its loss log has each step once. SIGTERM saves at that
  step, exits 143 and resumes to the same weights. A 1-rank run resumed on 2 gloo ranks maps its position
  and finishes.
- `--keep_last 2 --save_format pth` keeps exactly the last two step files; an offline wandb run directory
  is created with the logged keys and the config.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from model.checkpoint import load_vlm, read_state_dict, resolve_checkpoint, save_checkpoint
from model.model import MiniMindVLM
from tests.conftest import ROOT
from tests.test_train_e2e import ENV, assert_same_weights, run, tiny_run_args, uniform_data


def test_safetensors_and_pth_round_trip(tmp_path, tiny_cfg, tokenizer):
    model = MiniMindVLM(tiny_cfg())
    for suffix in (".safetensors", ".pth"):
        path = tmp_path / f"m{suffix}"
        save_checkpoint(model, path, tiny_cfg(), extra={"step": 7})
        sd = read_state_dict(path)
        assert sd.keys() == model.state_dict().keys()  # both tied names, as upstream's files have them
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
        assert json.loads((tmp_path / "m.json").read_text())["step"] == 7
        loaded, _ = load_vlm(path, tokenizer)
        ids = torch.randint(3, 6400, (1, 9))
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert resolve_checkpoint(tmp_path / "m") == str(tmp_path / "m.safetensors")  # preferred when both exist
    os.remove(tmp_path / "m.safetensors")
    assert resolve_checkpoint(tmp_path / "m.safetensors") == str(tmp_path / "m.pth")


KILL_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from model.checkpoint import save_checkpoint
from model.tokenizer import image_token_ids, load_tokenizer
from model.LMConfig import LMConfig
from model.model import MiniMindVLM
cfg = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, image_ids=image_token_ids(load_tokenizer({tok!r})))
torch.manual_seed(1)
real_replace = os.replace
def die(src, dst):  # the new file is fully written to its temporary name: die before it replaces the old one
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die
save_checkpoint(MiniMindVLM(cfg), {path!r}, cfg)
"""


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_kill_during_a_save_leaves_the_previous_file(tmp_path, tiny_cfg, suffix):
    path = tmp_path / f"ckpt{suffix}"
    old = MiniMindVLM(tiny_cfg())
    save_checkpoint(old, path, tiny_cfg())
    script = KILL_DURING_SAVE.format(root=ROOT, tok=os.path.join(ROOT, "model/minimind_tokenizer"), path=str(path))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (tmp_path / f"ckpt{suffix}.tmp").exists()  # the interrupted write
    sd = read_state_dict(path)  # the previous checkpoint, intact
    assert all(torch.equal(sd[k], v) for k, v in old.state_dict().items())


def test_truncated_checkpoint_error_names_the_file(tmp_path, tiny_cfg):
    path = tmp_path / "bad.safetensors"
    save_checkpoint(MiniMindVLM(tiny_cfg()), path, tiny_cfg())
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read checkpoint .*bad.safetensors"):
        read_state_dict(path)


@pytest.mark.parametrize("dim,n_layers,moe", [(512, 8, False), (768, 16, False), (512, 8, True)])
def test_upstream_v1_files_load_unchanged(tmp_path, image_ids, tokenizer, dim, n_layers, moe):
    """A fp32 .pth with upstream v1's key list, both tied names, `_orig_mod.` prefixes and no sidecar."""
    from model.LMConfig import LMConfig
    cfg = LMConfig(dim=dim, n_layers=n_layers, use_moe=moe, image_ids=image_ids)
    ref = MiniMindVLM(cfg)
    sd = {f"_orig_mod.{k}": v.clone() for k, v in ref.state_dict().items()}
    assert "_orig_mod.tok_embeddings.weight" in sd and "_orig_mod.output.weight" in sd
    path = tmp_path / f"{dim}{'_moe' if moe else ''}_vlm_sft.pth"
    torch.save(sd, path)
    model, got = load_vlm(path, tokenizer)
    assert (got.dim, got.n_layers, got.use_moe, got.n_kv_heads) == (dim, n_layers, moe, 8)
    ids = torch.randint(3, 6400, (1, 12))
    assert torch.equal(model(ids).logits, ref.eval()(ids).logits)


def train_args(tmp_path, tower, data, out, *extra):
    return [sys.executable, "1-pretrain_vlm.py", *data, *tiny_run_args(tmp_path, tower), "--batch_size", 4,
            "--max_steps", 6, "--save_interval", 2, "--out_dir", out, *extra]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, random_tower):
    data = uniform_data(tmp_path, 12)  # 3 steps per epoch: the kill at step 3 falls on an epoch boundary...
    run(*train_args(tmp_path, random_tower, data, tmp_path / "full"))
    killed = tmp_path / "killed"
    for kill_at in ("KILL:3", "KILL:5"):  # ...and the one at 5 inside an epoch, after a resume
        p = subprocess.run([str(c) for c in train_args(tmp_path, random_tower, data, killed,
                                                       *(["--resume"] if kill_at == "KILL:5" else []))],
                           cwd=ROOT, env=dict(ENV, MINIMIND_TEST_SIGNAL=kill_at), capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    p = run(*train_args(tmp_path, random_tower, data, killed, "--resume"))
    assert "resumed from" in p.stdout and "step 4" in p.stdout  # the last save before the kill at 5
    assert_same_weights(tmp_path / "full", killed)
    steps = [json.loads(line)["step"] for line in open(killed / "64_vlm_pretrain_log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # the curve has each step once


def test_sigterm_saves_then_resume_equals_an_uninterrupted_run(tmp_path, random_tower):
    data = uniform_data(tmp_path, 12)
    run(*train_args(tmp_path, random_tower, data, tmp_path / "full"))
    out = tmp_path / "term"
    p = subprocess.run([str(c) for c in train_args(tmp_path, random_tower, data, out)], cwd=ROOT,
                       env=dict(ENV, MINIMIND_TEST_SIGNAL="TERM:3"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-3000:]
    assert "stopped by SIGTERM after step 3" in p.stdout
    assert json.load(open(out / "64_vlm_pretrain.json"))["step"] == 3  # saved at the step it stopped
    run(*train_args(tmp_path, random_tower, data, out, "--resume"))
    assert_same_weights(tmp_path / "full", out)


def test_resume_on_two_ranks_from_a_one_rank_run(tmp_path, random_tower):
    data = uniform_data(tmp_path, 16)
    out = tmp_path / "r"
    p = subprocess.run([str(c) for c in train_args(tmp_path, random_tower, data, out)], cwd=ROOT,
                       env=dict(ENV, MINIMIND_TEST_SIGNAL="KILL:2"), capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL
    args = train_args(tmp_path, random_tower, data, out, "--resume")
    args[args.index("--batch_size") + 1] = 2  # the same global batch over 2 ranks
    p = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, *args[1:])
    assert "resume: the layout changed" in p.stdout and "maps to step" in p.stdout
    assert json.load(open(out / "64_vlm_pretrain.json"))["step"] == 6


def test_keep_last_and_pth_format(tmp_path, random_tower):
    data = uniform_data(tmp_path, 12)
    out = tmp_path / "k"
    run(*train_args(tmp_path, random_tower, data, out, "--save_interval", 1, "--keep_last", 2, "--save_format",
                    "pth"))
    files = sorted(f.name for f in out.iterdir() if f.name.startswith("64_vlm_pretrain"))
    assert "64_vlm_pretrain.pth" in files and not any(f.endswith(".safetensors") for f in files)
    assert [f for f in files if "_step" in f] == [f"64_vlm_pretrain_step0000000{n}.{ext}" for n in (5, 6)
                                                  for ext in ("json", "pth")]
    sd = torch.load(out / "64_vlm_pretrain.pth", weights_only=True)  # upstream-style: a plain state dict
    assert "output.weight" in sd and "tok_embeddings.weight" in sd


def test_wandb_offline_run_logs_the_keys(tmp_path, random_tower):
    data = uniform_data(tmp_path, 8)
    out = tmp_path / "w"
    run(*train_args(tmp_path, random_tower, data, out, "--use_wandb", "--max_steps", 2, "--log_interval", 1))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb dir"
    blob = b"".join(f.read_bytes() for f in runs[0].rglob("*") if f.is_file())
    for key in (b"loss", b"lr", b"tokens_per_s", b"learning_rate"):  # logged metrics and the config
        assert key in blob, key
