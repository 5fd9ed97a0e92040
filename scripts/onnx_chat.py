"""Answer a question about an image with the ONNX export, without PyTorch: onnxruntime, numpy, pillow and the
tokenizers library only (model/images.py prepares the pixels and model/tokenizer.py writes the chat format;
neither imports torch).

  python export_model.py --ckpt out/512_vlm_sft --out export/minimind-v --onnx
  python scripts/onnx_chat.py --export export/minimind-v --image dataset/eval_images/05_red_circle.jpg \\
      --prompt "What colour is the shape?"
  python scripts/onnx_chat.py ... --benchmark 128     # tokens/s after the first, first-token latency, peak RSS

Greedy decoding: the prompt runs through decoder.onnx with an empty past, then one token at a time with the
returned present keys/values.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.cli import HelpFormatter  # noqa: E402 (argparse only: no torch)
from model.images import clip_pixels, read_image  # noqa: E402
from model.LMConfig import IMAGE_MARKER  # noqa: E402
from model.tokenizer import build_prompt  # noqa: E402


class OnnxVLM:
    """The graphs of `{export}/onnx/`, the embedding matrix and the export's tokenizer."""

    def __init__(self, export_dir, threads=0):
        onnx_dir = os.path.join(export_dir, "onnx")
        if not os.path.isfile(os.path.join(onnx_dir, "decoder.onnx")):
            raise SystemExit(f"{onnx_dir}/decoder.onnx not found: export with `python export_model.py ... --onnx`")
        with open(os.path.join(onnx_dir, "onnx_config.json")) as f:
            self.cfg = json.load(f)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = lambda name: ort.InferenceSession(os.path.join(onnx_dir, name), options,  # noqa: E731
                                                    providers=["CPUExecutionProvider"])
        self.vision, self.decoder = session("vision.onnx"), session("decoder.onnx")
        self.embeddings = np.load(os.path.join(onnx_dir, "embeddings.npy"))
        self.tokenizer = Tokenizer.from_file(os.path.join(export_dir, "tokenizer.json"))
        self.image_ids = np.array(self.cfg["image_ids"])

    def inputs_embeds(self, ids, image_embeds):
        """Token rows, with each image's 50 embeddings over its placeholder (in order)."""
        x = self.embeddings[ids].copy()
        n = len(self.image_ids)
        starts = [i for i in range(len(ids) - n + 1) if (ids[i:i + n] == self.image_ids).all()]
        if len(starts) != len(image_embeds):
            raise ValueError(f"the prompt has {len(starts)} image placeholder(s) for {len(image_embeds)} image(s)")
        for start, e in zip(starts, image_embeds):
            x[start:start + n] = e
        return x[None]

    def answer_ids(self, image, question, max_new_tokens=256):
        """Greedy answer token ids (without the end-of-answer id), generated one at a time."""
        content = question if IMAGE_MARKER in question else f"{IMAGE_MARKER}\n{question}"
        text = build_prompt([{"role": "user", "content": content}])
        ids = np.array(self.tokenizer.encode(text, add_special_tokens=False).ids)
        image_embeds = self.vision.run(None, {"pixel_values": clip_pixels(image)[None]})[0]
        c = self.cfg
        past = np.zeros((c["n_layers"], 1, 0, c["n_kv_heads"], c["head_dim"]), np.float32)
        x = self.inputs_embeds(ids, image_embeds)
        keys = values = past
        for _ in range(min(max_new_tokens, c["max_seq_len"] - len(ids))):
            logits, keys, values = self.decoder.run(None, {"inputs_embeds": x, "past_keys": keys,
                                                          "past_values": values})
            token = int(logits[0, -1].argmax())
            if token == c["eos_token_id"]:
                return
            yield token
            x = self.embeddings[[token]][None]

    def answer(self, image, question, max_new_tokens=256) -> str:
        return self.tokenizer.decode(list(self.answer_ids(image, question, max_new_tokens)),
                                     skip_special_tokens=True).strip()


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--export", required=True, help="a directory written by export_model.py --onnx")
    p.add_argument("--image", required=True, help="the image")
    p.add_argument("--prompt", default="Describe this image.", help="the question")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest answer")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its own choice)")
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="instead: time N answer tokens (end-of-answer ignored) and print a JSON line")
    args = p.parse_args(argv)
    vlm = OnnxVLM(args.export, args.threads)
    image = read_image(args.image, args.image)
    if not args.benchmark:
        print(vlm.answer(image, args.prompt, args.max_new_tokens))
        return
    vlm.cfg["eos_token_id"] = -1  # every run decodes the same number of tokens
    start = time.perf_counter()
    steps = vlm.answer_ids(image, args.prompt, args.benchmark)
    next(steps)
    first = time.perf_counter()
    n = 1 + sum(1 for _ in steps)
    end = time.perf_counter()
    print(json.dumps({"tokens": n, "first_token_s": first - start, "tokens_per_s": (n - 1) / (end - first),
                      "peak_rss_mib": peak_rss_mib(), "torch_imported": "torch" in sys.modules}))


if __name__ == "__main__":
    main()
