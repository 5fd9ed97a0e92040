"""A MiniMind-V v1 user's files, in v1's places, train and chat with no data or path flag.

The layout (upstream's README and code): dataset/LLaVA-Pretrain/chat-translated.json + dataset/pretrain_images/,
dataset/LLaVA-Instruct/llava_instruct_230k.json naming "000000xxxxxx.jpg" while the files in
dataset/sft_images/ are "COCO_train2014_000000xxxxxx.jpg", model/clip_model/clip-vit-base-patch32/,
model/minimind_tokenizer/, dataset/eval_images/. The three scripts run there with size and speed flags only;
the SFT stage says it found its images by upstream's prefix; check_data resolves names the same way, and a
name found neither way is an image_missing that names both files.
"""
import json
import os
import shutil
import subprocess
import sys

from PIL import Image

from tests.conftest import ROOT
from tests.test_train_e2e import ENV

SIZE = ["--dim", "64", "--n_layers", "2", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
        "--dtype", "float32"]


def upstream_layout(root, tower):
    """Upstream v1's tree with generated images and records in its exact shapes (JSON lists, indented)."""
    (root / "model/clip_model").mkdir(parents=True)
    shutil.copytree(tower, root / "model/clip_model/clip-vit-base-patch32")
    shutil.copytree(os.path.join(ROOT, "model/minimind_tokenizer"), root / "model/minimind_tokenizer")
    for d in ("dataset/LLaVA-Pretrain", "dataset/LLaVA-Instruct", "dataset/pretrain_images", "dataset/sft_images",
              "dataset/eval_images"):
        (root / d).mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    pretrain, sft = [], []
    for i in range(12):
        gcc = f"GCC_train_{2582585 + i:09d}"
        Image.new("RGB", (256, 200), colours[i % 4]).save(root / f"dataset/pretrain_images/{gcc}.jpg")
        marker_first = i % 2 == 0
        pretrain.append({"id": gcc, "image": f"{gcc}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n简要描述这张图片。" if marker_first else "提供给定图像的简要描述。\n<image>"},
            {"from": "gpt", "value": f"一张纯色的图片，颜色编号{i % 4}。"}]})
        coco = f"{334872 + i:012d}"
        Image.new("RGB", (320, 240), colours[(i + 1) % 4]).save(root / f"dataset/sft_images/COCO_train2014_{coco}.jpg")
        sft.append({"id": coco, "image": f"{coco}.jpg", "conversations": [
            {"from": "human", "value": "图片里是什么颜色？\n<image>"}, {"from": "gpt", "value": f"颜色编号{(i + 1) % 4}。"},
            {"from": "human", "value": "确定吗？"}, {"from": "gpt", "value": "确定。"}]})
    (root / "dataset/LLaVA-Pretrain/chat-translated.json").write_text(json.dumps(pretrain, ensure_ascii=False, indent=4))
    (root / "dataset/LLaVA-Instruct/llava_instruct_230k.json").write_text(json.dumps(sft, indent=2))
    for name in ("一只猫.png", "一些海豚.png"):
        Image.new("RGB", (224, 224), (90, 120, 160)).save(root / "dataset/eval_images" / name)


def run_in(root, *args, check=True):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=root, env=ENV, capture_output=True, text=True,
                       timeout=600)
    if check:
        assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_upstream_v1_layout_trains_and_chats_without_data_flags(tmp_path, random_tower):
    root = tmp_path / "minimind-v"
    upstream_layout(root, random_tower)
    script = lambda name: os.path.join(ROOT, name)  # noqa: E731

    p = run_in(root, script("1-pretrain_vlm.py"), "--init_from", "none", "--max_steps", 2, *SIZE)
    assert "dataset/LLaVA-Pretrain/chat-translated.json: 12 records" in p.stdout
    assert "12 as named" in p.stdout
    assert (root / "out/64_vlm_pretrain.safetensors").is_file()

    p = run_in(root, script("2-sft_vlm.py"), "--max_steps", 2, *SIZE)  # starts from out/64_vlm_pretrain
    assert "dataset/LLaVA-Instruct/llava_instruct_230k.json: 12 records" in p.stdout
    assert "12 with the prefix COCO_train2014_" in p.stdout
    assert (root / "out/64_vlm_sft.safetensors").is_file()

    p = run_in(root, script("3-eval_chat.py"), "--dim", 64, "--max_new_tokens", 3, "--device", "cpu")
    assert p.stdout.count("🤖") == 2 and "一只猫.png" in p.stdout  # every image of dataset/eval_images

    # check_data finds the images the same way; a name found neither way is image_missing, naming both files
    sft = json.loads((root / "dataset/LLaVA-Instruct/llava_instruct_230k.json").read_text())
    sft.append({**sft[0], "id": "999", "image": "000000000999.jpg"})
    (root / "bad.json").write_text(json.dumps(sft))
    p = run_in(root, script("check_data.py"), "--data_path", "bad.json", "--images_dir", "dataset/sft_images",
               check=False)
    assert p.returncode == 1 and "13 records" in p.stdout
    missing = [line for line in p.stdout.splitlines() if "000000000999.jpg does not exist" in line]
    assert len(missing) == 1 and "COCO_train2014_000000000999.jpg" in missing[0], p.stdout
    assert "image_missing" in p.stdout and "FAILED: 1 record(s) with errors" in p.stdout  # the 12 others are found
