"""Image decoding shared by data preparation and the streaming pipeline.

`decode_image` is the single validator: it opens encoded bytes with Pillow, guards against
decompression bombs *before* decoding pixels, and converts every mode (CMYK, palette, LA, RGBA,
16-bit) to RGB. Transparent pixels are composited onto white because Tux Paint stamps are
RGBA cut-outs whose transparent areas would otherwise turn black.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from core.paths import is_remote

MAX_IMAGE_PIXELS = 40_000_000
"""Refuse images larger than this many pixels (a 40 MP photo decodes to 120 MB of RGB)."""


def read_uri(uri: str) -> bytes:
    """Bytes of a local path or an `s3://` / `gs://` object (via pyarrow.fs)."""
    if is_remote(uri) and not uri.startswith("file://"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    with open(uri.removeprefix("file://"), "rb") as f:
        return f.read()


def decode_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode encoded image bytes into an RGB PIL image.

    Returns:
        (image, reason, source_mode): `image` is an RGB `PIL.Image` or None; `reason` says why it
        is None (`missing`, `zero_bytes`, `too_large`, `truncated`, `corrupt`); `source_mode` is
        the file's mode before conversion (e.g. `CMYK`, `P`) so callers can count conversions.
    """
    from PIL import Image, UnidentifiedImageError

    if data is None:
        return None, "missing", None
    if len(data) == 0:
        return None, "zero_bytes", None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: no pixels decoded yet
            if w <= 0 or h <= 0 or w * h > max_pixels:
                return None, "too_large", img.mode
            mode = img.mode
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too_large", None
    except UnidentifiedImageError:
        return None, "corrupt", None
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports cut-off files as OSError("image file is truncated ...")
        return None, ("truncated" if "truncat" in str(err).lower() else "corrupt"), None
    return to_rgb(img), None, mode


def to_rgb(img):
    """Any Pillow mode -> RGB; alpha is composited onto white."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")  # palette transparency becomes real alpha
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / top)).astype(np.uint8), mode="L")
    return img.convert("RGB")


def encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def image_to_array(img, size: int) -> np.ndarray:
    """RGB image -> uint8 [3, size, size]: fit the longer side, pad the rest with white.

    Padding keeps aspect ratios (a tall stamp stays tall) instead of squashing the object.
    """
    from PIL import Image

    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8).transpose(2, 0, 1).copy()  # [3, S, S]


def load_pixels(image: bytes | None, image_uri: str | None, size: int, max_pixels: int = MAX_IMAGE_PIXELS):
    """One note's pixels for the model: (uint8 [3,S,S], has_image, failure reason or None).

    A note without a usable image gets a zero image and has_image False.
    """
    data = image
    if data is None and image_uri:
        try:
            data = read_uri(image_uri)
        except OSError:
            return np.zeros((3, size, size), np.uint8), False, "unreadable_uri"
    img, reason, _ = decode_image(data, max_pixels)
    if img is None:
        return np.zeros((3, size, size), np.uint8), False, reason
    return image_to_array(img, size), True, None
