"""Image decoding rules shared by packing and streaming (pure Pillow + numpy).

One rule set, so an image that passes validation at pack time decodes the same way in the
Ray Data tasks:

- gray ("1", "L", "LA", 16-bit "I;16*"): replicated to 3 channels;
- alpha ("RGBA", "LA", "PA", palette with transparency): dropped, never composited;
- palette ("P"): expanded through its palette;
- 16-bit (gray "I;16*", and 48/64-bit colour PNG or raw TIFF): kept as uint16, scaled by
  1/65535. Pillow narrows 16-bit colour to 8 bits when it decodes; we decode such files a second
  time with the sample byte order swapped, which yields the low bytes, and join the two;
- other colour spaces ("CMYK", "YCbCr", "LAB", "HSV"): converted to RGB by Pillow;
- 32-bit float ("F") and 32-bit integer images beyond 16-bit range: rejected (no agreed white
  level), so they are skipped with that reason;
- animated files: the first frame.
These are the rules of `c2disr.evaluate.read_image` (which reads files by path; shards hold
bytes, and c2disr may not import srplatform, hence this bytes-level twin). A test decodes the
same odd-mode files with both and requires identical pixels.

Arrays are (H, W, 3) RGB, uint8 (white = 255) or uint16 (white = 65535); `to_float` makes
float32 [0, 1].
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# File name extensions `pack` looks for (lower case, with the dot).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Formats stored byte for byte in shards; everything else is transcoded to PNG.
STORED_AS_IS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg"}
# Modes a PNG file can hold without loss (used when transcoding).
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


class DecodeError(ValueError):
    """The bytes are not an image this project can use; the message says why."""


@dataclass(frozen=True)
class Probe:
    """What `decode` learned about one image besides its pixels."""

    format: str  # Pillow's format name ("PNG", "JPEG", "WEBP", ...)
    mode: str  # Pillow's mode as opened ("RGB", "L", "P", "I;16", ...; "RGB;16" for 48-bit)
    width: int
    height: int
    converted: str  # what was done to reach RGB ("" when nothing), e.g. "alpha dropped"


_BYTE_ORDER_SWAP = {"B": "L", "L": "B"}


def _wide_rawmode(im: Image.Image) -> bool:
    """True when Pillow is about to narrow 16-bit colour samples (rawmode "RGB;16B" etc.)."""
    if im.mode not in ("RGB", "RGBA") or not im.tile:
        return False
    raws = [t.args if isinstance(t.args, str) else (t.args or ("",))[0] for t in im.tile]
    if not all(isinstance(r, str) and r.startswith(im.mode + ";16") for r in raws):
        return False
    if any(r[-1] not in _BYTE_ORDER_SWAP for r in raws) or any(
        t.codec_name not in ("zip", "raw") for t in im.tile
    ):
        raise DecodeError(
            f"16-bit {im.mode} image in an encoding this loader cannot read at full precision "
            f"(codec {im.tile[0].codec_name}): convert it to a 16-bit PNG or an 8-bit image"
        )
    return True


def _low_bytes(data: bytes, mode: str) -> np.ndarray:
    """Decode 16-bit colour again with the byte order of every tile swapped: Pillow then keeps
    the low byte of each sample instead of the high one. (H, W, C) uint16 low bytes."""
    im = Image.open(io.BytesIO(data))
    swapped = []
    for t in im.tile:
        if isinstance(t.args, str):
            args: Any = t.args[:-1] + _BYTE_ORDER_SWAP[t.args[-1]]
        else:
            args = (t.args[0][:-1] + _BYTE_ORDER_SWAP[t.args[0][-1]],) + tuple(t.args[1:])
        swapped.append(t._replace(args=args))
    im.tile = swapped
    im.load()
    return np.asarray(im, dtype=np.uint16)


def _open(data: bytes) -> tuple[Image.Image, np.ndarray | None]:
    """Open and fully decode. Returns (image, full 16-bit colour array or None)."""
    wide = None
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is an error here: one huge file must not stall a
            # data task; Pillow raises DecompressionBombError beyond twice the limit anyway.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            is_wide = _wide_rawmode(im)
            im.load()  # decode fully: truncated files fail here, not later
            if is_wide:
                hi = np.asarray(im, dtype=np.uint16)
                wide = (hi << 8) | _low_bytes(data, im.mode)
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large to decode safely ({exc})") from None
    except Image.DecompressionBombWarning as exc:
        raise DecodeError(f"image too large to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image ({exc})") from None
    return im, wide


def pil_to_rgb(im: Image.Image) -> tuple[np.ndarray, str]:
    """A loaded Pillow image -> ((H, W, 3) uint8 or uint16 RGB array, what was converted)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im), ""
    if mode in ("RGBA", "RGBX", "RGBa"):
        return np.ascontiguousarray(np.asarray(im)[..., :3]), "alpha dropped"
    if mode in ("L", "1"):
        g = np.asarray(im.convert("L") if mode == "1" else im)
        return np.repeat(g[..., None], 3, axis=2), "gray replicated"
    if mode in ("LA", "La"):
        g = np.asarray(im)[..., 0]
        return np.repeat(g[..., None], 3, axis=2), "gray replicated, alpha dropped"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        rgb = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))[..., :3]
        note = "palette expanded" + (", alpha dropped" if has_alpha else "")
        return np.ascontiguousarray(rgb), note
    if mode.startswith("I;16"):
        g = np.asarray(im).astype(np.uint16)  # "I;16B" arrives big-endian: make it native
        return np.repeat(g[..., None], 3, axis=2), "16-bit gray replicated"
    if mode == "I":
        g = np.asarray(im)
        if g.size and (g.min() < 0 or g.max() > 65535):
            raise DecodeError("32-bit integer image outside the 16-bit range: convert it first")
        return np.repeat(g.astype(np.uint16)[..., None], 3, axis=2), "16-bit gray replicated"
    if mode == "F":
        raise DecodeError("32-bit float image (mode F) has no agreed white level: convert it")
    try:
        return np.asarray(im.convert("RGB")), f"{mode} converted to RGB"
    except (ValueError, OSError) as exc:
        raise DecodeError(f"cannot convert mode {mode} to RGB ({exc})") from None


def decode(data: bytes) -> tuple[np.ndarray, Probe]:
    """Decode image bytes fully -> ((H, W, 3) uint8/uint16 RGB, Probe). Raises DecodeError."""
    if not data:
        raise DecodeError("empty file")
    im, wide = _open(data)
    if wide is not None:
        arr = np.ascontiguousarray(wide[..., :3])
        note = "16-bit colour" + (", alpha dropped" if im.mode == "RGBA" else "")
    else:
        arr, note = pil_to_rgb(im)
    if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise DecodeError(f"decoded to an unusable array of shape {arr.shape}")
    mode = im.mode + (";16" if wide is not None else "")
    probe = Probe(im.format or "?", mode, im.width, im.height, note)
    return arr, probe


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8/uint16 array -> float32 [0, 1] (same shape)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * np.float32(1 / 255)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) * np.float32(1 / 65535)
    raise TypeError(f"expected uint8 or uint16, got {arr.dtype}")


def decode_float(data: bytes) -> np.ndarray:
    """Image bytes -> (H, W, 3) float32 [0, 1] RGB. Raises DecodeError."""
    return to_float(decode(data)[0])


def storable(data: bytes, probe: Probe) -> tuple[bytes, str, bool]:
    """What a shard stores for one validated image: (bytes, extension, transcoded?).

    PNG and JPEG keep their original bytes (lossless, no re-encoding cost, and the shard's
    pixels are exactly the source's). Other formats (WebP, BMP, TIFF, ...) become PNG of the
    decoded pixels, keeping the mode when PNG can hold it (palette, gray, 16-bit gray, alpha)
    and RGB otherwise, so every reader needs only PNG and JPEG support.
    """
    ext = STORED_AS_IS.get(probe.format)
    if ext:
        return data, ext, False
    im, _ = _open(data)
    if im.mode not in _PNG_MODES:
        if im.mode == "I":
            arr, _ = pil_to_rgb(im)
            im = Image.fromarray(arr[..., 0])  # uint16 gray -> "I;16"
        else:
            im = Image.fromarray(pil_to_rgb(im)[0])
    out = io.BytesIO()
    # Fixed settings so the same input always gives the same bytes (idempotent packs).
    im.save(out, format="PNG", compress_level=6)
    return out.getvalue(), "png", True
