"""What both servers share: the upload checks, the engine, and incremental detokenization.

- Incremental detokenization equals full decoding for mixed Chinese/English/emoji text, never splits a
  character, and decodes a bounded window per token.
- Uploads that are empty, not images, truncated, over the byte limit or over the pixel limit (a
  25-megapixel PNG of a few KB) are refused with their name in the message; transparent, grey, CMYK and
  EXIF-rotated images become upright RGB.
- The engine answers about the image it was given; two generations stepping in turn give what each gives
  alone; placeholder/image mismatches and over-long conversations are refused.
- Both servers bind 127.0.0.1 by default.
"""
import io
import os

import pytest
from PIL import Image

from model.engine import IncrementalDecoder
from model.LMConfig import IMAGE_PLACEHOLDER
from model.engine import ChatEngine, InputError, PromptTooLong, TooLarge, open_image
from tests.served_model import COLOURS, FOLLOW_UP, QUESTION, colour_image, png_bytes


@pytest.mark.parametrize("text", [
    "Hello 世界! 这是一个测试 🤖🎉 mixed   spaces, café — ok\n新行",
    "🧑‍🚀👩🏽‍🔬 emoji sequences then 中文 then English.",
    "图中有一个红色的圆形。A red circle on a light background.",
])
def test_incremental_decoding_equals_full_decoding(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), "a multi-byte character was split"
    assert sum(bool(p) for p in pieces) > 3  # it streams, rather than emitting everything at the end


def test_incremental_decoding_reads_a_bounded_window(tokenizer):
    """O(1) per token: the decoder never re-decodes the whole answer."""
    calls = []
    real = tokenizer.decode

    class Spy:
        def decode(self, ids, **kw):
            calls.append(len(ids))
            return real(ids, **kw)
    ids = tokenizer("word " * 400 + "汉字" * 100, add_special_tokens=False).input_ids
    decoder = IncrementalDecoder(Spy())
    "".join(decoder.push(i) for i in ids)
    assert len(ids) > 400 and max(calls) <= 8


def image_bytes(mode, size=(64, 48), fmt="PNG", **kw):
    im = Image.new(mode, size, **kw)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def test_open_image_refuses_bad_uploads():
    with pytest.raises(InputError, match="empty"):
        open_image(b"", "a.png")
    with pytest.raises(InputError, match="notes.txt is not an image"):
        open_image(b"hello, world", "notes.txt")
    with pytest.raises(TooLarge, match="MiB"):
        open_image(png_bytes(colour_image((1, 2, 3), 0)), "big.png", max_bytes=1000)
    huge = image_bytes("L", (5000, 5000))  # 25 million pixels, a few KB compressed
    assert len(huge) < 100_000
    with pytest.raises(TooLarge, match="25.0 million pixels"):
        open_image(huge, "bomb.png", max_pixels=4096 * 4096)
    good = png_bytes(colour_image((200, 0, 0), 0))
    with pytest.raises(InputError, match="damaged or truncated"):
        open_image(good[:len(good) // 2], "half.png")


def test_open_image_modes_become_upright_rgb():
    transparent = open_image(image_bytes("RGBA", color=(0, 0, 0, 0)), "t.png")
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (255, 255, 255)  # white, not black
    assert open_image(image_bytes("L", color=7), "g.png").getpixel((3, 3)) == (7, 7, 7)
    assert open_image(image_bytes("CMYK", fmt="JPEG", color=(0, 0, 0, 0)), "c.jpg").mode == "RGB"
    # EXIF orientation 6 (rotate 90° clockwise to display): a 64x48 file is shown 48x64
    im = Image.new("RGB", (64, 48), (10, 20, 30))
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    assert open_image(buf.getvalue(), "phone.jpg").size == (48, 64)


@pytest.fixture(scope="module")
def engine(served_model, random_tower):
    ckpt, _ = served_model
    return ChatEngine.load(ckpt, str(random_tower), device="cpu", dtype="float32")


def first_turn(question=QUESTION):
    return [{"role": "user", "content": f"<image>\n{question}"}]


def test_engine_answers_about_the_image(engine):
    for name, rgb in COLOURS.items():
        feats = engine.encode([colour_image(rgb, seed=123)])
        assert feats.shape == (1, 50, 768)
        g = engine.generate(first_turn(), feats, temperature=0)
        assert g.text() == name and g.finish_reason == "stop" and g.completion_tokens >= 1
        follow = first_turn() + [{"role": "assistant", "content": name}, {"role": "user", "content": FOLLOW_UP}]
        assert engine.generate(follow, feats, temperature=0).text() == name


def test_interleaved_generations_do_not_share_state(engine):
    """Two requests stepping in turn (as concurrent visitors do) give what each gives alone."""
    feats = {c: engine.encode([colour_image(COLOURS[c], seed=5)]) for c in ("red", "blue")}
    kw = dict(temperature=1.2, max_new_tokens=10, seed=42)
    alone = {c: list(engine.generate(first_turn("Describe it."), f, **kw)) for c, f in feats.items()}
    its = {c: iter(engine.generate(first_turn("Describe it."), f, **kw)) for c, f in feats.items()}
    together = {c: [] for c in its}
    while its:
        for c in list(its):
            piece = next(its[c], None)
            if piece is None:
                del its[c]
            else:
                together[c].append(piece)
    assert together == alone


def test_engine_refuses_bad_conversations(engine):
    feats = engine.encode([colour_image(COLOURS["red"], seed=1)])
    with pytest.raises(InputError, match="1 image placeholder\\(s\\) for 0 image"):
        engine.generate(first_turn(), None)
    with pytest.raises(InputError, match="2 image placeholder\\(s\\) for 1 image"):
        engine.generate([{"role": "user", "content": f"<image>\n{IMAGE_PLACEHOLDER}"}], feats)
    with pytest.raises(PromptTooLong, match="context is 128 tokens, so it reads at most 127"):  # trained at 128
        engine.generate(first_turn("why " * 9000), feats)
    g = engine.generate(first_turn(), feats, max_new_tokens=10 ** 6)
    assert g.max_new_tokens == engine.context - g.prompt_tokens == 128 - g.prompt_tokens  # clamped to the context


def test_servers_bind_localhost_by_default():
    import importlib.util
    from tests.conftest import ROOT
    for script, port in (("web_server.py", 7788), ("serve_openai_api.py", 8998)):
        spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        args = mod.parse_args(["--ckpt", "x.pth"])
        assert (args.host, args.port) == ("127.0.0.1", port)
