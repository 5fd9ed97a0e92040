"""A tiny MiniMind-V trained here in seconds to name the colour of a picture, for the server tests: with it,
an answer shows which image a conversation holds. Built once per test session (see conftest.py)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220)}
QUESTION = "What colour is it?"
FOLLOW_UP = "Say the colour again."


def colour_image(rgb, seed, size=224):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 12, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def build(root, tower, root_dir, env):
    """Write images + SFT records under root, train a 64x2 model on them, return (ckpt, images_dir)."""
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    records = []
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(6):
            f = f"{name}_{i}.png"
            colour_image(rgb, seed=100 * c + i).save(os.path.join(images, f))
            records.append({"id": f"{name}_{i}", "image": f, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": name},
                {"from": "human", "value": FOLLOW_UP}, {"from": "gpt", "value": name}]})
    data = os.path.join(root, "sft.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = os.path.join(root, "out")
    cmd = [sys.executable, "2-sft_vlm.py", "--data_path", data, "--images_dir", images, "--vision_model", tower,
           "--out_dir", out, "--init_from", "none", "--dim", "64", "--n_layers", "2", "--max_seq_len", "128",
           "--batch_size", "6", "--max_steps", "150", "--learning_rate", "3e-3", "--num_workers", "0",
           "--dtype", "float32", "--device", "cpu", "--log_interval", "10"]
    p = subprocess.run(cmd, cwd=root_dir, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"training the served model failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return os.path.join(out, "64_vlm_sft.safetensors"), images


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server script in a subprocess, waited for until `ready_path` answers; its log is kept for failures."""

    def __init__(self, args, root_dir, env, log_path, ready_path="/", timeout=120):
        import time
        import urllib.request
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *map(str, args), "--port", str(self.port)], cwd=root_dir,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{args[0]} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url + ready_path, timeout=5)
                return
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise AssertionError(f"{args[0]} did not answer within {timeout}s:\n{self.output()}")
                time.sleep(0.5)

    def output(self):
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def png_bytes(image, fmt="PNG"):
    import io
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png"):
    import base64
    return f"data:{mime};base64," + base64.b64encode(data).decode()
