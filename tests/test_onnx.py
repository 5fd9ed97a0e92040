"""export_model.py --onnx and scripts/onnx_chat.py: the ONNX graphs give PyTorch's logits (prompt with an empty
past, then steps with the returned present), and the runner, in a process that never imports torch, answers
the served model's colour question as the engine does (greedy, fp32).
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.engine import ChatEngine
from model.model import KVCache
from model.vision import pixels_of
from tests.conftest import ROOT
from tests.served_model import COLOURS, QUESTION, colour_image
from tests.test_train_e2e import run

ort = pytest.importorskip("onnxruntime")
NO_TORCH = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('torch' in sys.modules)")


@pytest.fixture(scope="module")
def onnx_export(served_model, random_tower, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "minimind-v"
    run(sys.executable, "export_model.py", "--ckpt", served_model[0], "--out", out, "--vision_model", random_tower,
        "--onnx")
    return out


@torch.inference_mode()
def test_onnx_graphs_give_pytorchs_logits(onnx_export, served_model, random_tower):
    engine = ChatEngine.load(served_model[0], str(random_tower), device="cpu", dtype="float32")
    m = engine.model
    image = colour_image(COLOURS["green"], seed=1)
    feats = engine.encode([image])
    ids = engine.prepare([{"role": "user", "content": f"<image>\n{QUESTION}"}], 1)
    sessions = {name: ort.InferenceSession(str(onnx_export / "onnx" / f"{name}.onnx")) for name in ("vision", "decoder")}
    want = m.vision_proj(feats).numpy()
    image_embeds = sessions["vision"].run(None, {"pixel_values": pixels_of([image]).numpy()})[0]
    assert np.abs(image_embeds - want).max() <= 1e-4 * np.abs(want).max()  # CLIP + projector

    cache = KVCache(len(m.layers), 1, len(ids) + 3)
    ref = [m(torch.tensor([ids]), [feats], past_key_values=cache).logits[0, -1]]
    x = m.splice_images(torch.tensor([ids]), m.tok_embeddings(torch.tensor([ids])), [feats]).numpy()
    cfg = json.loads((onnx_export / "onnx" / "onnx_config.json").read_text())
    keys = values = np.zeros((cfg["n_layers"], 1, 0, cfg["n_kv_heads"], cfg["head_dim"]), np.float32)
    got = []
    for token in (100, 200, 300):  # the prompt, then three steps teacher-forced on fixed tokens
        logits, keys, values = sessions["decoder"].run(None, {"inputs_embeds": x, "past_keys": keys,
                                                              "past_values": values})
        got.append(logits[0, -1])
        x = np.load(onnx_export / "onnx" / "embeddings.npy")[[token]][None]
        if len(ref) < 3:
            ref.append(m(torch.tensor([[token]]), past_key_values=cache).logits[0, -1])
    for g, r in zip(got, ref):
        # fp32 both ways; only the order of summation differs
        assert np.abs(g - r.numpy()).max() <= 1e-4 * np.abs(r.numpy()).max()


def test_runner_answers_without_torch(onnx_export, tmp_path):
    for name, rgb in COLOURS.items():
        path = tmp_path / f"{name}.png"
        colour_image(rgb, seed=11).save(path)
        p = subprocess.run([sys.executable, "-c", NO_TORCH, "scripts/onnx_chat.py", "--export", str(onnx_export),
                            "--image", str(path), "--prompt", QUESTION, "--max_new_tokens", "6"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        answer, torch_imported = p.stdout.strip().splitlines()[-2:]
        assert (answer, torch_imported) == (name, "False")
