"""The pair pipeline: `make_pairs` (unit, no Ray) and the Ray Data dataset over real shards on
file:// and s3:// (integration: starts a local Ray; S3 through the moto server fixture)."""

from __future__ import annotations

import tarfile
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from srplatform.data.pipeline import (
    block_seed,
    hr_patch_max,
    make_pairs,
    normalise_sample,
    train_dataset,
    val_pairs,
)
from srplatform.data.images import to_float
from srplatform.errors import UserError
from tests.test_pack import bad_files, encode, odd_images, shared_data, t91_or_skip

PATCH = 16


def batch_of(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    keys = [k.replace(".", "_") for k in files]
    return {
        "key": np.array(keys, dtype=object),
        "url": np.array(["mem"] * len(keys), dtype=object),
        "image": np.array(list(files.values()), dtype=object),
    }


# --------------------------------------------------------------------------------------
# make_pairs
# --------------------------------------------------------------------------------------


def check_pairs(out: dict[str, np.ndarray], n: int, patch: int, big: int) -> None:
    from c2disr.ops.resize import imresize

    assert out["lr"].shape == (n, 3, patch, patch) and out["lr"].dtype == np.float32
    assert out["hr"].shape == (n, 3, big, big) and out["hr"].dtype == np.float32
    assert out["hr_size"].dtype == np.int32 and out["scale"].dtype == np.float32
    assert out["skipped"].shape == (n,) and out["epoch"].shape == (n,)
    assert out["lr"].min() >= 0 and out["lr"].max() <= 1
    assert out["hr"].min() >= 0 and out["hr"].max() <= 1
    side = int(out["hr_size"][0])
    assert (out["hr_size"] == side).all() and patch <= side <= big
    np.testing.assert_allclose(out["scale"], side / patch)
    assert not out["hr"][:, :, side:, :].any() and not out["hr"][:, :, :, side:].any()
    # LR is the MATLAB-bicubic downscale of the valid HR patch, clamped, on 8-bit levels.
    hr = torch.from_numpy(out["hr"][:, :, :side, :side])
    ref = (imresize(hr, size=(patch, patch)).clamp(0, 1) * 255).round() / 255
    np.testing.assert_allclose(out["lr"], ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["lr"] * 255, np.round(out["lr"] * 255), atol=1e-4)


def test_make_pairs_continuous_and_discrete_odd_modes():
    files = odd_images(size=72)
    batch = batch_of(files)
    big = hr_patch_max(PATCH, 4.0)
    sides = set()
    for epoch in range(6):
        out = make_pairs(batch, patch=PATCH, scale_min=1.0, scale_max=4.0, epoch=epoch)
        check_pairs(out, len(files), PATCH, big)
        assert out["skipped"].sum() == 0 and (out["epoch"] == epoch).all()
        sides.add(int(out["hr_size"][0]))
    assert len(sides) >= 4  # the scale is drawn anew per batch/epoch
    for scale in (2, 3, 4):
        out = make_pairs(batch, patch=PATCH, fixed_scale=scale)
        check_pairs(out, len(files), PATCH, PATCH * scale)
        assert (out["hr_size"] == PATCH * scale).all() and (out["scale"] == scale).all()


def test_make_pairs_is_deterministic_and_streams_differ():
    batch = batch_of(odd_images(size=72))
    a = make_pairs(batch, patch=PATCH, seed=7, epoch=1)
    b = make_pairs(batch, patch=PATCH, seed=7, epoch=1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for other in (dict(seed=8, epoch=1), dict(seed=7, epoch=2)):
        c = make_pairs(batch, patch=PATCH, **other)
        assert not np.array_equal(a["lr"], c["lr"])
    # Another block (another first key) gets another stream.
    rolled = {k: np.roll(v, 1) for k, v in batch.items()}
    d = make_pairs(rolled, patch=PATCH, seed=7, epoch=1)
    assert not np.array_equal(np.roll(a["hr"], 1, axis=0), d["hr"])
    seeds = {tuple(block_seed(0, 0, f"key{i}").generate_state(2)) for i in range(200)}
    assert len(seeds) == 200


def test_make_pairs_flips_and_rotations_cover_all_eight():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    data = encode(Image.fromarray(img), "PNG")
    base = to_float(img)  # the pipeline's own uint8 -> float conversion, so equality is exact
    variants = []
    for k in range(4):
        r = np.rot90(base, k)
        variants += [r, r[:, ::-1]]
    seen = set()
    for epoch in range(100):
        out = make_pairs(batch_of({"one": data}), patch=PATCH, fixed_scale=3, epoch=epoch)
        hr = out["hr"][0].transpose(1, 2, 0)
        match = [i for i, v in enumerate(variants) if np.array_equal(v, hr)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(8))


def test_make_pairs_counts_bad_samples():
    good = odd_images(size=72)
    bad = {name: data for name, (data, _) in bad_files().items() if name != "notes.txt"}
    mixed = dict(list(good.items())[:4])
    mixed.update(bad)
    mixed["no_image_member"] = b""
    out = make_pairs(batch_of(mixed), patch=PATCH, fixed_scale=4)  # 64 px > tiny 20x30
    assert len(out["lr"]) == 4
    assert out["skipped"][0] == len(bad) + 1 and out["skipped"][1:].sum() == 0
    # Too small for this batch's scale but fine for a smaller one.
    small = {"s": encode(Image.fromarray(
        np.zeros((40, 40, 3), np.uint8)), "PNG")}
    assert len(make_pairs(batch_of(small), patch=PATCH, fixed_scale=2)["lr"]) == 1
    none = make_pairs(batch_of(small), patch=PATCH, fixed_scale=3)
    assert none["lr"].shape == (0, 3, PATCH, PATCH) and none["hr"].shape == (0, 3, 48, 48)


def test_pair_task_extra_crops_are_fresh_and_count_bad_samples_once():
    """`crops=k` gives k independent crops of every image per epoch; crop 0 is what crops=1
    gives, so turning it on for a long run changes nothing of a short one."""
    from srplatform.data.pipeline import _PairTask

    good = odd_images(size=72)
    bad = {name: data for name, (data, _) in bad_files().items() if name != "notes.txt"}
    goods, bads = list(good.items())[:6], list(bad.items())
    mixed = [item for pair in zip(goods, bads) for item in pair] + goods[len(bads):]
    block = batch_of(dict(mixed))  # every batch of 3 holds a good image, so each emits rows
    opts = dict(batch_size=3, patch=PATCH, scale_min=1.0, scale_max=4.0, fixed_scale=None, seed=3, epoch=2)
    one = list(_PairTask(crops=1, **opts)(block))
    three = list(_PairTask(crops=3, **opts)(block))
    assert len(three) == 3 * len(one)
    for a, b in zip(one, three[:len(one)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    lrs = [b["lr"] for b in three]
    assert all(not np.array_equal(lrs[i], lrs[j]) for i in range(len(lrs)) for j in range(i))
    assert sum(int(b["skipped"].sum()) for b in three) == sum(int(b["skipped"].sum()) for b in one) == len(bad)
    with pytest.raises(UserError, match="crops"):
        train_dataset("file:///nowhere", patch=PATCH, batch_size=4, crops=0)


def test_normalise_sample_fixed_schema():
    row = normalise_sample({"__key__": "k1", "__url__": "s.tar", "txt": b"hello"})
    assert row == {"key": "k1", "url": "s.tar", "image": b"", "members": "txt"}
    row = normalise_sample({"__key__": "k2", "json": b"{}", "png": b"PNGDATA"})
    assert row["image"] == b"PNGDATA" and row["members"] == "json,png"


def test_val_pairs_on_set5():
    set5 = shared_data() / "Set5"
    if not set5.is_dir():
        pytest.skip(f"Set5 not found at {set5} (set C2D_SHARED to the shared folder)")
    pytest.importorskip("c2disr.evaluate", reason="c2disr.evaluate not available")
    pairs = val_pairs(str(set5), 4)
    assert len(pairs) == 5
    for name, lr, hr in pairs:
        assert lr.shape[:2] == (1, 3) and hr.shape[:2] == (1, 3)
        assert hr.shape[-2] == 4 * lr.shape[-2] and hr.shape[-1] == 4 * lr.shape[-1]
        assert 0 <= float(lr.min()) and float(hr.max()) <= 1
    assert [p[0] for p in pairs] == sorted(p[0] for p in pairs)
    with pytest.raises(UserError):
        val_pairs(str(set5), 0)


# --------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    import ray.data

    from srplatform.data.pipeline import RAY_SYSTEM_CONFIG

    # address="local": our own Ray, even if another one runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _system_config=RAY_SYSTEM_CONFIG)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    """13 odd-mode images (72x80), 4+ shards, plus a hand-made shard with a non-image member
    and a corrupt image (and no manifest)."""
    import webdataset as wds

    from srplatform.data.pack import pack

    root = tmp_path_factory.mktemp("pipeline")
    src = root / "src"
    src.mkdir()
    files = odd_images(size=72, seed=11)
    for name, data in files.items():
        (src / name).write_bytes(data)
    dest = root / "pack"
    pack(str(src), str(dest), min_size=64, min_shards=4, progress=False)
    raw = root / "raw"
    raw.mkdir()
    for p in sorted(dest.glob("shard-*.tar")):
        (raw / p.name).write_bytes(p.read_bytes())
    with open(raw / "shard-999999.tar", "wb") as f:
        w = wds.TarWriter(f, encoder=False)
        w.write({"__key__": "zz_readme", "txt": b"not an image"})
        w.write({"__key__": "zz_corrupt", "png": b"\x89PNG\r\n\x1a\n garbage"})
        w.write({"__key__": "zz_good", "png": files["rgb.png"]})
        w.close()
    return {"src": src, "pack": dest, "raw": raw, "n": len(files)}


def collect(ds, batch_size: int = 4) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for b in ds.iter_torch_batches(batch_size=batch_size):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def fingerprints(rows: dict[str, torch.Tensor]) -> list[tuple]:
    """Order-free identity of each pair (Ray may interleave tasks' outputs)."""
    return sorted(
        (int(s), round(float(lr.double().sum()), 3), round(float(hr.double().sum()), 3))
        for s, lr, hr in zip(rows["hr_size"], rows["lr"], rows["hr"])
    )


@pytest.mark.integration
def test_ray_dataset_shapes_continuous_and_discrete(ray_local, tiny_pack):
    n = tiny_pack["n"]
    ds = train_dataset(str(tiny_pack["pack"]), patch=PATCH, batch_size=4, num_cpus=0.5)
    rows = collect(ds)
    big = hr_patch_max(PATCH, 4.0)
    assert rows["lr"].shape == (n, 3, PATCH, PATCH) and rows["hr"].shape == (n, 3, big, big)
    assert rows["lr"].dtype == torch.float32 and rows["hr_size"].dtype == torch.int32
    assert int(rows["skipped"].sum()) == 0
    torch.testing.assert_close(rows["scale"], rows["hr_size"].float() / PATCH)
    assert 0 <= float(rows["lr"].min()) and float(rows["hr"].max()) <= 1
    for side, hr in zip(rows["hr_size"], rows["hr"]):
        assert not hr[:, side:, :].any() and not hr[:, :, side:].any()

    ds = train_dataset(f"file://{tiny_pack['pack']}", patch=PATCH, batch_size=4,
                       fixed_scale=3, num_cpus=1)
    rows = collect(ds, batch_size=5)
    assert rows["hr"].shape == (n, 3, 48, 48) and (rows["hr_size"] == 48).all()
    assert (rows["scale"] == 3).all()


@pytest.mark.integration
def test_ray_dataset_determinism_epochs_and_bad_members(ray_local, tiny_pack):
    uri = str(tiny_pack["pack"])
    opts = dict(patch=PATCH, batch_size=4, seed=3, num_cpus=1)
    a = fingerprints(collect(train_dataset(uri, epoch=0, **opts)))
    b = fingerprints(collect(train_dataset(uri, epoch=0, **opts)))
    c = fingerprints(collect(train_dataset(uri, epoch=1, **opts)))
    assert a == b and a != c
    both = collect(train_dataset(uri, epoch=0, epochs=2, **opts))
    assert sorted(both["epoch"].tolist()) == [0] * tiny_pack["n"] + [1] * tiny_pack["n"]
    assert fingerprints({k: v[both["epoch"] == 1] for k, v in both.items()}) == c
    # Two crops per image: the epoch's pairs plus as many new ones.
    two = fingerprints(collect(train_dataset(uri, epoch=0, crops=2, **opts)))
    assert len(two) == 2 * len(a) and set(a) <= set(two) and len(set(two)) == len(two)

    # No manifest: the shards are listed; the hand-made shard's non-image member and corrupt
    # image are skipped and counted, its good image kept.
    rows = collect(train_dataset(str(tiny_pack["raw"]), **opts))
    assert len(rows["lr"]) == tiny_pack["n"] + 1
    assert int(rows["skipped"].sum()) == 2


@pytest.mark.integration
def test_ray_dataset_user_errors(ray_local, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_dataset(str(tmp_path / "missing"), patch=PATCH, batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no WebDataset shards"):
        train_dataset(str(tmp_path / "empty"), patch=PATCH, batch_size=2)
    with pytest.raises(UserError, match="unknown URI scheme"):
        train_dataset("gs://b/x", patch=PATCH, batch_size=2)
    with pytest.raises(UserError, match="scale_min"):
        train_dataset(str(tmp_path), patch=PATCH, batch_size=2, scale_min=3, scale_max=2)


@pytest.mark.integration
def test_ray_dataset_t91(ray_local, tmp_path):
    from srplatform.data.pack import pack

    t91 = t91_or_skip()
    m = pack(str(t91 / "t1*.png"), str(tmp_path / "t91"), min_size=96, progress=False)
    rows = collect(train_dataset(str(tmp_path / "t91"), patch=24, batch_size=4, num_cpus=1))
    assert rows["lr"].shape == (m["samples"], 3, 24, 24)
    assert rows["hr"].shape == (m["samples"], 3, 96, 96)
    assert int(rows["skipped"].sum()) == 0
    # Real photos: the pairs are not blank and LR means track HR means.
    hr_mean = torch.stack([hr[:, :s, :s].mean() for hr, s in zip(rows["hr"], rows["hr_size"])])
    torch.testing.assert_close(rows["lr"].mean(dim=(1, 2, 3)), hr_mean, atol=0.02, rtol=0)
    assert float(rows["hr"].std()) > 0.05


@pytest.mark.integration
def test_ray_dataset_from_s3_matches_file(ray_local, tiny_pack, s3_server):
    from srplatform.data.pack import pack

    st = s3_server.settings()
    dest = f"s3://{s3_server.bucket}/test-pipeline-{uuid.uuid4().hex[:8]}"
    pack(str(tiny_pack["src"]), dest, min_size=64, min_shards=4, settings=st, progress=False)
    opts = dict(patch=PATCH, batch_size=4, seed=5, num_cpus=1)
    from_s3 = collect(train_dataset(dest, settings=st, **opts))
    from_file = collect(train_dataset(str(tiny_pack["pack"]), **opts))
    assert fingerprints(from_s3) == fingerprints(from_file)
    with pytest.raises(UserError, match="no WebDataset shards"):
        train_dataset(dest + "-nothing", settings=st, **opts)
    ak, sk = s3_server.bad_credentials()
    with pytest.raises(UserError, match="rejected the credentials"):
        train_dataset(dest, settings=dict(st, access_key=ak, secret_key=sk), **opts)
    with pytest.raises(UserError, match="does not exist"):
        train_dataset("s3://no-such-bucket-c2d/x", settings=st, **opts)


def test_tar_reader_contract_is_what_we_write(tmp_path):
    """Ray's reader splits member names at the first dot: our keys must never contain one."""
    from srplatform.data.pack import pack

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.b.c.png").write_bytes(odd_images(size=64)["rgb.png"])
    pack(str(src), str(tmp_path / "out"), min_size=64, progress=False)
    names = tarfile.open(tmp_path / "out" / "shard-000000.tar").getnames()
    assert names == ["a_b_c.json", "a_b_c.png"]
