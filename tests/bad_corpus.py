"""A generated dataset of dirty data: good records, one record per kind of bad input, and images in every
mode PIL reads. Used by test_robustness.py through --check_data, training, batch evaluation and the servers."""
import io
import json
import os

import numpy as np
from PIL import Image

from tests.served_model import COLOURS, QUESTION, colour_image

MAX_SEQ_LEN = 128  # the corpus's "too long" and "truncated" records are sized for this


def _bytes(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def damaged_png() -> bytes:
    """A PNG whose header and end are intact and whose compressed pixels are garbage in the middle: only
    decoding finds it."""
    rng = np.random.default_rng(0)
    data = bytearray(_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start:start + 200] = bytes(200)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    im = colour_image(COLOURS["blue"], 7, size=96).resize((96, 64))
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated 90°: a 96x64 file displays as 64x96
    return _bytes(im, "JPEG", exif=exif.tobytes())


def image_files():
    """{file name: (bytes, problem kind or None)}: bad images and images in unusual but valid modes."""
    red = colour_image(COLOURS["red"], 1, size=96)
    jpeg = _bytes(red, "JPEG")
    p_transparent = Image.new("P", (64, 64), 0)
    p_transparent.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    p_transparent.paste(1, (16, 16, 48, 48))
    return {
        "empty.png": (b"", "image_empty"),
        "notes.jpg": (b"these are my notes, not a picture\n", "not_an_image"),
        "half.jpg": (jpeg[:len(jpeg) // 2], "image_truncated"),
        "damaged.png": (damaged_png(), "image_damaged"),
        "bomb.png": (_bytes(Image.new("L", (5000, 5000)), "PNG"), "image_too_large"),  # 25 Mpx in a few KB
        "png_named.jpg": (_bytes(red, "PNG"), "wrong_extension"),
        "cmyk.jpg": (_bytes(red.convert("CMYK"), "JPEG"), None),
        "grey16.png": (_bytes(Image.fromarray((np.full((64, 64), 40000)).astype(np.uint16)), "PNG"), None),
        "bilevel.png": (_bytes(red.convert("1"), "PNG"), None),
        "grey_alpha.png": (_bytes(Image.new("LA", (64, 64), (90, 128)), "PNG"), None),
        "palette_transparent.png": (_bytes(p_transparent, "PNG", transparency=0), None),
        "exif_rotated.jpg": (exif_rotated_jpeg(), None),
    }


def turns(question, answer, *more):
    out = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    for q, a in zip(more[::2], more[1::2]):
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def make_bad_corpus(root, n_good=12):
    """Write root/images and root/data.jsonl. Returns (data path, images dir, expected), expected being
    {kind: [record id or line number, ...]} for every problem the corpus holds, and "handled": the ids of
    the records in unusual image modes, which must train like any other."""
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    lines, expected = [], {}

    def add(record, kind=None):
        lines.append(json.dumps(record, ensure_ascii=False).encode())
        if kind:
            expected.setdefault(kind, []).append(record.get("id") if isinstance(record, dict) else len(lines))

    def q(image):  # a good record for an image file
        return {"id": os.path.splitext(image)[0], "image": image, "conversations": turns(f"<image>\n{QUESTION}", "red")}

    names = list(COLOURS)
    for i in range(n_good):
        f = f"good{i}.png"
        colour_image(COLOURS[names[i % 3]], i).save(os.path.join(images, f))
        add({"id": f"good{i}", "image": f, "conversations": turns(f"<image>\n{QUESTION}", names[i % 3])})
    handled = []
    for name, (data, kind) in image_files().items():
        with open(os.path.join(images, name), "wb") as fh:
            fh.write(data)
        add(q(name), kind)
        if kind is None:
            handled.append(q(name)["id"])
    lines.append(b'{"id": "broken", "conversations": [{"from": "human", "value": "<image>\\nq"')
    expected["bad_json"] = [len(lines)]
    lines.append(b'{"id": "latin1", "image": "good0.png", "conversations": [{"from": "human", "value": "caf\xe9"}]}')
    expected["bad_encoding"] = [len(lines)]
    add(["a list, not a record"], "not_a_record")
    add({"id": "no_conversations", "image": "good0.png"}, "no_conversations")
    add({"id": "bad_turn", "image": "good0.png", "conversations": [{"from": "robot", "value": "<image>\nq"}]},
        "bad_turn")
    add({"id": "role_order", "image": "good0.png",
         "conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "<image>\nq"}]}, "role_order")
    add({"id": "empty_answer", "image": "good0.png", "conversations": turns("<image>\nq", "  ")}, "empty_answer")
    add({"id": "bad_image_field", "image": 42, "conversations": turns("<image>\nq", "red")}, "bad_image_field")
    add({"id": "marker_missing", "image": "good0.png", "conversations": turns("What colour?", "red")},
        "marker_missing")
    add({"id": "two_markers", "image": "good0.png", "conversations": turns("<image>\n<image>\nq", "red")},
        "image_count")
    add({"id": "missing_file", "image": "nowhere.png", "conversations": turns("<image>\nq", "red")},
        "image_missing")
    add({"id": "too_long", "image": "good1.png", "conversations": turns("<image>\n" + "why " * 150, "red")},
        "too_long")
    add({"id": "truncated", "image": "good2.png",
         "conversations": turns(f"<image>\n{QUESTION}", "blue", "Tell me more. " * 20, "no " * 40)}, "truncated")
    with open(os.path.join(root, "data.jsonl"), "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    expected["handled"] = handled
    return os.path.join(root, "data.jsonl"), images, expected


ERROR_KINDS = ("image_empty", "not_an_image", "image_truncated", "image_damaged", "image_too_large", "bad_json",
               "bad_encoding", "not_a_record", "no_conversations", "bad_turn", "role_order", "empty_answer",
               "bad_image_field", "marker_missing", "image_count", "image_missing")
