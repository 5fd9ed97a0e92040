"""The validation loss: --val_fraction holds out records by a hash of their id (disjoint from training, the same
every time); the held-out loss is logged every --eval_interval steps and at the end, is the same on 1 process
and on 2 gloo ranks with half the batch, is kept across a SIGKILL + --resume, and is drawn with the training
loss in one PNG; --val_data_path reads a separate file (here under bf16 autocast).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.test_train_e2e import ENV, run
from trainer.data_index import build_index, held_out, held_out_record


def varied_data(tmp_path, n, name="d"):
    """n records over n images, answers of two kinds with the same number of tokens (so every batch has as
    many loss tokens as any other, and 2 ranks train exactly as 1 process with twice the batch)."""
    imgs = tmp_path / "img"
    imgs.mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        Image.new("RGB", (224, 224), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(imgs / f"{i}.png")
        answer = "a colour" if i % 2 else "a shade"
        recs.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": answer}]})
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data, imgs


def test_split_by_record_id_is_disjoint_and_stable(tmp_path, tokenizer):
    data, _ = varied_data(tmp_path, 400)
    index = build_index(data, tokenizer, 640)
    held = held_out(index, 0.2)
    assert 40 < held.sum() < 120  # about a fifth
    assert np.array_equal(held, held_out(build_index(data, tokenizer, 640), 0.2))  # the same every time
    # by id, not by position: the same record is held out when the file is reordered
    lines = data.read_text().splitlines()
    (tmp_path / "rev.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    rev = build_index(tmp_path / "rev.jsonl", tokenizer, 640)
    ids = {index.id(r) for r in np.flatnonzero(held)}
    assert ids == {rev.id(r) for r in np.flatnonzero(held_out(rev, 0.2))}
    # a larger fraction holds out a superset; records without an id are split by their line
    assert ids <= {index.id(r) for r in np.flatnonzero(held_out(index, 0.5))}
    no_id = [held_out_record(None, line, 0.5) for line in range(1, 201)]
    assert 60 < sum(no_id) < 140 and no_id == [held_out_record(None, line, 0.5) for line in range(1, 201)]
    assert not any(held_out_record(f"r{i}", None, 0.0) for i in range(100))
    assert all(held_out_record(f"r{i}", None, 1.0) for i in range(100))


def train_args(data, imgs, tower, cache):
    return ["--data_path", data, "--images_dir", imgs, "--vision_model", tower, "--init_from", "none", "--dim", 64,
            "--n_layers", 2, "--num_workers", 0, "--dtype", "float32", "--learning_rate", 1e-3, "--log_interval", 1,
            "--feature_cache", cache, "--device", "cpu", "--max_steps", 6, "--eval_interval", 2, "--seed", 3]


def log_of(out):
    return [json.loads(line) for line in open(out / "64_vlm_pretrain_log.jsonl")]


def val_losses(out):
    return [(r["step"], r["val_loss"]) for r in log_of(out) if "val_loss" in r]


def test_validation_loss_interval_ranks_and_resume(tmp_path, random_tower, tokenizer):
    # as many records as give 32 training samples: 4 whole global batches of 8, on 1 rank or 2
    n = next(n for n in range(32, 100) if sum(not held_out_record(f"r{i}", None, 0.25) for i in range(n)) == 32)
    data, imgs = varied_data(tmp_path, n)
    args = train_args(data, imgs, random_tower, tmp_path / "cache") + ["--val_fraction", 0.25]
    p = run(sys.executable, "1-pretrain_vlm.py", *args, "--batch_size", 8, "--out_dir", tmp_path / "one")
    one = val_losses(tmp_path / "one")
    assert [s for s, _ in one] == [2, 4, 6] and all(0 < v < 20 for _, v in one)
    assert one[-1][1] < one[0][1]  # it learns something that carries over to held-out records
    n_val = int(held_out(build_index(data, tokenizer, 640), 0.25).sum())
    assert n_val == n - 32 > 4 and "32 training samples" in p.stdout and f"{n_val} validation samples" in p.stdout
    assert (tmp_path / "one" / "64_vlm_pretrain_loss.png").stat().st_size > 0
    # the training losses are logged as before, beside the validation records
    assert [r["step"] for r in log_of(tmp_path / "one") if "loss" in r] == [1, 2, 3, 4, 5, 6]

    # 2 ranks x batch 4: the same training and the same held-out loss (sums over ranks, not means of means)
    run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "1-pretrain_vlm.py",
        *args, "--batch_size", 4, "--out_dir", tmp_path / "two")
    two = val_losses(tmp_path / "two")
    assert [s for s, _ in two] == [2, 4, 6]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], abs=1e-5)

    # killed after step 3 (last save at step 2), resumed: the validation curve of the run that never stopped
    killed = tmp_path / "killed"
    cmd = [sys.executable, "1-pretrain_vlm.py", *args, "--batch_size", 8, "--out_dir", killed, "--save_interval", 2]
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=dict(ENV, MINIMIND_TEST_SIGNAL="KILL:3"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    assert [s for s, _ in val_losses(killed)] == [2]
    run(*cmd, "--resume")
    assert [s for s, _ in val_losses(killed)] == [2, 4, 6]
    assert [v for _, v in val_losses(killed)] == pytest.approx([v for _, v in one], abs=1e-6)


def test_val_data_path(tmp_path, random_tower):
    data, imgs = varied_data(tmp_path, 24)
    val, _ = varied_data(tmp_path, 6, name="val")
    args = train_args(data, imgs, random_tower, tmp_path / "cache") + ["--val_data_path", val, "--batch_size", 8,
                                                                       "--dtype", "bfloat16"]  # under autocast too
    p = run(sys.executable, "1-pretrain_vlm.py", *args, "--out_dir", tmp_path / "out")
    rec = [r for r in log_of(tmp_path / "out") if "val_loss" in r]
    assert [r["step"] for r in rec] == [2, 4, 6] and rec[0]["val_tokens"] > 0
    assert "val.jsonl: 6 validation samples" in p.stdout
