"""Every bad input gets a clear answer and nothing is lost.

tests/bad_corpus.py generates 25 kinds of dirty input: the 16 error kinds, an over-long record, a record
with turns to truncate, a PNG named .jpg, and valid images in CMYK, 16-bit grey, 1-bit, grey+alpha,
palette transparency and EXIF rotation.
- `check_data.py --full` reports each kind exactly once with its record; the quick `--check_data` finds all
  but the PNG damaged mid-file.
- Training with `skip` finishes with the 20 usable samples and lists the 17 others by kind; with `error` it
  stops before training, naming each record (first those found reading, then, without them, the four found
  decoding).
- A truncated image met at step 3 with --no_feature_cache stops the run with a saved step-2 checkpoint;
  after fixing the image, --resume ends with exactly the weights of a clean run.
- Two gloo ranks (started with torchrun's environment but without the launcher, which would stop one rank
  as soon as the other exits) with a bad image in rank 1's share: both ranks exit by themselves with status
  1, the record named once and a checkpoint saved. With `skip` and batch 1 (rank 1's micro-batch all bad)
  the run finishes and lists the record.
- Batch evaluation with `skip` lists the 16 bad records in the predictions file and scores the rest; with
  `error` it names the first.
- Every corpus image sent through open_image and the API gets 200, or 400/413 naming the field; 16-bit,
  float, 1-bit, LA, palette and colour-key transparency convert as they look.
- A checkpoint of another config names the shapes and the setting (`dim=64 (model: 128)`); a truncated
  checkpoint, a cut sidecar and weights of another size end 3-eval_chat.py and 2-sft_vlm.py with a message.
- No output anywhere has a Python traceback.
"""
import base64
import json
import shutil
import subprocess
import sys

import httpx
import pytest
import torch
from PIL import Image

from model.checkpoint import CheckpointError, load_strict, save_checkpoint
from trainer.data import LengthGroupedBatchSampler
from model.model import MiniMindVLM
from model.engine import InputError, TooLarge, open_image
from model.images import to_rgb
from tests.bad_corpus import ERROR_KINDS, MAX_SEQ_LEN, image_files, make_bad_corpus
from tests.conftest import ROOT
from tests.served_model import QUESTION, Server
from tests.test_train_e2e import ENV, assert_same_weights, tiny_run_args, uniform_data

TRACEBACK = "Traceback (most recent call last)"


def run(*cmd, timeout=300):
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_bad_corpus(str(tmp_path_factory.mktemp("corpus")))


def train_cmd(data, images, tower, out, *extra, script="1-pretrain_vlm.py"):
    return [sys.executable, script, "--data_path", data, "--images_dir", images, "--vision_model", tower,
            "--init_from", "none", "--dim", 64, "--n_layers", 2, "--num_workers", 0, "--dtype", "float32",
            "--max_seq_len", MAX_SEQ_LEN, "--batch_size", 4, "--device", "cpu", "--out_dir", out, *extra]


def test_the_corpus_has_at_least_20_kinds():
    data = image_files()
    kinds = set(ERROR_KINDS) | {"too_long", "truncated", "wrong_extension"} | {k for k, (_, kind) in data.items()
                                                                              if kind is None}
    assert len(kinds) >= 25


def test_check_data_reports_every_kind_with_its_record(corpus, tmp_path):
    data, images, expected = corpus
    report = tmp_path / "problems.jsonl"
    p = run(sys.executable, "check_data.py", "--data_path", data, "--images_dir", images, "--max_seq_len",
            MAX_SEQ_LEN, "--full", "--report", report, "--num_workers", 0)
    assert p.returncode == 1 and TRACEBACK not in p.stderr + p.stdout
    problems = [json.loads(line) for line in open(report)]
    found = {}
    for pr in problems:
        found.setdefault(pr["kind"], []).append(pr["id"] if pr["id"] is not None else pr["line"])
    assert found == {k: v for k, v in expected.items() if k != "handled"}
    for pr in problems:  # printed with file:line and id
        assert f"{data}:{pr['line']}" in p.stdout
    assert "FAILED: 16 record(s) with errors, 1 record(s) to be dropped" in p.stdout
    # the training scripts' --check_data is the same check on their own flags; quick mode reads image headers
    # and file ends only, so the one damaged-in-the-middle PNG is left to decoding (training, or --full)
    p = run(*train_cmd(data, images, "unused", tmp_path / "out", "--check_data"))
    assert p.returncode == 1 and TRACEBACK not in p.stderr + p.stdout
    for kind in set(expected) - {"handled", "image_damaged"}:
        assert f"  {kind} " in p.stdout
    assert "image_damaged" not in p.stdout and not (tmp_path / "out").exists()  # nothing trained


def test_check_data_on_clean_data_and_a_broken_json_list(tmp_path):
    args = uniform_data(tmp_path, 80)
    p = run(sys.executable, "check_data.py", *args, "--num_workers", 2)  # images checked in 2 processes
    assert p.returncode == 0 and "80 records, 80 images" in p.stdout and "OK: nothing to fix" in p.stdout
    records = [json.loads(line) for line in open(args[1])]
    broken = json.dumps(records, indent=1).replace('"a colour"\n', '"a colour",\n', 1)  # a trailing comma
    (tmp_path / "list.json").write_text(broken)
    line = broken[:broken.index('"a colour",\n')].count("\n") + 2
    p = run(sys.executable, "check_data.py", "--data_path", tmp_path / "list.json", "--images_dir", args[3])
    assert p.returncode == 1 and f"list.json:{line}: invalid JSON" in p.stdout and TRACEBACK not in p.stderr


def test_training_skip_finishes_and_lists_every_bad_record(corpus, random_tower, tmp_path):
    data, images, expected = corpus
    out = tmp_path / "out"
    p = run(*train_cmd(data, images, random_tower, out, "--on_bad_sample", "skip", "--max_steps", 3))
    assert p.returncode == 0, p.stderr[-3000:]
    n_good = 12 + len(expected["handled"]) + 2  # + the truncated record and the wrongly named PNG
    assert f"{n_good} samples" in p.stdout
    skipped = [json.loads(line) for line in open(out / "64_vlm_pretrain_skipped.jsonl")]
    assert sorted(s["kind"] for s in skipped) == sorted(ERROR_KINDS + ("too_long",))
    assert "skipping 12 bad record(s) found reading the dataset" in p.stdout
    assert "skipping 4 bad record(s) found decoding images" in p.stdout


def test_training_error_stops_before_training_naming_each_record(corpus, random_tower, tmp_path):
    data, images, expected = corpus
    p = run(*train_cmd(data, images, random_tower, tmp_path / "out", "--max_steps", 3))
    assert p.returncode == 1 and TRACEBACK not in p.stderr
    assert "12 bad record(s) found reading the dataset; stopped before training" in p.stderr
    for rid in ("no_conversations", "bad_turn", "role_order", "empty_answer", "two_markers", "missing_file"):
        assert f"(id {rid}):" in p.stderr
    assert f"{data}:25: invalid JSON" in p.stderr
    # without the records found bad on reading, decoding the images (into the feature cache) finds the rest
    images_only = tmp_path / "images_only.jsonl"
    keep = {*expected["handled"], "notes", "half", "damaged", "bomb"} | {f"good{i}" for i in range(12)}
    images_only.write_text("".join(line for line in open(data, encoding="utf-8", errors="replace")
                                   if any(line.startswith(f'{{"id": "{rid}"') for rid in keep)))
    p = run(*train_cmd(images_only, images, random_tower, tmp_path / "out", "--max_steps", 3))
    assert p.returncode == 1 and TRACEBACK not in p.stderr
    assert "4 bad record(s) found decoding images; stopped before training" in p.stderr
    for rid in ("notes", "half", "damaged", "bomb"):
        assert f"(id {rid}): image" in p.stderr


def test_thousands_of_bad_records_fit_on_a_screen(served_model, random_tower, tmp_path):
    """2,000 records whose images are all missing: training and batch evaluation stop with the count per kind
    and the first 20 records (under 40 lines), and the full list of 2,000 in a file whose path they print."""
    recs = [{"id": f"m{i}", "image": f"gone{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]} for i in range(2000)]
    data = tmp_path / "missing.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    p = run(*train_cmd(data, tmp_path, random_tower, out, "--max_steps", 3))
    assert p.returncode == 1 and TRACEBACK not in p.stderr
    shown = (p.stdout + p.stderr).strip().splitlines()
    assert len(shown) < 40, "\n".join(shown)
    assert "image_missing: 2000" in p.stderr and p.stderr.count("[image_missing]") == 20
    listed = out / "64_vlm_pretrain_bad_records.jsonl"
    assert f"all 2000 are listed in {listed}" in p.stderr
    rows = [json.loads(line) for line in open(listed)]
    assert len(rows) == 2000 and {r["kind"] for r in rows} == {"image_missing"}
    assert [r["id"] for r in rows] == [f"m{i}" for i in range(2000)]

    # evaluation: 2,000 records without an answer to score against
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "conversations": [
        {"from": "human", "value": "hi"}]}) + "\n" for i in range(2000)))
    ckpt, _ = served_model
    p = run(sys.executable, "3-eval_chat.py", "--ckpt", ckpt, "--vision_model", random_tower, "--data_path",
            tmp_path / "eval.jsonl", "--out", tmp_path / "preds.jsonl", "--device", "cpu", "--feature_cache", "")
    assert p.returncode == 1 and TRACEBACK not in p.stderr
    assert len((p.stdout + p.stderr).strip().splitlines()) < 40 and "role_order: 2000" in p.stderr
    assert len(open(tmp_path / "preds_bad_records.jsonl").readlines()) == 2000


def order_of_samples(n, batch_size, ranks=1, seed=1337):
    """The records each micro-batch of epoch 0 holds, per rank (as the trainer's sampler makes them)."""
    return [list(LengthGroupedBatchSampler([0] * n, batch_size, ranks, r, seed, group=1)) for r in range(ranks)]


def break_image(images, index):
    path = images / f"{index}.png"
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    return lambda: path.write_bytes(good)


def test_bad_image_mid_training_stops_with_a_resumable_checkpoint(random_tower, tmp_path):
    """Decoding in the loop (--no_feature_cache): a truncated image met at step 3 stops the run with a message
    naming it, after saving step 2; fixed, --resume finishes with exactly the weights of a clean run."""
    args = uniform_data(tmp_path, 16) + tiny_run_args(tmp_path, random_tower) + [
        "--batch_size", 4, "--no_feature_cache", "--length_group", 1]
    subprocess.run([sys.executable, "1-pretrain_vlm.py", *map(str, args), "--out_dir", str(tmp_path / "clean")],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    bad = order_of_samples(16, 4)[0][2][1]  # second sample of step 3
    repair = break_image(tmp_path / "img", bad)
    p = run(sys.executable, "1-pretrain_vlm.py", *args, "--out_dir", tmp_path / "run")
    assert p.returncode == 1 and TRACEBACK not in p.stderr
    assert f"d16.jsonl:{bad + 1} (id {bad}): image" in p.stderr and "damaged or truncated" in p.stderr
    assert "saved" in p.stderr and "at step 2" in p.stderr and "--resume" in p.stderr
    state = torch.load(tmp_path / "run" / "64_vlm_pretrain_resume.pt", weights_only=True)
    assert state["step"] == 2
    repair()
    p = run(sys.executable, "1-pretrain_vlm.py", *args, "--out_dir", tmp_path / "run", "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_weights(tmp_path / "clean", tmp_path / "run")


def run_ranks(args, world=2, timeout=240):
    """The training script as `world` gloo ranks, started the way torchrun starts them (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT) but without the launcher, which stops the other ranks as soon as one exits: so each
    rank's own exit status and output can be checked. [(returncode, stdout, stderr)] per rank."""
    from tests.served_model import free_port
    env = dict(ENV, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "1-pretrain_vlm.py", *map(str, args)], cwd=ROOT, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]  # a hang fails here
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_two_ranks_bad_sample_on_one_rank(random_tower, tmp_path):
    """2 gloo ranks, a truncated image in rank 1's share of step 2: both ranks stop by themselves (no hang),
    exit 1 without a traceback, the record is named once and a checkpoint is saved; with skip, rank 1's
    micro-batch of one bad sample trains nothing and the run (under torchrun) finishes."""
    args = uniform_data(tmp_path, 8) + tiny_run_args(tmp_path, random_tower) + [
        "--no_feature_cache", "--length_group", 1, "--epochs", 1]
    bad = order_of_samples(8, 2, ranks=2)[1][1][0]  # rank 1, step 2
    break_image(tmp_path / "img", bad)
    ranks = run_ranks(args + ["--batch_size", 2, "--out_dir", tmp_path / "error"])
    assert [code for code, _, _ in ranks] == [1, 1], [err[-2000:] for _, _, err in ranks]
    assert all(TRACEBACK not in err for _, _, err in ranks)
    assert ranks[0][2].count(f"(id {bad}): image") == 1 and f"(id {bad})" not in ranks[1][2]  # said once, by rank 0
    assert "bad sample(s) in the batch of step 2" in ranks[0][2]
    assert torch.load(tmp_path / "error" / "64_vlm_pretrain_resume.pt", weights_only=True)["step"] == 1
    p = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "1-pretrain_vlm.py",
            *args, "--batch_size", 1, "--on_bad_sample", "skip", "--out_dir", tmp_path / "skip", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    skipped = [json.loads(line) for line in open(tmp_path / "skip" / "64_vlm_pretrain_skipped.jsonl")]
    assert [(s["id"], s["kind"], s["rank"], s["phase"]) for s in skipped] == [
        (str(bad), "image_truncated", 1, "training")]
    assert json.load(open(tmp_path / "skip" / "64_vlm_pretrain.json"))["step"] == 4


def test_batch_eval_skips_and_reports_bad_records(corpus, served_model, random_tower, tmp_path):
    data, images, expected = corpus
    ckpt, _ = served_model
    cmd = [sys.executable, "3-eval_chat.py", "--ckpt", ckpt, "--vision_model", random_tower, "--data_path", data,
           "--images_dir", images, "--max_new_tokens", 3, "--device", "cpu", "--feature_cache", ""]
    p = run(*cmd, "--out", tmp_path / "preds.jsonl", "--on_bad_sample", "skip")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    # the "too long" and "truncated" records' prompts exceed the 128 tokens this model was trained with, its context
    n_good = 12 + len(expected["handled"]) + 1  # + the wrongly named image
    assert summary["skipped"] == len(ERROR_KINDS) + 2 and summary["n"] == n_good
    rows = [json.loads(line) for line in open(tmp_path / "preds.jsonl")]
    assert sorted(r["kind"] for r in rows if "error" in r) == sorted(ERROR_KINDS + ("too_long", "too_long"))
    assert all(r["error"].startswith(f"{data}:{r['line']}") for r in rows if "error" in r)
    p = run(*cmd, "--out", tmp_path / "preds_error.jsonl")
    assert p.returncode == 1 and TRACEBACK not in p.stderr and "(id role_order)" in p.stderr


@pytest.mark.parametrize("name", list(image_files()))
def test_uploads_of_every_corpus_image(name):
    data, kind = image_files()[name]
    if kind in (None, "wrong_extension"):
        assert open_image(data, name).mode == "RGB"
        return
    with pytest.raises(TooLarge if kind == "image_too_large" else InputError) as e:
        open_image(data, name)
    assert name in str(e.value) and not isinstance(e.value, (OSError, SyntaxError))


def test_api_answers_every_corpus_image_or_says_why(served_model, random_tower, tmp_path):
    ckpt, _ = served_model
    server = Server(["serve_openai_api.py", "--ckpt", ckpt, "--vision_model", random_tower, "--device", "cpu"],
                    ROOT, ENV, tmp_path / "api.log", ready_path="/v1/models")
    try:
        for name, (data, kind) in image_files().items():
            url = "data:image/png;base64," + base64.b64encode(data).decode()
            body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
            if kind in (None, "wrong_extension"):
                assert r.status_code == 200, (name, r.text)
            else:
                assert r.status_code == (413 if kind == "image_too_large" else 400), (name, r.text)
                assert "messages[0].content[0]" in r.json()["error"]["message"], r.text
        assert TRACEBACK not in (tmp_path / "api.log").read_text()
    finally:
        server.stop()


def test_image_modes_are_read_as_they_look():
    grey16 = Image.frombytes("I;16", (4, 4), (40000).to_bytes(2, "little") * 16)
    assert to_rgb(grey16).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257, not clipped to white
    assert to_rgb(Image.new("F", (4, 4), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)  # transparent: white
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((1, 1), 1)
    rgb = to_rgb(p)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (200, 30, 30)
    colour_key = Image.new("RGB", (4, 4), (0, 0, 0))
    colour_key.info["transparency"] = (0, 0, 0)
    assert to_rgb(colour_key).getpixel((0, 0)) == (255, 255, 255)


def test_checkpoint_of_another_config_says_which_shapes_differ(tiny_cfg):
    small = MiniMindVLM(tiny_cfg())
    big = MiniMindVLM(tiny_cfg(dim=128, n_heads=8, n_kv_heads=4))
    with pytest.raises(CheckpointError) as e:
        load_strict(big, small.state_dict(), where="out/64_vlm_sft.safetensors")
    msg = str(e.value)
    assert "out/64_vlm_sft.safetensors does not match" in msg and "shape mismatches" in msg
    assert "tok_embeddings.weight: checkpoint (6400, 64) vs model (6400, 128)" in msg
    assert "the checkpoint was made with dim=64 (model: 128)" in msg


def test_bad_checkpoints_end_the_scripts_with_a_message(tiny_cfg, random_tower, tmp_path):
    path = tmp_path / "64_vlm_sft.safetensors"
    save_checkpoint(MiniMindVLM(tiny_cfg()), path, tiny_cfg())
    shutil.copy(path, tmp_path / "whole.safetensors")
    path.write_bytes(path.read_bytes()[:5000])
    chat = [sys.executable, "3-eval_chat.py", "--vision_model", random_tower, "--device", "cpu", "--ckpt"]
    p = run(*chat, path)
    assert p.returncode == 1 and TRACEBACK not in p.stderr
    assert f"cannot read checkpoint {path} (truncated, damaged or not a checkpoint)" in p.stderr
    (tmp_path / "whole.json").write_text('{"config": {"dim": 64,')  # a sidecar cut short
    p = run(*chat, tmp_path / "whole.safetensors")
    assert p.returncode == 1 and TRACEBACK not in p.stderr and f"model config in {tmp_path / 'whole.json'}" in p.stderr
    # training from weights of another size: the shapes that differ, and the setting behind them
    (tmp_path / "whole.json").unlink()
    args = uniform_data(tmp_path, 4)
    p = run(sys.executable, "2-sft_vlm.py", *args, "--vision_model", random_tower, "--dim", 128, "--n_layers", 2,
            "--init_from", tmp_path / "whole.safetensors", "--out_dir", tmp_path / "o", "--device", "cpu")
    assert p.returncode == 1 and TRACEBACK not in p.stderr
    assert "shape mismatches" in p.stderr and "dim=64 (model: 128)" in p.stderr
