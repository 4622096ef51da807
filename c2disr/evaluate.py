"""Benchmark evaluation with the convention published SR tables use.

For each HR image of a folder (Set5, Set14, ...):
1. load it as `(3, H, W)` float [0, 1] RGB (`load_image`);
2. crop it to a multiple of the scale (top-left anchored, as MATLAB's `modcrop`) and make the LR
   input with MATLAB bicubic `imresize(hr, 1/scale)`, rounded to uint8 levels (`make_pair`);
3. upscale with the given function, clamp and round the result to uint8 levels;
4. PSNR/SSIM on BT.601 Y (gray originals: on their gray values, see c2disr.metrics) with
   `scale` pixels removed from every border.

Why the LR is rounded: published LR sets are 8-bit PNGs, and the bicubic baselines were measured
from them. With `quantize_lr=True` our bicubic baseline gives Set5 33.68/30.40/28.43 dB and Set14
30.24/27.54/26.00 dB (x2/x3/x4); without rounding, Set5 33.69/30.41/28.43 and Set14
30.25/27.55/26.01. Both are within 0.03 dB of the published 33.66/30.39/28.42 and
30.24/27.55/26.00; rounding is the faithful choice (it is what the published pipeline did) and is
the default.

Also here for now: `save_model` / `load_model` for the project's checkpoint format
`{"spec": model.spec, "state_dict": model.state_dict()}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from c2disr.metrics import psnr, quantize, rgb_to_gray, ssim
from c2disr.ops.resize import imresize

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageInfo",
    "read_image",
    "load_image",
    "list_images",
    "make_pair",
    "evaluate_folder",
    "save_model",
    "load_model",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Pillow rawmodes whose 16-bit samples it narrows to 8 bits when decoding to RGB(A); we decode
# such images twice (high bytes, then low bytes) to keep all 16 bits. Endianness letter swaps.
_SWAP_16 = {"B": "L", "L": "B"}


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageInfo:
    """What `read_image` found in the file.

    mode: Pillow's mode of the file ("RGB", "L", "I;16", "P", ...).
    gray: the file has one colour channel (replicated to RGB in the tensor).
    bits: bits per sample of the source (8 or 16; 1 for bilevel).
    alpha_dropped: the file had an alpha channel, which was discarded (not composited).
    """

    mode: str
    gray: bool
    bits: int
    alpha_dropped: bool


def _decode_16bit_colour(im: Image.Image, path: Path) -> np.ndarray | None:
    """Full 16-bit decode of a 48/64-bit colour image that Pillow would narrow to 8 bits.

    Returns `(H, W, C)` uint16 or None when the image is not such a file. Pillow's RGB;16B /
    RGB;16L unpackers keep the most significant byte; decoding a second time with the
    endianness swapped yields the least significant byte (same codec, same unfiltering).
    """
    tiles = list(im.tile)
    if im.mode not in ("RGB", "RGBA") or not tiles:
        return None
    rawmodes = []
    for t in tiles:
        args = t.args
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
        if not isinstance(raw, str) or not raw.startswith(im.mode + ";16"):
            return None
        rawmodes.append(raw)
    if any(raw[-1] not in _SWAP_16 for raw in rawmodes) or any(t.codec_name not in ("zip", "raw") for t in tiles):
        raise ValueError(
            f"{path}: 16-bit {im.mode} image stored in a way this loader cannot read at full "
            f"precision (codec {tiles[0].codec_name}, rawmode {rawmodes[0]}); convert it to a "
            "16-bit PNG or an 8-bit image"
        )
    hi = np.asarray(im.convert(im.mode), dtype=np.uint16)
    with Image.open(path) as lo_im:
        new_tiles = []
        for t in lo_im.tile:
            args = t.args
            if isinstance(args, str):
                args = args[:-1] + _SWAP_16[args[-1]]
            else:
                args = (args[0][:-1] + _SWAP_16[args[0][-1]],) + tuple(args[1:])
            new_tiles.append(t._replace(args=args))
        lo_im.tile = new_tiles
        lo = np.asarray(lo_im.convert(lo_im.mode), dtype=np.uint16)
    return (hi << 8) | lo


def read_image(path: str | Path) -> tuple[torch.Tensor, ImageInfo]:
    """Decode an image file to `(3, H, W)` float32 RGB in [0, 1], with what was found.

    Handling by kind (so nothing is silently lost):
    * gray ("L", "1", "LA", 16-bit "I;16*"/"I"): the channel is replicated to R, G and B;
    * alpha ("RGBA", "LA", palettes with transparency): the alpha channel is dropped, not
      composited over a background; SR benchmarks are opaque and the colour under a transparent
      pixel is still the ground truth the model is asked to reproduce;
    * palette ("P"): expanded through the palette to RGB;
    * 16-bit ("I;16", 16-bit RGB/RGBA PNG): divided by 65535; 32-bit integer "I" images (how
      Pillow may open 16-bit gray) must hold values <= 65535 and are treated as 16-bit;
    * other colour spaces (CMYK, YCbCr, LAB, HSV) are converted to RGB by Pillow;
    * 32-bit float ("F") images are rejected: their range is not defined.

    Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        im = Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc}); remove it or re-save it") from exc
    with im:
        mode = im.mode
        try:
            if mode in ("RGB", "RGBA"):
                wide = _decode_16bit_colour(im, path)
                if wide is not None:
                    arr = wide[..., :3].astype(np.float32) / 65535.0
                    info = ImageInfo(mode=mode + ";16", gray=False, bits=16, alpha_dropped=mode == "RGBA")
                    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous(), info
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                info = ImageInfo(mode=mode, gray=False, bits=8, alpha_dropped=mode == "RGBA")
            elif mode in ("L", "LA", "1"):
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
                info = ImageInfo(mode=mode, gray=True, bits=1 if mode == "1" else 8, alpha_dropped=mode == "LA")
            elif mode.startswith("I;16") or mode == "I":
                raw = np.asarray(im)
                if raw.ndim != 2:
                    raise ValueError(f"{path}: unexpected {mode} array shape {raw.shape}")
                if raw.min() < 0 or raw.max() > 65535:
                    raise ValueError(
                        f"{path}: 32-bit integer image with values outside 0..65535 "
                        f"({raw.min()}..{raw.max()}); save it as an 8- or 16-bit PNG"
                    )
                arr = raw.astype(np.float32) / 65535.0
                info = ImageInfo(mode=mode, gray=True, bits=16, alpha_dropped=False)
            elif mode == "P" or mode == "PA":
                has_alpha = mode == "PA" or "transparency" in im.info
                arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32)
                arr = arr[..., :3] / 255.0
                info = ImageInfo(mode=mode, gray=False, bits=8, alpha_dropped=has_alpha)
            elif mode == "F":
                raise ValueError(
                    f"{path}: 32-bit float image; its value range is undefined. Save it as an 8- "
                    "or 16-bit PNG"
                )
            else:  # CMYK, YCbCr, LAB, HSV, ...: Pillow knows the conversion
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                info = ImageInfo(mode=mode, gray=False, bits=8, alpha_dropped=False)
        except (OSError, SyntaxError) as exc:  # truncated or corrupt data surfaces at decode time
            raise ValueError(f"{path}: image data is corrupt ({exc}); re-save or remove it") from exc
    if arr.ndim == 2:
        t = torch.from_numpy(np.ascontiguousarray(arr))[None].expand(3, -1, -1).contiguous()
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    return t, info


def load_image(path: str | Path) -> torch.Tensor:
    """`(3, H, W)` float32 RGB in [0, 1]; gray replicated, alpha dropped, 16-bit scaled by
    1/65535. See `read_image` for the details and for what was found in the file."""
    return read_image(path)[0]


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by suffix, case-insensitive) directly in `folder`, sorted by name.

    Raises FileNotFoundError if the folder does not exist, ValueError if it holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
        )
    return files


def make_pair(
    hr: torch.Tensor, scale: int, *, quantize_lr: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard benchmark pair of one HR image.

    Args:
        hr: `(3, H, W)` or `(B, 3, H, W)` float RGB in [0, 1].
        scale: integer SR factor.
        quantize_lr: round the LR to uint8 levels, as the published 8-bit LR sets are (default).

    Returns:
        `(lr, hr_cropped)`: `hr_cropped` is `hr[..., :H - H % scale, :W - W % scale]` and `lr` its
        MATLAB bicubic downscale `(…, 3, H'/scale, W'/scale)`, in `hr`'s dtype.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"make_pair: scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    h, w = hr.shape[-2:]
    hc, wc = h - h % scale, w - w % scale
    if hc == 0 or wc == 0:
        raise ValueError(f"make_pair: a {h}x{w} image is smaller than the scale {scale}")
    hr_c = hr[..., :hc, :wc]
    # Downscale in float64 so the LR's rounding to uint8 matches an exact computation.
    lr = imresize(hr_c.to(torch.float64), 1.0 / scale)
    if lr.shape[-2:] != (hc // scale, wc // scale):  # guards the ceil() in imresize
        raise AssertionError(f"LR size {tuple(lr.shape[-2:])} != {(hc // scale, wc // scale)}")
    if quantize_lr:
        lr = quantize(lr)
    return lr.to(hr.dtype), hr_c


UpscaleFn = Callable[[torch.Tensor], torch.Tensor]


def evaluate_folder(
    upscale_fn: UpscaleFn,
    folder: str | Path,
    scale: int,
    *,
    crop_border: int | None = None,
    y_channel: bool = True,
    quantize_lr: bool = True,
    device: str | torch.device | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """PSNR/SSIM of `upscale_fn` on every image of `folder` at integer `scale`.

    Args:
        upscale_fn: `lr (1, 3, h, w)` float [0, 1] RGB -> `(1, 3, h*scale, w*scale)`; called
            under `torch.inference_mode()` with `lr` on `device`.
        folder: a folder of HR images (see `list_images`; other files are ignored and counted).
        scale: integer SR factor.
        crop_border: pixels removed from each border before measuring; default `scale`.
        y_channel: measure on BT.601 Y (gray originals on their gray values); False: on RGB.
        quantize_lr: round LR inputs to uint8 levels (see the module docstring).
        device: where `lr` is placed before calling `upscale_fn` (default: CPU).
        progress: called after each image as `progress(index, count, row)`.

    Returns:
        `{"folder", "scale", "crop_border", "psnr", "ssim", "count", "total", "skipped",
        "ignored_files", "seconds", "images": [{"name", "height", "width", "gray", "psnr", "ssim",
        "seconds"}, ...]}`; psnr and ssim are means over the `count` measured images (of `psnr`,
        `ssim` as floats); height/width are the cropped HR size. `skipped` lists the image files
        that could not be measured (unreadable, or smaller than `scale`) as `{"name", "reason"}`;
        `total` = count + len(skipped). A mean over fewer images than the set holds is not
        comparable to published numbers: callers must show `count` of `total` when skipped.

    Raises:
        FileNotFoundError / ValueError naming the folder or image: no image measured at all, or a
        wrong output shape or non-finite output of `upscale_fn` (a fault of the model, not of
        the image).
    """
    folder = Path(folder)
    files = list_images(folder)
    chosen = set(files)
    ignored = sorted(p.name for p in folder.iterdir() if p.is_file() and p not in chosen)
    border = scale if crop_border is None else int(crop_border)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    rows: list[dict] = []
    skipped: list[dict] = []
    t_start = time.perf_counter()
    for i, path in enumerate(files):
        try:
            hr_img, info = read_image(path)
            lr, hr = make_pair(hr_img.unsqueeze(0), scale, quantize_lr=quantize_lr)
        except (FileNotFoundError, ValueError) as exc:  # this image only: skip and count it
            why = str(exc)
            skipped.append({"name": path.name, "reason": why if path.name in why else f"{path.name}: {why}"})
            continue
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = upscale_fn(lr.to(dev))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{path.name}: upscale_fn returned {type(out).__name__}, not a tensor")
        out = out.detach().to("cpu", torch.float32)
        expected = (1, 3, hr.shape[-2], hr.shape[-1])
        if tuple(out.shape) != expected:
            raise ValueError(
                f"{path.name}: upscale_fn returned shape {tuple(out.shape)} for LR "
                f"{tuple(lr.shape)}; expected {expected} (x{scale})"
            )
        if not torch.isfinite(out).all():
            raise ValueError(f"{path.name}: upscale_fn output contains NaN or inf")
        seconds = time.perf_counter() - t0
        sr = quantize(out)
        if info.gray and y_channel:
            # Published tables measure gray originals on the gray values (see c2disr.metrics).
            a, b, use_y = rgb_to_gray(sr.double()), hr[:, :1].double(), False
        else:
            a, b, use_y = sr, hr, y_channel
        row = {
            "name": path.name,
            "height": int(hr.shape[-2]),
            "width": int(hr.shape[-1]),
            "gray": info.gray,
            "psnr": float(psnr(a, b, border, y_channel=use_y)[0]),
            "ssim": float(ssim(a, b, border, y_channel=use_y)[0]),
            "seconds": seconds,
        }
        rows.append(row)
        if progress is not None:
            progress(i, len(files), row)
    if not rows:
        raise ValueError(f"{folder}: none of its {len(files)} images could be measured at x{scale} ("
                         + "; ".join(s["reason"] for s in skipped[:3]) + (" ..." if len(skipped) > 3 else "") + ")")
    return {
        "folder": str(folder),
        "scale": int(scale),
        "crop_border": border,
        "y_channel": y_channel,
        "quantize_lr": quantize_lr,
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "count": len(rows),
        "total": len(files),
        "skipped": skipped,
        "ignored_files": ignored,
        "seconds": time.perf_counter() - t_start,
        "images": rows,
    }


# ----------------------------------------------------------------------------- checkpoints
_CKPT_KEYS = ("spec", "state_dict")


def save_model(path: str | Path, model: torch.nn.Module, *,
               scale_range: tuple[float, float] | None = None) -> Path:
    """Write `{"spec": model.spec, "state_dict": model.state_dict()}` to `path` (torch.save).

    `model.spec` is the plain dict `c2disr.models.build_from_spec` rebuilds the architecture from.
    `scale_range`: the `(min, max)` scales a continuous model was trained on (default: the
    model's own `scale_range` attribute, set by `load_model`), stored as `"scale_range"` so
    that upscaling outside it can warn; omitted when unknown.
    """
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict):
        raise TypeError(
            f"save_model: {type(model).__name__} has no dict `.spec`; only models built by "
            "c2disr.models can be saved in this format"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"spec": dict(spec), "state_dict": state}
    if scale_range is None:
        scale_range = getattr(model, "scale_range", None)
    if scale_range is not None:
        lo, hi = (float(x) for x in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"save_model: scale_range must be (min, max) with 0 < min <= max, got {scale_range}")
        ckpt["scale_range"] = [lo, hi]
    torch.save(ckpt, path)
    return path


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model saved by `save_model` (weights_only load, strict state dict), in eval mode.

    Raises FileNotFoundError / ValueError naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    from c2disr.models.checkpoints import load_weights_only

    try:
        ckpt = load_weights_only(path, map_location)
    except ValueError:  # non-tensor objects: refused, with the reason
        raise
    except Exception as exc:  # truncated or foreign files
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CKPT_KEYS):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = ""
        if isinstance(ckpt, dict) and ({"params", "params_ema"} & set(ckpt)):
            hint = (
                "; it looks like an official published checkpoint: build the model with "
                "c2disr.models.build_model and load it with c2disr.models.load_published"
            )
        raise ValueError(f"{path}: expected a dict with keys {list(_CKPT_KEYS)}, found {keys}{hint}")
    if not isinstance(ckpt["spec"], dict):
        raise ValueError(f"{path}: 'spec' must be a dict, found {type(ckpt['spec']).__name__}")
    from c2disr.models import build_from_spec  # imported here: evaluation alone needs no models

    try:
        model = build_from_spec(ckpt["spec"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: its 'spec' does not describe a known model: {exc}") from exc
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match its spec {ckpt['spec']}: {exc}") from exc
    rng = ckpt.get("scale_range")
    # (min, max) scales of the training of a continuous model; None when the file does not say
    model.scale_range = (float(rng[0]), float(rng[1])) if isinstance(rng, (list, tuple)) and len(rng) == 2 else None
    return model.to(map_location).eval()

