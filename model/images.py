"""Reading images and CLIP's preprocessing, with PIL and numpy only (no torch), so that a runtime without
PyTorch (the ONNX runner) prepares exactly the pixels the model was trained on. model/vision.py turns them into
tensors.
"""
import os

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
PATCH_SIZE = 32  # ViT-B/32: the image is read as 7 x 7 patches of 32 x 32 pixels
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PREPROCESS_VERSION = "rgb-white-exif-16bit-floor-v4"  # part of the feature-cache fingerprint: bump when preprocessing changes
MAX_IMAGE_PIXELS = 4096 * 4096  # an image with more pixels is refused before decoding (decompression bombs)
IMAGE_FORMATS = "PNG, JPEG, WebP, GIF or BMP"


class BadImage(ValueError):
    """An image that cannot be used. `kind` names the problem (one of trainer.records.PROBLEMS); the message
    says what is wrong with which file and is safe to show to whoever sent it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def check_image_file(path, name: str):
    """BadImage for an image file that is missing or empty: what a stat can tell, without opening it."""
    if not os.path.isfile(path):
        raise BadImage("image_missing", f"{name} does not exist")
    if os.path.getsize(path) == 0:
        raise BadImage("image_empty", f"{name} is empty (0 bytes)")


def open_image_header(source, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image (a path, or a file object of bytes) without decoding its pixels: format, size and mode are
    known, and the pixel limit is applied before any decoding. Raises BadImage."""
    import warnings
    from PIL import UnidentifiedImageError
    if isinstance(source, (str, os.PathLike)):
        check_image_file(source, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies below
        try:
            image = Image.open(source)
        except Image.DecompressionBombError:
            raise BadImage("image_too_large", f"{name} has too many pixels (limit {max_pixels / 1e6:.1f} million)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise BadImage("not_an_image", f"{name} is not an image this model can read ({IMAGE_FORMATS})") from None
    w, h = image.size
    if w * h > max_pixels:
        image.close()
        raise BadImage("image_too_large", f"{name} is {w}x{h} = {w * h / 1e6:.1f} million pixels; the limit is "
                                          f"{max_pixels / 1e6:.1f} million")
    return image


def read_image(source, name: str = "the image", max_pixels: int = MAX_IMAGE_PIXELS,
               keep_mode: bool = False) -> Image.Image:
    """Decode an image file (a path, or a file object of bytes) into upright RGB (see to_rgb; keep_mode: as it is
    stored, for a mask), or raise BadImage saying what is wrong: missing, empty, not an image, too many pixels,
    truncated or otherwise damaged."""
    image = open_image_header(source, name, max_pixels)
    try:
        with image:
            image.load()
            return image.copy() if keep_mode else to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        kind = "image_truncated" if "truncat" in str(e).lower() else "image_damaged"
        raise BadImage(kind, f"{name} is damaged or truncated ({e})") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale ('I;16', 'I', 'F') as 8-bit 'L'. PIL's own convert clips
    them at 255, which turns a 16-bit scan almost entirely white."""
    a = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        a = a * 255 if a.size and a.max() <= 1.0 else a  # floats in [0, 1], else taken as 0..255
    elif image.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: the EXIF orientation applied (phone photos are stored sideways), transparency composited
    on white (a plain convert would show transparent pixels as whatever colour they hide, often black),
    16-bit and float greyscale scaled to 8 bits; CMYK, 1-bit, greyscale and palette images converted."""
    from PIL import ImageOps
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")  # palette or colour-key transparency becomes an alpha channel
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def clip_square(image: Image.Image, resample=Image.BICUBIC) -> Image.Image:
    """The 224x224 square of `image` that the model sees: shortest side to 224, centre crop. The longer side
    becomes floor(224 * long / short), as transformers' CLIPImageProcessor and OpenAI's CLIP compute it (rounding
    it instead moves the crop by a pixel for e.g. 640x480). Also used for an object's mask (patch_coverage), so
    that mask and pixels are cut alike."""
    w, h = image.size
    if (w, h) == (IMAGE_SIZE, IMAGE_SIZE):
        return image
    short = min(w, h)
    nw, nh = IMAGE_SIZE * w // short, IMAGE_SIZE * h // short
    image = image.resize((nw, nh), resample)
    left, top = (nw - IMAGE_SIZE) // 2, (nh - IMAGE_SIZE) // 2
    return image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))


def clip_pixels(image: Image.Image) -> np.ndarray:
    """PIL image (any mode) -> (3, 224, 224) float32 array: upright RGB (see to_rgb), the square the model sees
    (clip_square: bicubic), CLIP mean/std: the pixels of transformers' CLIPImageProcessor (PIL backend) and of
    OpenAI's CLIP preprocessing, bit for bit."""
    image = clip_square(to_rgb(image))
    x = (np.asarray(image, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def read_mask(path, image_size, name: str = "the mask") -> Image.Image:
    """An object's mask file (greyscale or 1-bit; see patch_coverage) as mode L, checked to be `image_size` (the
    (width, height) of the image it belongs to). Raises BadImage of kind 'bad_mask' saying what is wrong."""
    try:
        mask = read_image(path, name, keep_mode=True)
    except BadImage as e:
        raise BadImage("bad_mask", str(e)) from None
    if mask.mode not in ("L", "1"):
        raise BadImage("bad_mask", f"{name} is a {mask.mode} image; a mask is greyscale (L) or 1-bit")
    if mask.size != tuple(image_size):
        raise BadImage("bad_mask", f"{name} is {mask.size[0]}x{mask.size[1]}, its image "
                                   f"{image_size[0]}x{image_size[1]}")
    return mask.convert("L")


def patch_coverage(mask: Image.Image) -> np.ndarray:
    """(7, 7) float array: the share of each 32x32 patch of the model's 224x224 square that an object covers,
    row by row as the image is read (the order of the CLIP tower's patch tokens after CLS). `mask` is the
    object's mask at the image's own size (white or any non-zero grey: object; black: background; grey levels
    count as partial cover, as an anti-aliased edge does); it is cut like the image's pixels (clip_square)."""
    if mask.mode not in ("L", "1"):
        raise ValueError(f"a mask must be a greyscale (mode L) or 1-bit image, not mode {mask.mode}")
    square = np.asarray(clip_square(mask.convert("L"), Image.BILINEAR), dtype=np.float64) / 255.0
    n = IMAGE_SIZE // PATCH_SIZE
    return square.reshape(n, PATCH_SIZE, n, PATCH_SIZE).mean(axis=(1, 3))
