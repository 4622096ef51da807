"""`pack`: WebDataset shards + manifest from folders, globs and S3 prefixes; bad inputs are
skipped and recorded; idempotent re-runs; resume after an interruption; the `c2d data` CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srplatform import storage
from srplatform.data.images import decode
from srplatform.data.pack import (
    MANIFEST,
    STATE,
    assign_keys,
    pack,
    read_manifest,
    sanitize_key,
)
from srplatform.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    root = Path(os.environ.get("C2D_SHARED", REPO.parent / "shared"))
    return root / "data"


def t91_or_skip() -> Path:
    t91 = shared_data() / "T91"
    if not (t91 / "t1.png").is_file():
        pytest.skip(f"T91 images not found at {t91} (set C2D_SHARED to the shared folder)")
    return t91


# --------------------------------------------------------------------------------------
# Generated images in every mode the decoder must handle (also used by test_pipeline)
# --------------------------------------------------------------------------------------


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit colour PNG (colour type 2 or 6) written by hand: Pillow cannot save one."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6 if c == 4 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def odd_images(size: int = 72, seed: int = 0) -> dict[str, bytes]:
    """name -> file bytes: good images in odd modes/formats (all at least `size` px)."""
    rng = np.random.default_rng(seed)
    h, w = size, size + 8
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])
    pal = Image.fromarray(rgb).quantize(colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    return {
        "rgb.png": encode(Image.fromarray(rgb), "PNG"),
        "gray.png": encode(Image.fromarray(gray), "PNG"),
        "rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "gray16.png": encode(Image.fromarray(
            rng.integers(0, 65536, (h, w), dtype=np.uint16)), "PNG"),
        "rgb16.png": png16(rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)),
        "rgba16.png": png16(rng.integers(0, 65536, (h, w, 4), dtype=np.uint16)),
        "palette.png": encode(pal, "PNG"),
        "palette_t.png": encode(pal_t, "PNG", transparency=3),
        "photo.jpg": encode(Image.fromarray(rgb), "JPEG", quality=90),
        "cmyk.jpg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
        "lossless.webp": encode(Image.fromarray(rgb), "WEBP", lossless=True),
        "paletted.bmp": encode(pal, "BMP"),
        "plain.bmp": encode(Image.fromarray(rgb), "BMP"),
    }


def bad_files(size: int = 72) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected words in the skip reason)."""
    good = encode(Image.fromarray(np.zeros((size, size, 3), np.uint8) + 128), "PNG")
    return {
        "corrupt.png": (os.urandom(300), "not an image"),
        "truncated.png": (good[: len(good) // 2], "truncated"),
        "text_as.jpg": (b"this is not a jpeg at all\n" * 20, "not an image"),
        "empty.png": (b"", "empty"),
        "notes.txt": (b"hello", "not an image file name"),
        "tiny.png": (encode(Image.fromarray(np.zeros((20, 30, 3), np.uint8)), "PNG"),
                     "too small"),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def read_shards(dest: str, settings=None) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a pack, in shard order, read back with webdataset's own tar iterator."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    manifest = read_manifest(dest, settings)
    out = []
    for sh in manifest["shards"]:
        data = storage.read_bytes(storage.join(dest, sh["name"]), settings)
        assert hashlib.sha256(data).hexdigest() == sh["sha256"]
        assert len(data) == sh["bytes"]
        stream = [{"url": sh["name"], "stream": io.BytesIO(data)}]
        for sample in group_by_keys(tar_file_expander(stream, eof_value=None)):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            out.append((sample["__key__"], members))
        names = [m.name for m in tarfile.open(fileobj=io.BytesIO(data))]
        assert names == sorted(names), "members must be sorted"
    return out


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


def test_keys_have_no_dots_and_are_unique_and_deterministic():
    rels = ["a.b.png", "a_b.png", "c.png", "c.jpg", "sub dir/x.y.PNG", "sub_dir/x_y.png",
            "ünï cödé.png", "d.png"]
    keys = assign_keys(rels)
    assert len(set(keys.values())) == len(rels)
    assert all("." not in k and "/" not in k and " " not in k for k in keys.values())
    assert assign_keys(list(reversed(rels))) == keys
    assert keys["d.png"] == "d"
    assert sanitize_key("x/y/z.tar.png") == "x_y_z_tar"
    assert sanitize_key("***.png") == "image"


# --------------------------------------------------------------------------------------
# Packing local folders
# --------------------------------------------------------------------------------------


def test_pack_odd_modes_and_bad_files(tmp_path):
    src = tmp_path / "src"
    good = odd_images()
    bad = bad_files()
    write_files(src, good)
    write_files(src, {k: v[0] for k, v in bad.items()})
    write_files(src, {"nested/dir name/img.v2.png": good["rgb.png"]})
    dest = tmp_path / "out"
    m = pack(str(src), str(dest), min_size=64, shard_size_mb=0.05, progress=False)

    assert m["run"]["status"] == "packed"
    assert m["samples"] == len(good) + 1 and m["inputs"] == len(good) + len(bad) + 1
    assert len(m["shards"]) >= 2  # size cap of 50 kB forces several shards
    skipped = {s["source"]: s["reason"] for s in m["skipped"]}
    assert m["skipped_count"] == len(bad) == len(skipped)
    for name, (_, words) in bad.items():
        assert words in skipped[name], (name, skipped[name])
    im = m["images"]
    assert im["width"] == {"min": 80, "max": 80, "mean": 80.0}
    assert {"RGB", "L", "RGBA", "I;16", "P", "RGB;16", "RGBA;16", "CMYK"} <= set(im["modes"])
    assert im["transcoded_to_png"] == 3  # webp + 2 bmp
    assert json.loads(storage.read_bytes(dest / MANIFEST))["samples"] == m["samples"]
    assert not storage.exists(dest / STATE)

    samples = read_shards(str(dest))
    assert len(samples) == m["samples"]
    keys = [k for k, _ in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert "nested_dir_name_img_v2" in keys
    by_source = {}
    for key, members in samples:
        meta = json.loads(members["json"])
        image = [v for k, v in members.items() if k in ("png", "jpg")]
        assert len(image) == 1 and set(members) - {"json"} <= {"png", "jpg"}
        by_source[meta["source"]] = (meta, image[0])
    for name, data in good.items():
        meta, stored = by_source[name]
        if name.endswith((".png", ".jpg")):
            assert stored == data  # PNG/JPEG byte for byte
        else:
            assert meta["transcoded"] and stored[:4] == b"\x89PNG"
        # pixels read back equal the source's under the shared decode rules
        np.testing.assert_array_equal(decode(stored)[0], decode(data)[0])


def test_decode_rules_match_c2disr_evaluate(tmp_path):
    evaluate = pytest.importorskip("c2disr.evaluate", reason="c2disr.evaluate not available")
    for name, data in odd_images(size=16).items():
        path = tmp_path / name
        path.write_bytes(data)
        ours = decode(data)[0]
        scale = 65535.0 if ours.dtype == np.uint16 else 255.0
        theirs = evaluate.load_image(path).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours.astype(np.float32) / np.float32(scale), theirs,
                                   rtol=0, atol=1e-6, err_msg=name)


def test_pack_is_idempotent_and_reproducible(tmp_path):
    src = tmp_path / "src"
    write_files(src, {k: v for k, v in list(odd_images(seed=1).items())[:6]})
    a = pack(str(src), f"file://{tmp_path}/a", min_size=64, shard_size_mb=0.05, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    again = pack(str(src), f"file://{tmp_path}/a", min_size=64, shard_size_mb=0.05,
                 progress=False)
    assert again["run"]["status"] == "already complete"
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == mtimes
    b = pack(str(src), str(tmp_path / "b"), min_size=64, shard_size_mb=0.05, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    # A complete pack whose shard went missing is packed again, to the same bytes.
    (tmp_path / "b" / b["shards"][-1]["name"]).unlink()
    b2 = pack(str(src), str(tmp_path / "b"), min_size=64, shard_size_mb=0.05, progress=False)
    assert b2["run"]["status"] == "packed"
    assert [s["sha256"] for s in b2["shards"]] == [s["sha256"] for s in a["shards"]]

    # Different inputs at the same DEST: refused unless --overwrite.
    write_files(src, {"extra.png": odd_images(seed=2)["rgb.png"]})
    with pytest.raises(UserError, match="--overwrite"):
        pack(str(src), str(tmp_path / "a"), min_size=64, shard_size_mb=0.05, progress=False)
    c = pack(str(src), str(tmp_path / "a"), min_size=64, shard_size_mb=0.05, progress=False,
             overwrite=True)
    assert c["samples"] == a["samples"] + 1
    on_disk = sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar"))
    assert on_disk == [s["name"] for s in c["shards"]]


def test_interrupted_pack_resumes_without_duplicates(tmp_path, monkeypatch):
    src = tmp_path / "src"
    imgs = odd_images(seed=3)
    write_files(src, imgs)
    write_files(src, {"zz_corrupt.png": b"nope" * 50})
    clean = pack(str(src), str(tmp_path / "clean"), min_size=64, min_shards=6, progress=False)
    assert len(clean["shards"]) >= 4

    real_upload = storage.upload_file
    calls = {"n": 0}

    def flaky_upload(local, uri, settings=None):
        if str(uri).endswith(".tar"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("simulated interruption")
        return real_upload(local, uri, settings)

    monkeypatch.setattr(storage, "upload_file", flaky_upload)
    dest = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        pack(str(src), str(dest), min_size=64, min_shards=6, progress=False)
    assert not (dest / MANIFEST).exists()
    state = json.loads((dest / STATE).read_text())
    assert [s["name"] for s in state["shards"]] == ["shard-000000.tar", "shard-000001.tar"]

    calls["n"] = -100  # no more failures
    m = pack(str(src), str(dest), min_size=64, min_shards=6, progress=False)
    assert m["run"] == {"status": "resumed", "shards_reused": 2, "seconds": m["run"]["seconds"]}
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert m["samples"] == clean["samples"] == len(imgs)
    assert [s["source"] for s in m["skipped"]] == ["zz_corrupt.png"]
    keys = [k for k, _ in read_shards(str(dest))]
    assert len(keys) == len(set(keys)) == len(imgs)
    assert not (dest / STATE).exists()


def test_pack_t91_glob(tmp_path):
    t91 = t91_or_skip()
    m = pack(str(t91 / "t1*.png"), str(tmp_path / "t91"), min_size=96, progress=False)
    names = sorted(p.name for p in t91.glob("t1*.png"))
    assert m["inputs"] == len(names) == 11
    packed = {json.loads(mem["json"])["source"] for _, mem in read_shards(str(tmp_path / "t91"))}
    small = {s["source"] for s in m["skipped"]}
    assert packed | small == set(names) and not packed & small
    assert all("too small" in s["reason"] for s in m["skipped"])
    for name in packed:
        with Image.open(t91 / name) as im:
            assert min(im.size) >= 96
    assert m["images"]["modes"] == {"RGB": len(packed)}


def test_pack_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        pack(str(tmp_path / "missing"), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files"):
        pack(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    with pytest.raises(UserError, match="matched no files"):
        pack(str(tmp_path / "*.png"), str(tmp_path / "out"), progress=False)
    with pytest.raises(UserError, match="unknown URI scheme 'gs'"):
        pack(str(tmp_path), "gs://bucket/x", progress=False)
    write_files(tmp_path / "bad", {k: v[0] for k, v in bad_files().items()})
    with pytest.raises(UserError, match="no usable images") as e:
        pack(str(tmp_path / "bad"), str(tmp_path / "out"), min_size=64, progress=False)
    assert "corrupt.png" in str(e.value)
    assert not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(UserError, match="shard-size"):
        pack(str(tmp_path / "bad"), str(tmp_path / "out"), shard_size_mb=0, progress=False)


def test_cli_pack_info_preview(tmp_path, capsys):
    from srplatform.cli import main

    src = tmp_path / "src"
    write_files(src, odd_images(size=64, seed=4))
    write_files(src, {"broken.png": b"\x89PNG broken"})
    dest = f"file://{tmp_path}/cli"
    assert main(["data", "pack", str(src), dest, "--min-size", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "13 samples" in out and "broken.png" in out
    assert main(["data", "pack", str(src), dest, "--min-size", "64", "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["data", "info", dest, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "0 bad" in out
    # Tamper with a shard: --verify must notice.
    shard = tmp_path / "cli" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024] + b"\0" * 1024 + b"x")
    assert main(["data", "info", dest, "--verify"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    preview = tmp_path / "preview"
    assert main(["data", "preview", dest, "--out", str(preview), "--count", "3",
                 "--patch", "16", "--scale", "4"]) == 0
    lr = sorted(preview.glob("*_lr.png"))
    hr = sorted(preview.glob("*_hr.png"))
    assert len(lr) == len(hr) == 3
    assert Image.open(lr[0]).size == (16, 16) and Image.open(hr[0]).size == (64, 64)
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "info", str(src)]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert main(["data", "info", "ftp://host/x"]) == 2
    assert "unknown URI scheme" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_pack_to_and_from_s3(s3_server, tmp_path):
    st = s3_server.settings()
    run = uuid.uuid4().hex[:8]
    src = tmp_path / "src"
    imgs = odd_images(size=64, seed=5)
    write_files(src, imgs)
    write_files(src, {"bad.png": b"garbage" * 10})
    dest = f"s3://{s3_server.bucket}/test-pack-{run}/shards"
    m = pack(str(src), dest, min_size=64, shard_size_mb=0.05, settings=st, progress=False)
    assert m["samples"] == len(imgs) and m["skipped_count"] == 1
    samples = read_shards(dest, st)
    assert len(samples) == len(imgs)
    again = pack(str(src), dest, min_size=64, shard_size_mb=0.05, settings=st, progress=False)
    assert again["run"]["status"] == "already complete"
    local = pack(str(src), str(tmp_path / "local"), min_size=64, shard_size_mb=0.05,
                 progress=False)
    assert [s["sha256"] for s in local["shards"]] == [s["sha256"] for s in m["shards"]]

    # An S3 prefix as the source (with a glob), packed to S3.
    prefix = f"s3://{s3_server.bucket}/test-pack-{run}/images"
    for name, data in imgs.items():
        storage.write_bytes(storage.join(prefix, "sub", name), data, st)
    m2 = pack(prefix + "/sub/*.png", f"s3://{s3_server.bucket}/test-pack-{run}/from-s3",
              min_size=64, settings=st, progress=False)
    assert m2["samples"] == sum(n.endswith(".png") for n in imgs)
    m3 = pack(prefix, f"s3://{s3_server.bucket}/test-pack-{run}/from-s3-all", min_size=64,
              settings=st, progress=False)
    assert m3["samples"] == len(imgs)


@pytest.mark.integration
def test_pack_s3_errors(s3_server, tmp_path):
    st = s3_server.settings()
    write_files(tmp_path / "src", {"a.png": odd_images(size=64)["rgb.png"]})
    with pytest.raises(UserError, match="does not exist"):
        pack(str(tmp_path / "src"), "s3://missing-bucket-c2d/x", settings=st, progress=False)
    ak, sk = s3_server.bad_credentials()
    bad = dict(st, access_key=ak, secret_key=sk)
    with pytest.raises(UserError, match="rejected the credentials") as e:
        pack(str(tmp_path / "src"), f"s3://{s3_server.bucket}/x", settings=bad, progress=False)
    assert sk not in str(e.value)
    with pytest.raises(UserError, match="rejected the credentials"):
        pack(f"s3://{s3_server.bucket}/x", str(tmp_path / "o"), settings=bad, progress=False)
    with pytest.raises(UserError, match="empty or missing prefix"):
        pack(f"s3://{s3_server.bucket}/nothing-here-{uuid.uuid4().hex[:6]}",
             str(tmp_path / "o"), settings=st, progress=False)
    name = f"c2d-created-{uuid.uuid4().hex[:8]}"
    m = pack(str(tmp_path / "src"), f"s3://{name}/p", min_size=64, settings=st,
             progress=False, create_bucket=True)
    assert m["samples"] == 1
