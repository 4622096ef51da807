"""Upscale images of any size and kind with a trained SR model (what `c2d upscale` does).

Inference (`sr_forward`): the model sees `(B, 3, h, w)` float RGB in [0, 1]. Images larger than
`tile` LR pixels on a side are processed in overlapping tiles and blended, so memory is bounded
and there are no seams: discrete models through `c2disr.tiling.tiled_forward`; continuous models
(any scale, also fractional) through `tiled_query`, the same tile layout and blend weights with the
output pixels of each tile queried from the continuous head. Output size: discrete `h * scale`;
continuous `round(h * scale)`.

Input kinds, handled explicitly (reading is `c2disr.evaluate.read_image`, plus the alpha channel):

| input                          | model sees          | written as                             |
|--------------------------------|---------------------|----------------------------------------|
| RGB 8-bit (PNG, JPEG, ...)     | RGB                 | RGB PNG 8-bit                          |
| gray `L`, bilevel `1`          | gray replicated RGB | gray `L` PNG (BT.601 luma of the output)|
| gray 16-bit `I;16`/`I`         | same, /65535        | gray 16-bit PNG                        |
| RGB(A) 16-bit PNG              | RGB, /65535         | RGB(A) 16-bit PNG (own PNG writer)      |
| `RGBA`, `LA`, palette with alpha | RGB (gray for LA) | RGBA / LA PNG; alpha upscaled bicubic   |
| palette `P` (opaque)           | RGB via the palette | RGB PNG (not re-palettised)            |
| CMYK, YCbCr, LAB, HSV          | RGB via Pillow      | RGB PNG                                |
The alpha channel never goes through the model: it is upscaled with MATLAB-style bicubic
(`c2disr.ops.resize.imresize`) and clamped. An embedded ICC profile is copied to 8-bit outputs;
other metadata (EXIF) is not.

Files and folders (`upscale_path`): IN is an image file or a folder, walked recursively (hidden
entries skipped; the output folder is never read back as input); every image keeps its relative
path and name with the suffix `.png`. OUT is a folder for a folder; for a file it is a `.png` path
or an existing folder. Files without an image suffix are ignored (listed). Image files that
cannot be decoded (corrupt, truncated, unsupported like 32-bit float) are skipped, counted and
listed at the end; `c2d upscale` then exits 1. Outputs are written atomically (temp + rename).
"""

from __future__ import annotations

import math
import os
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srplatform.errors import UserError
from srplatform.storage import check_writable_folder

__all__ = ["resolve_scale", "sr_forward", "tiled_query", "read_input", "write_output",
           "upscale_image", "upscale_path", "UpscaleReport", "list_inputs", "write_png16"]

DEFAULT_TILE = 256
DEFAULT_OVERLAP = 16


# ----------------------------------------------------------------------------- inference


def resolve_scale(model, scale: float | None) -> int | float:
    """The scale to run `model` at: a discrete model's own (a different `scale` is an error);
    for a continuous model `scale` is required (> 0), returned as int when it is whole."""
    if not model.continuous:
        if scale is not None and float(scale) != float(model.scale):
            raise UserError(f"this is a discrete x{model.scale} model; it cannot upscale x{scale} "
                            "(drop --scale, or use a continuous model)")
        return int(model.scale)
    if scale is None:
        raise UserError("this is a continuous (arbitrary-scale) model: give the scale (--scale S)")
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise UserError(f"scale must be a positive number, got {scale!r}")
    return int(s) if s.is_integer() else s


def scale_range_warning(model, scales) -> str | None:
    """One warning line when a continuous model is asked for scales outside the range it was
    trained on (`model.scale_range`, recorded in its model file); None when all are inside or
    the range is unknown. It still runs: the head accepts any scale, but quality outside the
    training range is not what validation measured."""
    if not getattr(model, "continuous", False):
        return None
    return range_warning(getattr(model, "scale_range", None), scales)


def range_warning(rng: tuple[float, float] | None, scales) -> str | None:
    """`scale_range_warning` for a known training range `rng` (None: no warning)."""
    if not rng:
        return None
    lo, hi = rng
    outside = [float(s) for s in scales if s is not None and not lo <= float(s) <= hi]
    if not outside:
        return None
    which = ", ".join(f"x{s:g}" for s in outside)
    return (f"warning: {which} is outside the scales this continuous model was trained on "
            f"({lo:g}-{hi:g}); expect lower quality there")


def output_size(h: int, w: int, scale: int | float) -> tuple[int, int]:
    return (h * scale, w * scale) if isinstance(scale, int) else (max(1, round(h * scale)), max(1, round(w * scale)))


def _ramp(pos, start: int, size: int, length: int, overlap: int):
    """tiled_forward's blend weights along one axis, for positions `pos` in tile pixels."""
    w = pos.new_ones(pos.shape)
    if overlap > 0:
        lo, span = overlap / 4.0, overlap / 2.0
        if start > 0:
            w = w * ((pos - lo) / span).clamp(0.0, 1.0)
        if start + size < length:
            w = w * ((size - pos - lo) / span).clamp(0.0, 1.0)
    return w


def tiled_query(model, lr, out_size: tuple[int, int], *, tile: int, overlap: int,
                on_tile: Callable[[], None] | None = None):
    """A continuous model's output `(B, 3, H, W)` for `lr (B, 3, h, w)`, in overlapping LR tiles.

    The tiles and weights are those of `c2disr.tiling.tiled_forward` (same `tile_starts`, weight
    0 within overlap/4 of an inner edge, linear over overlap/2); each tile's backbone sees only the
    tile, and every output pixel whose centre falls inside the tile is queried from it in the
    tile's own coordinate frame. For an integer scale this equals `tiled_forward` over
    `model(tile, out_size=tile_size * scale)`; it also works for fractional scales.
    """
    import torch

    from c2disr.models.heads import sample_bilinear
    from c2disr.tiling import tile_starts

    b, _, h, w = lr.shape
    big_h, big_w = out_size
    th, tw = min(tile, h), min(tile, w)
    # Output pixel i has its centre at p_i = (i + 0.5) * h / H LR pixels (pixel k spans [k, k+1)),
    # i.e. at -1 + 2 (p_i - y0) / th in the frame of a tile starting at y0. Written as one
    # integer ratio, ((2i + 1) h - 2 y0 H) / (H th), so that a tile at an integer scale gets
    # bit for bit the coordinates `make_coords` gives a whole tile (the continuous head has
    # floor() steps, so coordinates that differ in the last bit can give different colours).
    iy = 2 * torch.arange(big_h, dtype=torch.int64) + 1
    ix = 2 * torch.arange(big_w, dtype=torch.int64) + 1
    cell = torch.tensor([2.0 * h / (big_h * th), 2.0 * w / (big_w * tw)], device=lr.device, dtype=lr.dtype)
    out = weight = None
    for y0 in tile_starts(h, th, overlap):
        num_y = iy * h - 2 * y0 * big_h
        rows = torch.nonzero((num_y >= 0) & (num_y < 2 * th * big_h)).flatten()
        cy = -1 + num_y[rows].to(lr.dtype) / (big_h * th)
        wy = _ramp(num_y[rows].double() / (2 * big_h), y0, th, h, overlap)
        for x0 in tile_starts(w, tw, overlap):
            num_x = ix * w - 2 * x0 * big_w
            cols = torch.nonzero((num_x >= 0) & (num_x < 2 * tw * big_w)).flatten()
            cx = -1 + num_x[cols].to(lr.dtype) / (big_w * tw)
            wx = _ramp(num_x[cols].double() / (2 * big_w), x0, tw, w, overlap)
            crop = lr[..., y0:y0 + th, x0:x0 + tw]
            coords = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), dim=-1).view(1, -1, 2)
            coords = coords.to(lr.device).expand(b, -1, -1)
            cells = cell.expand_as(coords)
            fmap = model.head.encode(model.features(crop))
            rgb = model.head.query(fmap, coords, cells, chunk=model.head.cfg.chunk)
            rgb = rgb + sample_bilinear(crop, coords)  # (B, Q, 3), as SRModel.forward
            rgb = rgb.transpose(1, 2).reshape(b, 3, len(rows), len(cols))
            wt = (wy[:, None] * wx[None, :]).to(rgb.device, rgb.dtype)
            if out is None:
                out = rgb.new_zeros(b, 3, big_h, big_w)
                weight = rgb.new_zeros(1, 1, big_h, big_w)
            r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            out[..., r0:r1, c0:c1] += rgb * wt
            weight[..., r0:r1, c0:c1] += wt
            if on_tile:
                on_tile()
    return out / weight


def count_tiles(h: int, w: int, tile: int | None, overlap: int) -> int:
    """How many tiles `sr_forward` runs for an `h x w` input (1 = the whole image at once)."""
    if not tile or (h <= tile and w <= tile):
        return 1
    from c2disr.tiling import tile_starts

    return len(tile_starts(h, min(tile, h), overlap)) * len(tile_starts(w, min(tile, w), overlap))


def sr_forward(model, lr, *, scale: float | None = None, tile: int | None = None,
               overlap: int = DEFAULT_OVERLAP, on_tile: Callable[[], None] | None = None):
    """`lr (B, 3, h, w)` float [0, 1] RGB -> SR `(B, 3, H, W)` (not clamped), whole or tiled.

    `scale`: see `resolve_scale`. `tile`: LR tile side (None/0 = whole image; tiling only
    happens when the image is larger). `overlap`: LR pixels shared by neighbouring tiles
    (< tile). `on_tile` is called after each tile (progress). Runs without autograd.
    """
    import torch

    from c2disr.tiling import tiled_forward

    s = resolve_scale(model, scale)
    h, w = lr.shape[-2:]
    if tile and not 0 <= overlap < tile:
        raise UserError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    tiled = count_tiles(h, w, tile, overlap) > 1
    with torch.inference_mode():
        if model.continuous:
            size = output_size(h, w, s)
            if not tiled:
                return model(lr, out_size=size)
            return tiled_query(model, lr, size, tile=tile, overlap=overlap, on_tile=on_tile)
        if not tiled:
            return model(lr)

        def fn(t):
            y = model(t)
            if on_tile:
                on_tile()
            return y

        return tiled_forward(fn, lr, s, tile=tile, overlap=overlap)


# ----------------------------------------------------------------------------- reading and writing


@dataclass
class Decoded:
    """An input image: `rgb (3, h, w)` float [0, 1], optional `alpha (1, h, w)` float [0, 1]."""

    rgb: Any
    alpha: Any
    gray: bool
    bits: int
    mode: str
    icc: bytes | None = None


def read_input(path: Path) -> Decoded:
    """Decode `path` for upscaling (see the module table). Raises ValueError when the file is
    not a decodable image (the caller skips and counts it)."""
    import numpy as np
    import torch
    from PIL import Image

    from c2disr.evaluate import read_image

    try:
        rgb, info = read_image(path)
    except Image.DecompressionBombError as exc:  # Pillow's guard: > ~179 M pixels
        raise ValueError(f"{path}: too large to decode safely ({exc})") from exc
    alpha, icc = None, None
    try:
        with Image.open(path) as im:
            icc = im.info.get("icc_profile")
            if info.alpha_dropped:
                a = None
                if info.bits == 16 and im.mode == "RGBA":
                    a = _alpha16(im, path)
                if a is None:
                    a = np.asarray(im.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
                alpha = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: image data is corrupt ({exc})") from exc
    return Decoded(rgb=rgb, alpha=alpha, gray=info.gray, bits=16 if info.bits == 16 else 8,
                   mode=info.mode, icc=icc)


def _alpha16(im, path: Path):
    """The full 16-bit alpha of a 64-bit RGBA PNG (Pillow itself narrows it to 8 bits)."""
    try:
        from c2disr.evaluate import _decode_16bit_colour  # the one 16-bit colour decoder
    except ImportError:
        return None
    wide = _decode_16bit_colour(im, path)
    if wide is None or wide.shape[-1] != 4:
        return None
    return wide[..., 3].astype("float32") / 65535.0


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(path: Path, arr) -> None:
    """Write `(H, W, C)` uint16 (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) as a 16-bit PNG.

    Pillow cannot write 16-bit colour PNGs, so this writes the format directly: IHDR, one
    zlib stream of rows with the PNG "Sub" filter (exact, compresses smooth images), IEND.
    """
    import numpy as np

    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"write_png16: need (H, W, 1|2|3|4) uint16, got {arr.shape} {arr.dtype}")
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = arr.astype(">u2").reshape(h, w * c).view(np.uint8)  # (h, w*c*2) bytes, big-endian
    bpp = c * 2
    filtered = raw.copy()
    filtered[:, bpp:] = raw[:, bpp:] - raw[:, :-bpp]  # uint8 arithmetic wraps mod 256, as PNG
    rows = np.concatenate([np.ones((h, 1), np.uint8), filtered], axis=1)  # filter type 1 = Sub
    png = (b"\x89PNG\r\n\x1a\n"
           + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
           + _png_chunk(b"IEND", b""))
    Path(path).write_bytes(png)


def write_output(path: Path, sr, alpha, *, gray: bool, bits: int, icc: bytes | None = None) -> str:
    """Write `sr (3, H, W)` float and optional `alpha (1, H, W)` as PNG (atomically); returns
    the written mode ("RGB", "RGBA", "L", "LA", "I;16", "RGB;16", "RGBA;16")."""
    import numpy as np
    import torch
    from PIL import Image

    from c2disr.metrics import rgb_to_gray

    sr = sr.detach().float().cpu().clamp(0, 1)
    planes = rgb_to_gray(sr[None])[0] if gray else sr  # (1|3, H, W)
    if alpha is not None:
        planes = torch.cat([planes, alpha.detach().float().cpu().clamp(0, 1)], dim=0)
    hwc = planes.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if bits == 16:
            q = np.round(hwc * 65535.0).astype(np.uint16)
            if q.shape[-1] == 1:
                Image.fromarray(q[..., 0]).save(tmp, format="PNG")  # I;16
                mode = "I;16"
            else:
                write_png16(tmp, q)
                mode = {2: "LA;16", 3: "RGB;16", 4: "RGBA;16"}[q.shape[-1]]
        else:
            q = np.round(hwc * 255.0).astype(np.uint8)
            mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[q.shape[-1]]
            im = Image.fromarray(q[..., 0] if q.shape[-1] == 1 else q, mode=mode)
            extra = {"icc_profile": icc} if icc else {}
            im.save(tmp, format="PNG", **extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return mode


def upscale_image(model, img: Decoded, *, scale: float | None, tile: int | None, overlap: int,
                  device=None, on_tile: Callable[[], None] | None = None):
    """`(sr (3, H, W), alpha (1, H, W) | None)` for a decoded image (CPU tensors)."""
    from c2disr.ops.resize import imresize

    dev = device or next(model.parameters()).device
    lr = img.rgb[None].to(dev)
    sr = sr_forward(model, lr, scale=scale, tile=tile, overlap=overlap, on_tile=on_tile)[0].float().cpu()
    alpha = None
    if img.alpha is not None:
        alpha = imresize(img.alpha[None].double(), size=tuple(sr.shape[-2:]))[0].clamp(0, 1).float()
    return sr, alpha


# ----------------------------------------------------------------------------- files and folders


@dataclass
class UpscaleReport:
    written: list[tuple[str, str, str]] = field(default_factory=list)  # (input, output, mode)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, why): corrupt/unreadable
    ignored: list[str] = field(default_factory=list)  # not image files
    existing: list[str] = field(default_factory=list)  # outputs already there (--skip-existing)

    @property
    def ok(self) -> bool:
        return not self.skipped


def _suffixes() -> tuple[str, ...]:
    from c2disr.evaluate import IMAGE_SUFFIXES

    return tuple(IMAGE_SUFFIXES) + (".gif",)


def _same_file(a: Path, b: Path) -> bool:
    """True when the paths name one file: the same path after resolving `..` and symbolic
    links (./in.png, a link to it), or, when both exist, the same inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist yet
        return False


def list_inputs(src: str | Path, dst: str | Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """`([(input, output), ...], ignored)` for a file or a folder (see the module docstring).
    For a file, `dst` is a folder when it exists as one or ends with a path separator."""
    suffixes = _suffixes()
    dst_is_dir = str(dst).endswith(("/", os.sep))
    src, dst = Path(src), Path(dst)
    if src.is_file():
        out = dst / (src.stem + ".png") if dst_is_dir or dst.is_dir() else dst
        if out.suffix.lower() != ".png":
            raise UserError(f"{dst}: outputs are PNG files; name it *.png, or give a folder "
                            "(an existing one, or a path ending with /)")
        if _same_file(src, out):
            raise UserError(f"{out}: the output would overwrite the input {src}; choose another OUT")
        check_writable_folder(out.parent, "OUT")
        return [(src, out)], []
    if not src.is_dir():
        raise UserError(f"{src}: no such file or folder")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder (a folder input needs an output folder)")
    check_writable_folder(dst, "OUT")
    dst_res = dst.resolve()
    pairs, ignored = [], []
    for root, dirs, files in os.walk(src):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (rootp / d).resolve() != dst_res)
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = rootp / name
            if p.suffix.lower() not in suffixes:
                ignored.append(str(p))
                continue
            pairs.append((p, dst / p.relative_to(src).with_suffix(".png")))
    if not pairs:
        raise UserError(f"{src}: no image files ({', '.join(suffixes)}) found (recursively)")
    seen: dict[Path, Path] = {}
    clashes = []
    for p, out in pairs:
        if out in seen:
            clashes.append(f"{seen[out]} and {p} -> {out}")
        seen[out] = p
        if out.resolve() == p.resolve():
            raise UserError(f"{p}: the output would overwrite this input; choose another OUT folder")
    if clashes:
        raise UserError("inputs that would write the same output (rename one of each):\n  "
                        + "\n  ".join(clashes))
    return pairs, ignored


def upscale_path(model, src: str | Path, dst: str | Path, *, scale: float | None = None,
                 tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, device=None,
                 skip_existing: bool = False, progress: bool = True) -> UpscaleReport:
    """Upscale the image file or folder `src` into `dst` (see the module docstring).

    Corrupt inputs are skipped and reported in the returned `UpscaleReport`; user mistakes
    (paths, scale, tile) raise UserError before any work.
    """
    from tqdm import tqdm

    resolve_scale(model, scale)  # fail before reading anything
    if tile is not None and tile < 0:
        raise UserError(f"--tile must be >= 0 (0 = whole image), got {tile}")
    if tile and not 0 <= overlap < tile:
        raise UserError(f"need 0 <= --overlap < --tile, got tile={tile}, overlap={overlap}")
    pairs, ignored = list_inputs(src, dst)
    report = UpscaleReport(ignored=ignored)
    bar = tqdm(pairs, desc="upscale", unit="img", disable=not progress, file=sys.stderr)
    for inp, out in bar:
        bar.set_postfix_str(inp.name[-40:], refresh=False)
        if skip_existing and out.exists():
            report.existing.append(str(out))
            continue
        try:
            img = read_input(inp)
        except (ValueError, OSError) as exc:
            report.skipped.append((str(inp), str(exc)))
            continue
        h, w = img.rgb.shape[-2:]
        n_tiles = count_tiles(h, w, tile, overlap)
        tbar = tqdm(total=n_tiles, desc=f"  tiles {inp.name[-30:]}", unit="tile", leave=False,
                    disable=not progress or n_tiles <= 1, file=sys.stderr)
        try:
            sr, alpha = upscale_image(model, img, scale=scale, tile=tile, overlap=overlap,
                                      device=device, on_tile=lambda: tbar.update(1))
        finally:
            tbar.close()
        mode = write_output(out, sr, alpha, gray=img.gray, bits=img.bits, icc=img.icc)
        report.written.append((str(inp), str(out), mode))
    bar.close()
    return report
