"""Loading the CLIP tower from local directories, preprocessing, encoding, the feature cache.

- Strict loading of a CLIP directory (a full CLIPModel or a vision-only one) and clear errors for a missing
  or mismatched one; preprocessing matches CLIPProcessor.
- The feature cache: entries are shared across instances, namespaced by encoder and keyed by file; cached
  features equal freshly encoded ones (to fp16 precision); a changed image is not served from the cache.
- The encoder fingerprint follows the weight bytes: a copy shares it, a touch keeps it, one flipped bit
  changes it.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.feature_cache import FeatureCache
from model.images import CLIP_MEAN, CLIP_STD
from model.vision import encode_images, load_vision_model, make_random_vision_model, preprocess_image, vision_fingerprint


def small_clip_configs():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=32)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=100)
    return vision, CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)


def test_loads_full_clipmodel_and_vision_only_dirs(tmp_path):
    from transformers import CLIPModel, CLIPVisionModel
    vision_cfg, full_cfg = small_clip_configs()
    torch.manual_seed(0)
    full = CLIPModel(full_cfg).eval()
    full.save_pretrained(tmp_path / "full")  # what openai/clip-vit-base-patch32 looks like on disk
    tower = load_vision_model(str(tmp_path / "full"))
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = full.vision_model(pixel_values=x).last_hidden_state
    got = encode_images(tower, x)
    assert got.shape == (2, 50, 64)
    assert torch.allclose(got, want, atol=1e-5)  # last hidden state, not post-LayerNorm pooled output

    only = CLIPVisionModel(vision_cfg)
    only.save_pretrained(tmp_path / "vision")
    tower2 = load_vision_model(str(tmp_path / "vision"))
    assert torch.equal(tower2.state_dict()["embeddings.patch_embedding.weight"],
                       only.state_dict()["embeddings.patch_embedding.weight"])


def test_missing_and_mismatched_towers_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*git clone https://huggingface.co/openai/clip-vit"):
        load_vision_model(str(tmp_path / "nowhere"))
    from transformers import CLIPVisionModel
    vision_cfg, _ = small_clip_configs()
    CLIPVisionModel(vision_cfg).save_pretrained(tmp_path / "v")
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "v" / "model.safetensors")
    sd.pop(next(k for k in sd if k.endswith("fc1.weight")))
    save_file(sd, tmp_path / "v" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: \[.*fc1\.weight"):
        load_vision_model(str(tmp_path / "v"))
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    cfg["patch_size"] = 16
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gives 197 tokens"):
        load_vision_model(str(tmp_path / "v"))


def test_random_tower_only_in_a_directory_that_says_so(tmp_path, random_tower):
    with pytest.raises(ValueError, match="must say 'random'"):
        make_random_vision_model(str(tmp_path / "clip-vit-base-patch32"))
    tower = load_vision_model(random_tower)
    assert tower.config.hidden_size == 768 and tower.config.num_hidden_layers == 12
    assert encode_images(tower, torch.zeros(1, 3, 224, 224)).shape == (1, 50, 768)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "1"])
def test_preprocess_any_mode(mode):
    img = Image.new("RGB", (320, 200), (255, 0, 0)).convert(mode)
    x = preprocess_image(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_preprocess_matches_clip_normalisation():
    x = preprocess_image(Image.new("RGB", (224, 224), (255, 0, 128)))
    want = (np.array([255, 0, 128]) / 255.0 - CLIP_MEAN) / CLIP_STD
    assert np.allclose(x[:, 100, 100].numpy(), want, atol=1e-5)
    # shortest side to 224 then centre crop: a wide image keeps its middle
    wide = Image.new("RGB", (448, 224), (0, 0, 0))
    wide.paste((255, 255, 255), (112, 0, 336, 224))
    assert np.allclose(preprocess_image(wide).numpy(), preprocess_image(Image.new("RGB", (224, 224), "white")).numpy(),
                       atol=1e-5)


def test_feature_cache_roundtrip_and_keys(tmp_path):
    from trainer.feature_cache import image_cache_key
    cache = FeatureCache(tmp_path / "c", "enc1")
    f = torch.randn(50, 768)
    cache.put("k1", f)
    assert "k1" in cache
    cache.flush()  # the sharded cache writes on flush (or at shard_mb)
    assert cache.on_disk("k1")
    fresh = FeatureCache(tmp_path / "c", "enc1")  # another run, or another DDP rank
    assert torch.equal(fresh.get("k1"), f.half())
    assert "k1" not in FeatureCache(tmp_path / "c", "enc2")  # another encoder: another namespace
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    k = image_cache_key(str(img))
    Image.new("RGB", (9, 9)).save(img)  # the file changed: a different key
    assert image_cache_key(str(img)) != k


def test_fingerprint_follows_the_weights(tmp_path, random_tower):
    import shutil
    copy = tmp_path / "random-copy"
    shutil.copytree(random_tower, copy)
    a = vision_fingerprint(str(copy))
    assert vision_fingerprint(str(random_tower)) == a  # same bytes elsewhere: same cache
    os.utime(copy / "model.safetensors", ns=(1, 1))  # touched, not changed
    assert vision_fingerprint(str(copy)) == a
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert vision_fingerprint(str(copy)) != a



def test_cached_features_equal_fresh_ones_and_follow_the_file(tmp_path, random_tower):
    from model.vision import cached_features, load_image
    from trainer.feature_cache import image_cache_key
    tower = load_vision_model(str(random_tower))
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (64, 64), colour).save(paths[-1])
    pixels = torch.stack([load_image(p) for p in paths])
    cache = FeatureCache(tmp_path / "cache", vision_fingerprint(str(random_tower)))
    keys = [image_cache_key(p) for p in paths]
    first = cached_features(tower, keys, cache, keys, pixels)
    assert (cache.hits, cache.misses) == (3, 3)  # encoded once, then read back
    cache.flush()
    again = cached_features(tower, keys, FeatureCache(tmp_path / "cache", cache.dir.name), keys, pixels)
    fresh = encode_images(tower, pixels)
    assert torch.equal(first, again)
    assert torch.allclose(again, fresh, rtol=1e-3, atol=1e-2)  # fp16 storage of fp32 features
    Image.new("RGB", (64, 64), "black").save(paths[0])  # the image changed: its entry is not used
    assert image_cache_key(paths[0]) not in cache


def test_tower_equals_transformers_clip_at_full_size(random_tower):
    """Our CLIPVisionTower against transformers' CLIPVisionModel on the same ViT-B/32 weights (quick_gelu, 12
    layers, 768 wide): the last hidden state agrees to fp32 rounding."""
    from transformers import CLIPVisionModel
    ref = CLIPVisionModel.from_pretrained(random_tower).eval()
    tower = load_vision_model(random_tower)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
    got = encode_images(tower, x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_inference_does_not_import_transformers_modeling(tmp_path, random_tower):
    """Loading the tower leaves transformers' modeling code (about 90 MB resident) unimported."""
    import subprocess
    import sys
    code = ("import sys; from model.vision import load_vision_model; load_vision_model(sys.argv[1]); "
            "print('transformers.modeling_utils' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, random_tower], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


def test_preprocess_equals_transformers_clip_image_processor():
    """Bit for bit the pixels of transformers' CLIPImageProcessor (PIL backend), whatever the aspect ratio: the
    longer side is floored as it floors it (640x480 -> 298x224, where rounding would give 299)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    processor = CLIPImageProcessorPil()
    rng = np.random.default_rng(0)
    for w, h in [(224, 224), (640, 480), (480, 640), (333, 200), (97, 61), (1000, 999)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = processor(images=[img], return_tensors="np")["pixel_values"][0]
        assert np.array_equal(preprocess_image(img).numpy(), want), (w, h)
