"""Evaluation: image loading, LR pairs, evaluate_folder, the published bicubic baselines, model
files, and `c2d eval` end to end."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2disr.evaluate import (
    evaluate_folder,
    list_images,
    load_image,
    load_model,
    make_pair,
    read_image,
    save_model,
)
from c2disr.metrics import psnr, quantize, ssim
from c2disr.ops.resize import imresize
from srplatform.cli import main as cli_main


# ----------------------------------------------------------------------------- helpers
def _rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _write_png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG (gray, RGB or RGBA) whose rows cycle through all five PNG filter types, so
    the loader's unfiltering is exercised (Pillow cannot write 16-bit colour PNGs)."""
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    bpp = 2 * c
    rows = arr.reshape(h, w * c).astype(">u2").view(np.uint8).reshape(h, w * bpp).astype(np.int64)
    out = bytearray()
    prev = np.zeros(w * bpp, dtype=np.int64)
    for y in range(h):
        r = rows[y]
        a = np.concatenate([np.zeros(bpp, np.int64), r[:-bpp]])
        b = prev
        cc = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        ftype = y % 5
        if ftype == 0:
            f = r
        elif ftype == 1:
            f = r - a
        elif ftype == 2:
            f = r - b
        elif ftype == 3:
            f = r - (a + b) // 2
        else:
            p = a + b - cc
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - cc)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, cc))
            f = r - pred
        out.append(ftype)
        out += (f % 256).astype(np.uint8).tobytes()
        prev = r

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    color_type = {1: 0, 3: 2, 4: 6}[c]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b""))


def _folder(tmp_path: Path, sizes=((40, 36), (33, 45), (24, 24)), gray_size=None) -> Path:
    d = tmp_path / "bench"
    d.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_rand_u8((h, w, 3), seed=i)).save(d / f"img{i}.png")
    if gray_size:
        Image.fromarray(_rand_u8(gray_size, seed=99)).save(d / "gray.png")
    (d / "README.txt").write_text("not an image")
    return d


# ----------------------------------------------------------------------------- loading
def test_load_rgb_png_exact(tmp_path):
    arr = _rand_u8((7, 9, 3))
    Image.fromarray(arr).save(tmp_path / "a.png")
    x, info = read_image(tmp_path / "a.png")
    assert x.shape == (3, 7, 9) and x.dtype == torch.float32
    assert not info.gray and info.bits == 8
    np.testing.assert_array_equal((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), arr)


def test_load_gray_replicated(tmp_path):
    arr = _rand_u8((6, 5))
    Image.fromarray(arr).save(tmp_path / "g.png")
    x, info = read_image(tmp_path / "g.png")
    assert info.gray and x.shape == (3, 6, 5)
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), arr / 255.0, atol=1e-7)


def test_load_rgba_drops_alpha(tmp_path):
    arr = _rand_u8((5, 4, 4))
    arr[..., 3] = 0  # fully transparent: the colours must still come through unchanged
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    x, info = read_image(tmp_path / "a.png")
    assert info.alpha_dropped and x.shape == (3, 5, 4)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), arr[..., :3] / 255.0, atol=1e-7)


def test_load_gray_alpha(tmp_path):
    arr = _rand_u8((5, 4, 2))
    Image.fromarray(arr, "LA").save(tmp_path / "la.png")
    x, info = read_image(tmp_path / "la.png")
    assert info.gray and info.alpha_dropped
    np.testing.assert_allclose(x[1].numpy(), arr[..., 0] / 255.0, atol=1e-7)


def test_load_16bit_gray(tmp_path):
    arr = np.random.default_rng(0).integers(0, 65536, size=(6, 7), dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")  # Pillow writes I;16 as a 16-bit PNG
    x, info = read_image(tmp_path / "g16.png")
    assert info.bits == 16 and info.gray
    np.testing.assert_allclose(x[2].numpy(), arr / 65535.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("channels", [3, 4])
def test_load_16bit_colour_png_keeps_all_bits(tmp_path, channels):
    arr = np.random.default_rng(1).integers(0, 65536, size=(11, 13, channels), dtype=np.uint16)
    _write_png16(tmp_path / "c16.png", arr)
    x, info = read_image(tmp_path / "c16.png")
    assert info.bits == 16 and not info.gray and info.alpha_dropped == (channels == 4)
    # Exact to the 16-bit level: Pillow alone would keep only the high byte (error up to 255/65535).
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), arr[..., :3] / 65535.0, rtol=0, atol=1e-7)


def test_load_palette_with_and_without_transparency(tmp_path):
    idx = _rand_u8((4, 6)) % 4
    im = Image.fromarray(idx, "P")
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    im.putpalette(pal + [0] * (768 - len(pal)))
    im.save(tmp_path / "p.png")
    im.save(tmp_path / "pt.png", transparency=0)
    colours = np.array(pal).reshape(4, 3) / 255.0
    for name, dropped in (("p.png", False), ("pt.png", True)):
        x, info = read_image(tmp_path / name)
        assert info.mode == "P" and info.alpha_dropped == dropped and not info.gray
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), colours[idx], atol=1e-7)


def test_load_bad_files_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    Image.fromarray(_rand_u8((64, 64, 3))).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="float"):
        load_image(tmp_path / "f.tif")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- pairs
def test_make_pair_crops_and_quantizes():
    hr = torch.rand(3, 13, 10)
    lr, hr_c = make_pair(hr, 3)
    assert hr_c.shape == (3, 12, 9) and lr.shape == (3, 4, 3)
    assert torch.equal(hr_c, hr[:, :12, :9])
    torch.testing.assert_close(lr, quantize(imresize(hr_c.double(), 1 / 3)).float())
    lr_f, _ = make_pair(hr, 3, quantize_lr=False)
    assert not torch.equal(lr_f, quantize(lr_f))
    torch.testing.assert_close(lr_f, imresize(hr_c.double(), 1 / 3).float())
    with pytest.raises(ValueError, match="integer"):
        make_pair(hr, 2.5)


# ----------------------------------------------------------------------------- evaluate_folder
def test_evaluate_folder_oracle_is_perfect(tmp_path):
    folder = _folder(tmp_path, gray_size=(30, 27))
    hrs = [make_pair(load_image(p)[None], 3)[1] for p in list_images(folder)]
    calls = iter(hrs)
    res = evaluate_folder(lambda lr: next(calls), folder, 3)
    assert res["count"] == 4 and res["ignored_files"] == ["README.txt"]
    assert [r["name"] for r in res["images"]] == ["gray.png", "img0.png", "img1.png", "img2.png"]
    assert all(math.isinf(r["psnr"]) and r["ssim"] == pytest.approx(1.0) for r in res["images"])
    assert res["images"][1]["height"] == 39 and res["images"][1]["width"] == 36  # cropped to x3


def test_evaluate_folder_values_match_metrics(tmp_path):
    folder = _folder(tmp_path)
    seen = []
    res = evaluate_folder(lambda lr: imresize(lr, 2), folder, 2,
                          progress=lambda i, n, row: seen.append((i, n, row["name"])))
    assert seen == [(0, 3, "img0.png"), (1, 3, "img1.png"), (2, 3, "img2.png")]
    for row, path in zip(res["images"], list_images(folder)):
        lr, hr = make_pair(load_image(path)[None], 2)
        sr = quantize(imresize(lr, 2))
        assert row["psnr"] == pytest.approx(psnr(sr, hr, 2).item(), abs=1e-9)
        assert row["ssim"] == pytest.approx(ssim(sr, hr, 2).item(), abs=1e-9)
    assert res["psnr"] == pytest.approx(np.mean([r["psnr"] for r in res["images"]]))


def test_gray_originals_are_measured_on_gray_values(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    Image.fromarray(_rand_u8((40, 44), seed=3)).save(d / "g.png")
    res = evaluate_folder(lambda lr: imresize(lr, 2), d, 2)
    lr, hr = make_pair(load_image(d / "g.png")[None], 2)
    sr = quantize(imresize(lr, 2))
    on_y = psnr(sr, hr, 2).item()
    on_gray = psnr(sr[:, :1], hr[:, :1], 2, y_channel=False).item()
    assert res["psnr"] == pytest.approx(on_gray, abs=1e-9)
    # Y compresses a gray image's range to 219/255 of it: exactly 20 log10(255/219) dB higher.
    assert on_y - on_gray == pytest.approx(20 * math.log10(255 / 219), abs=1e-6)


def test_evaluate_folder_rejects_bad_outputs_and_folders(tmp_path):
    folder = _folder(tmp_path, sizes=((20, 20),))
    with pytest.raises(ValueError, match=r"img0.png.*shape"):
        evaluate_folder(lambda lr: imresize(lr, 3), folder, 2)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_folder(lambda lr: imresize(lr, 2) * float("nan"), folder, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        evaluate_folder(lambda lr: lr, empty, 2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate_folder(lambda lr: lr, tmp_path / "nowhere", 2)


# ----------------------------------------------------------------------------- published numbers
# Bicubic baselines as printed in SR papers (e.g. the tables of VDSR, EDSR, SwinIR).
PUBLISHED = {("Set5", 2): 33.66, ("Set5", 3): 30.39, ("Set5", 4): 28.42,
             ("Set14", 2): 30.24, ("Set14", 3): 27.55, ("Set14", 4): 26.00}


@pytest.fixture(scope="module")
def bicubic_results(shared_data):
    return {
        (name, s): evaluate_folder(lambda lr, s=s: imresize(lr, s), shared_data / name, s)
        for name, s in PUBLISHED
    }


@pytest.mark.parametrize("key", list(PUBLISHED), ids=[f"{n}x{s}" for n, s in PUBLISHED])
def test_reproduces_published_bicubic_psnr(bicubic_results, key):
    got = bicubic_results[key]["psnr"]
    assert got == pytest.approx(PUBLISHED[key], abs=0.03), f"{key}: {got:.3f} dB"


def test_reproduces_published_bicubic_ssim(bicubic_results):
    assert bicubic_results[("Set5", 4)]["ssim"] == pytest.approx(0.8104, abs=0.002)
    assert bicubic_results[("Set14", 2)]["count"] == 14


# ----------------------------------------------------------------------------- model files
def _tiny_model(scale=2, head="discrete"):
    models = pytest.importorskip("c2disr.models")
    torch.manual_seed(0)
    return models.build_model("swinir_l", flavor="tiny", scale=scale, head=head).eval()


def test_save_load_model_round_trip(tmp_path):
    model = _tiny_model()
    path = save_model(tmp_path / "m" / "model.pt", model)
    back = load_model(path)
    assert back.spec == model.spec and not back.training
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_load_model_errors_name_the_file(tmp_path):
    torch.save({"params": {"w": torch.zeros(1)}}, tmp_path / "official.pth")
    with pytest.raises(ValueError, match=r"official.pth.*load_published"):
        load_model(tmp_path / "official.pth")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    model = _tiny_model()
    torch.save({"spec": model.spec, "state_dict": {"nope": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt.*do not match"):
        load_model(tmp_path / "bad.pt")
    torch.save({"spec": {"arch": "no_such_arch"}, "state_dict": {}}, tmp_path / "arch.pt")
    with pytest.raises(ValueError, match="arch.pt"):
        load_model(tmp_path / "arch.pt")


# ----------------------------------------------------------------------------- c2d eval
def test_cli_bicubic_table_and_json(tmp_path, capsys):
    folder = _folder(tmp_path)
    out = tmp_path / "r.json"
    rc = cli_main(["eval", "--model", "bicubic", "--data", str(folder), "--scales", "2,3",
                   "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    direct = evaluate_folder(lambda lr: imresize(lr, 3), folder, 3)
    assert f"{direct['psnr']:.2f} / {direct['ssim']:.4f}" in cap.out
    assert "[bench x2] 1/3 img0.png" in cap.err
    report = json.loads(out.read_text())
    assert report["scales"] == [2, 3] and report["sets"] == ["bench"]
    r3 = [r for r in report["results"] if r["scale"] == 3][0]
    assert r3["psnr"] == pytest.approx(direct["psnr"]) and len(r3["images"]) == 3


def test_cli_model_file_with_tiles(tmp_path, capsys):
    folder = _folder(tmp_path, sizes=((36, 40), (28, 30)))
    model = _tiny_model(scale=2)
    path = save_model(tmp_path / "model.pt", model)
    out = tmp_path / "r.json"
    rc = cli_main(["eval", "--model", str(path), "--data", str(folder), "--tile", "12",
                   "--tile-overlap", "4", "--json", str(out), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    report = json.loads(out.read_text())
    assert report["scales"] == [2]  # a discrete model defaults to its own scale
    assert report["model_info"]["spec"]["arch"] == "swinir_l" and report["model_info"]["tile"] == 12
    assert math.isfinite(report["results"][0]["psnr"])
    rc = cli_main(["eval", "--model", str(path), "--data", str(folder), "--scales", "4"])
    assert rc == 2 and "x2 model" in capsys.readouterr().err


def test_cli_user_errors(tmp_path, capsys, monkeypatch):
    folder = _folder(tmp_path)
    cases = [
        (["--model", "nearest", "--data", str(folder)], "unknown model"),
        (["--model", str(tmp_path / "nope.pt"), "--data", str(folder)], "no such model file"),
        (["--model", "bicubic", "--data", str(tmp_path / "absent")], "no such folder"),
        (["--model", "bicubic", "--data", str(folder), "--scales", "2,x"], "not an integer"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((["--model", "bicubic", "--data", str(empty)], "no image files"))
    # No tracking server anywhere: a clear error, not an attempt to reach one.
    monkeypatch.setenv("C2D_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cases.append((["--model", "models:/c2disr-x@champion", "--data", str(folder)], "--tracking-uri"))
    for argv, message in cases:
        rc = cli_main(["eval", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (argv, err)


def test_cli_unreachable_tracking_server_is_a_warning(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = _folder(tmp_path, sizes=((24, 24),))
    rc = cli_main(["eval", "--model", "bicubic", "--data", str(folder), "--scales", "2",
                   "--tracking-uri", f"http://127.0.0.1:{port}", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0 and "bench" in cap.out
    assert "warning" in cap.err and f"127.0.0.1:{port}" in cap.err


def test_cli_data_names_resolve_under_shared(shared_data, monkeypatch, capsys):
    monkeypatch.setenv("C2D_SHARED", str(shared_data.parent))
    from srplatform.evaluation import resolve_data

    assert resolve_data("set5,Set14") == [("Set5", shared_data / "Set5"),
                                           ("Set14", shared_data / "Set14")]


@pytest.mark.integration
def test_cli_registered_model_and_mlflow_logging(tmp_path, mlflow_uri, capsys):
    """models:/NAME@alias through a real MLflow server, and the eval run logged back to it."""
    import mlflow
    from mlflow import MlflowClient

    from srplatform.mlmodel import log_sr_model

    model = _tiny_model(scale=2)
    client = MlflowClient(mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("test-eval-registry")
    with mlflow.start_run():
        info = log_sr_model(model)
    name = f"test-eval-{tmp_path.name}"[:60]
    version = mlflow.register_model(info.model_uri, name).version
    client.set_registered_model_alias(name, "champion", version)

    folder = _folder(tmp_path, sizes=((24, 26),))
    rc = cli_main(["eval", "--model", f"models:/{name}@champion", "--data", str(folder),
                   "--tracking-uri", mlflow_uri, "--experiment", "test-eval", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    direct = evaluate_folder(model, folder, 2)
    exp = client.get_experiment_by_name("test-eval")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    logged = runs[0].data.metrics
    assert logged["bench_x2_psnr"] == pytest.approx(direct["psnr"], abs=1e-6)
    assert logged["bench_x2_ssim"] == pytest.approx(direct["ssim"], abs=1e-9)
    assert runs[0].data.params["model"] == f"models:/{name}@champion"
