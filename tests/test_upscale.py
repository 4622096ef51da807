"""`c2d upscale` and srplatform.upscale: tiling without seams, every input kind, folders.

No servers: models are tiny c2disr models saved as model files, plus two small stand-ins with a
1-pixel receptive field (one discrete, one continuous) for which tiled output must equal the
whole-image output exactly; that checks the tile geometry, the blending and, for fractional
scales, the coordinate mapping of `tiled_query`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from c2disr.evaluate import _decode_16bit_colour, read_image, save_model
from c2disr.models import build_model
from c2disr.models.heads import make_coords, sample_bilinear
from c2disr.ops.resize import imresize
from c2disr.tiling import tiled_forward
from srplatform.cli import main
from srplatform.upscale import (
    count_tiles,
    read_input,
    sr_forward,
    tiled_query,
    upscale_path,
    write_png16,
)


# ----------------------------------------------------------------------------- stand-ins


class LocalDiscrete(nn.Module):
    """x`scale` model whose output pixel depends on a 3x3 LR neighbourhood (receptive field 1)."""

    continuous = False
    spec = {"arch": "local-test"}

    def __init__(self, scale: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.scale = scale
        self.conv = nn.Conv2d(3, 3 * scale * scale, 3, padding=1, padding_mode="replicate")

    def forward(self, lr):
        return F.pixel_shuffle(self.conv(lr), self.scale) * 0.2 + F.interpolate(
            lr, scale_factor=self.scale, mode="nearest")


class _LocalHead(nn.Module):
    class cfg:  # noqa: N801 - mimics the head config attribute tiled_query reads
        chunk = 4096

    def encode(self, feats):
        return feats

    def query(self, fmap, coords, cells, chunk=None):
        # Depends on the location and on the cell in LR pixels (`cells * size`, as the real head).
        size = torch.tensor(fmap.shape[-2:], dtype=cells.dtype)
        return sample_bilinear(fmap, coords) * 0.3 + (cells * size).sum(-1, keepdim=True) * 0.1


class LocalContinuous(nn.Module):
    """Arbitrary-scale model with the SRModel interface and a 1-pixel receptive field."""

    continuous = True
    scale = None
    spec = {"arch": "local-test"}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="replicate")
        self.head = _LocalHead()

    def features(self, lr):
        return self.conv(lr)

    def forward(self, lr, out_size):
        b = lr.shape[0]
        big_h, big_w = out_size
        coords = make_coords(big_h, big_w, dtype=lr.dtype).unsqueeze(0).expand(b, -1, -1)
        cells = torch.tensor([2.0 / big_h, 2.0 / big_w], dtype=lr.dtype).expand_as(coords)
        rgb = self.head.query(self.head.encode(self.features(lr)), coords, cells)
        rgb = rgb.transpose(1, 2).reshape(b, 3, big_h, big_w)
        return rgb + F.interpolate(lr, size=(big_h, big_w), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def set5_crop(shared_data) -> np.ndarray:
    """A real 8-bit RGB crop (H, W, 3) of Set5 with an odd size."""
    with Image.open(shared_data / "Set5" / "butterfly.png") as im:
        return np.asarray(im.convert("RGB"))[40:107, 30:121].copy()  # 67 x 91


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("swinir_l", variant="c2d", flavor="tiny", scale=2).eval()
    path = tmp_path_factory.mktemp("model") / "tiny_x2.pt"
    save_model(path, model)
    return path, model


def _to_tensor(rgb_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb_u8).permute(2, 0, 1).float().div(255)[None]


# ----------------------------------------------------------------------------- tiling


def test_tiled_equals_whole_through_files(tmp_path, set5_crop):
    """A model with a 1-pixel receptive field must give byte-identical files tiled and whole."""
    model = LocalDiscrete(2)
    Image.fromarray(set5_crop).save(tmp_path / "crop.png")
    assert count_tiles(67, 91, 24, 8) > 6
    whole = upscale_path(model, tmp_path / "crop.png", tmp_path / "whole.png", tile=None, progress=False)
    tiled = upscale_path(model, tmp_path / "crop.png", tmp_path / "tiled.png", tile=24, overlap=8,
                         progress=False)
    assert whole.ok and tiled.ok
    a = np.asarray(Image.open(tmp_path / "whole.png"))
    b = np.asarray(Image.open(tmp_path / "tiled.png"))
    assert a.shape == (134, 182, 3)
    assert np.array_equal(a, b)
    # and in float, before quantisation
    lr = _to_tensor(set5_crop)
    diff = (sr_forward(model, lr) - sr_forward(model, lr, tile=24, overlap=8)).abs().max()
    assert diff < 1e-5


@pytest.mark.parametrize("scale", [2.5, 1.7, 3])
def test_continuous_tiling_exact_for_local_model(set5_crop, scale):
    """Fractional scales: every output pixel is queried at the right place in its tile."""
    model = LocalContinuous()
    lr = _to_tensor(set5_crop)
    whole = sr_forward(model, lr, scale=scale)
    n = []
    tiled = sr_forward(model, lr, scale=scale, tile=30, overlap=12, on_tile=lambda: n.append(1))
    assert whole.shape == tiled.shape == (1, 3, round(67 * scale), round(91 * scale))
    assert len(n) == count_tiles(67, 91, 30, 12) > 4
    assert (whole - tiled).abs().max() < 1e-5


def test_continuous_tiled_query_matches_tiled_forward_at_integer_scale():
    """For a real continuous model at an integer scale, tiled_query is tiled_forward."""
    torch.manual_seed(0)
    model = build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous").eval()
    lr = torch.rand(1, 3, 20, 22)
    with torch.inference_mode():
        ref = tiled_forward(lambda t: model(t, out_size=(t.shape[-2] * 2, t.shape[-1] * 2)),
                            lr, 2, tile=16, overlap=8)
        got = tiled_query(model, lr, (40, 44), tile=16, overlap=8)
        one_tile = sr_forward(model, lr, scale=2, tile=32)  # tile >= image: the plain forward
        plain = model(lr, out_size=(40, 44))
    assert (ref - got).abs().max() < 1e-4
    assert torch.equal(one_tile, plain)


# ----------------------------------------------------------------------------- input kinds


def _make_inputs(root, crop: np.ndarray) -> dict:
    """One file per input kind (plus a corrupt one, a non-image, a hidden one, a subfolder)."""
    rng = np.random.default_rng(0)
    h, w = crop.shape[:2]
    (root / "sub").mkdir(parents=True)
    Image.fromarray(crop).save(root / "rgb.png")
    Image.fromarray(crop).convert("L").save(root / "sub" / "gray.png")
    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    Image.fromarray(np.dstack([crop, alpha])).save(root / "rgba.png")
    gray16 = (crop[..., 1].astype(np.uint16) * 257 + rng.integers(0, 257, (h, w))).astype(np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")
    rgb16 = (crop.astype(np.uint16) * 257 + rng.integers(0, 257, crop.shape)).astype(np.uint16)
    write_png16(root / "rgb16.png", rgb16)
    Image.fromarray(crop).quantize(64).save(root / "palette.png")
    Image.fromarray(crop).save(root / "photo.jpg", quality=95)
    good = (root / "rgb.png").read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 3])  # truncated mid-stream
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"\x89PNG broken")
    return {"alpha": alpha, "gray16": gray16, "rgb16": rgb16}


def test_folder_of_every_kind_via_cli(tmp_path, set5_crop, tiny_file, capsys):
    ckpt, model = tiny_file
    crop = set5_crop[:28, :36]
    src, out = tmp_path / "in", tmp_path / "out"
    made = _make_inputs(src, crop)
    rc = main(["upscale", "--model", str(ckpt), str(src), str(out), "--tile", "24", "--overlap", "8",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, "a corrupt input was skipped, so the exit status says so"
    assert "skipped (corrupt) 1" in err and "corrupt.png" in err and "notes.txt" in err
    assert not (out / "corrupt.png").exists() and not (out / ".hidden.png").exists()
    h, w = 56, 72

    def sr_of(x: torch.Tensor) -> torch.Tensor:  # what the model gives for (3, h, w), tiled
        return sr_forward(model, x[None], tile=24, overlap=8)[0].clamp(0, 1)

    with Image.open(out / "rgb.png") as im:
        assert im.mode == "RGB" and im.size == (w, h)
        expect = (sr_of(read_image(src / "rgb.png")[0]) * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(im).astype(int) - expect).max() <= 1
    with Image.open(out / "sub" / "gray.png") as im:  # recursion keeps the relative path
        assert im.mode == "L" and im.size == (w, h)
    with Image.open(out / "rgba.png") as im:
        assert im.mode == "RGBA" and im.size == (w, h)
        got_alpha = np.asarray(im)[..., 3].astype(int)
    a = torch.from_numpy(made["alpha"]).float().div(255)[None, None].double()
    want_alpha = (imresize(a, size=(h, w)).clamp(0, 1) * 255).round()[0, 0].numpy()
    assert np.abs(got_alpha - want_alpha).max() <= 1, "alpha is upscaled with bicubic, not the model"
    with Image.open(out / "gray16.png") as im:
        assert im.mode.startswith("I;16") and im.size == (w, h)
        g16 = np.asarray(im).astype(np.int64)
    x16 = torch.from_numpy(made["gray16"].astype(np.float32) / 65535)[None].expand(3, -1, -1)
    from c2disr.metrics import rgb_to_gray

    want16 = (rgb_to_gray(sr_of(x16)[None])[0, 0].clamp(0, 1) * 65535).round().numpy()
    assert np.abs(g16 - want16).max() <= 2, "16-bit gray is processed in float, written 16-bit"
    t, info = read_image(out / "rgb16.png")
    assert info.bits == 16 and tuple(t.shape) == (3, h, w)
    want_rgb16 = (sr_of(torch.from_numpy(made["rgb16"].astype(np.float32) / 65535).permute(2, 0, 1))
                  * 65535).round()
    assert (t * 65535 - want_rgb16).abs().max() <= 2
    with Image.open(out / "palette.png") as im:
        assert im.mode == "RGB" and im.size == (w, h)
    with Image.open(out / "photo.png") as im:
        assert im.mode == "RGB" and im.size == (w, h)


def test_png16_writer_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    for c in (1, 3, 4):
        arr = rng.integers(0, 65536, size=(13, 17, c), dtype=np.uint16)
        write_png16(tmp_path / f"a{c}.png", arr)
        with Image.open(tmp_path / f"a{c}.png") as im:
            if c == 1:
                got = np.asarray(im)
            else:
                got = _decode_16bit_colour(im, tmp_path / f"a{c}.png")
        assert np.array_equal(got.reshape(arr.shape), arr)


def test_read_input_alpha_and_palette_transparency(tmp_path, set5_crop):
    p = Image.fromarray(set5_crop[:20, :20]).quantize(16)
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    dec = read_input(tmp_path / "pt.png")
    assert dec.alpha is not None and dec.alpha.shape == (1, 20, 20)
    assert not dec.gray and dec.bits == 8
    with pytest.raises(ValueError):
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        read_input(tmp_path / "bad.png")


# ----------------------------------------------------------------------------- rules


def test_single_file_naming_and_usage_errors(tmp_path, set5_crop, tiny_file, capsys):
    ckpt, _ = tiny_file
    src = tmp_path / "one.jpg"
    Image.fromarray(set5_crop[:24, :24]).save(src)
    (tmp_path / "outdir").mkdir()
    assert main(["upscale", "--model", str(ckpt), str(src), str(tmp_path / "outdir"), "--quiet"]) == 0
    assert Image.open(tmp_path / "outdir" / "one.png").size == (48, 48)
    assert main(["upscale", "--model", str(ckpt), str(src), str(tmp_path / "named.png"), "--quiet"]) == 0
    assert (tmp_path / "named.png").is_file()
    capsys.readouterr()
    # usage errors: exit 2 with one clear line
    assert main(["upscale", "--model", str(ckpt), str(src), str(tmp_path / "x.jpg"), "--quiet"]) == 2
    assert "PNG" in capsys.readouterr().err
    assert main(["upscale", "--model", str(ckpt), "--scale", "3", str(src), str(tmp_path / "y.png")]) == 2
    assert "x2 model" in capsys.readouterr().err
    assert main(["upscale", "--model", str(tmp_path / "nope.pt"), str(src), str(tmp_path / "z.png")]) == 2
    assert main(["upscale", "--model", str(ckpt), "--tile", "16", "--overlap", "16", str(src),
                 str(tmp_path / "z.png")]) == 2
    # two inputs that would write the same output
    clash = tmp_path / "clash"
    clash.mkdir()
    Image.fromarray(set5_crop[:8, :8]).save(clash / "a.png")
    Image.fromarray(set5_crop[:8, :8]).save(clash / "a.jpg")
    capsys.readouterr()
    assert main(["upscale", "--model", str(ckpt), str(clash), str(tmp_path / "clash_out")]) == 2
    assert "same output" in capsys.readouterr().err


def test_continuous_model_needs_scale_and_output_inside_input_is_not_reread(tmp_path, set5_crop):
    model = LocalContinuous()
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(set5_crop[:20, :30]).save(src / "a.png")
    from srplatform.errors import UserError

    with pytest.raises(UserError, match="--scale"):
        upscale_path(model, src, src / "out", progress=False)
    for _ in range(2):  # the second run must not pick up in/out/a.png as an input
        rep = upscale_path(model, src, src / "out", scale=1.5, progress=False)
        assert [w[0] for w in rep.written] == [str(src / "a.png")]
    assert Image.open(src / "out" / "a.png").size == (45, 30)
    rep = upscale_path(model, src, src / "out", scale=1.5, skip_existing=True, progress=False)
    assert rep.existing == [str(src / "out" / "a.png")] and not rep.written
