import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model.tokenizer import image_token_ids, load_tokenizer  # noqa: E402
from model.LMConfig import LMConfig  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(os.path.join(ROOT, "model/minimind_tokenizer"))


@pytest.fixture(scope="session")
def image_ids(tokenizer):
    return image_token_ids(tokenizer)


@pytest.fixture
def tiny_cfg(image_ids):
    def make(**kw):
        base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400, max_seq_len=512,
                    image_ids=image_ids)
        base.update(kw)
        return LMConfig(**base)
    return make


@pytest.fixture(scope="session")
def random_tower(tmp_path_factory):
    """A seeded random CLIP ViT-B/32 directory, made once per test session."""
    from model.vision import make_random_vision_model
    return make_random_vision_model(str(tmp_path_factory.mktemp("clip") / "random-clip-test"), seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def served_model(tmp_path_factory, random_tower):
    """(ckpt, images_dir): a 64x2 model trained to answer 'What colour is it?' with red / green / blue."""
    from tests.served_model import build
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return build(str(tmp_path_factory.mktemp("served")), str(random_tower), ROOT, env)
