"""Write a seeded, randomly initialised CLIP ViT-B/32 vision tower for the offline demo.

It has the real architecture (12 layers, 768 wide, 32px patches, 50 output tokens) and transformers' default
initialisation, but it has never seen an image. Real training wants openai/clip-vit-base-patch32 instead.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.cli import HelpFormatter  # noqa: E402
from model.vision import make_random_vision_model  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out_dir", default=None, help="None: model/clip_model/random-clip-vit-base-patch32-seed{seed}")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    a = p.parse_args()
    out = a.out_dir or f"model/clip_model/random-clip-vit-base-patch32-seed{a.seed}"
    print("wrote", make_random_vision_model(out, a.seed))
