"""Ray Data pipeline: WebDataset shards -> random-scale LR/HR training pairs.

    ds = train_dataset("s3://bucket/t91", patch=48, batch_size=16)          # continuous [1, 4]
    ds = train_dataset("file:///data/t91", patch=48, batch_size=16, fixed_scale=4)  # discrete
    for batch in ds.iter_torch_batches(batch_size=16): ...

One `read_webdataset` (raw bytes, file shuffle) through the pyarrow filesystem of the URI, then
one `map_batches` task per batch (fused with the read, fractional `num_cpus`, so it fits beside
training workers on a small machine) that runs `make_pairs`:

- decode with the `srplatform.data.images` rules (gray replicated, alpha dropped, 16-bit
  scaled, palette expanded: the rules of `c2disr.evaluate.load_image`);
- pick ONE scale s for the batch (continuous: uniform in [scale_min, scale_max]; discrete: the
  integer `fixed_scale`); HR patch side S = round(patch * s);
- per sample: random S x S crop, random horizontal flip, vertical flip and transpose (the 8
  symmetries of the square);
- LR patch (patch x patch) = `c2disr.ops.resize.imresize(hr, size=(patch, patch))` (MATLAB
  bicubic, antialiased), clamped to [0, 1] and rounded to 8-bit levels, i.e. exactly what an
  LR image file would hold.

Output columns (fixed shapes, so rows of batches with different scales stack):
    lr       float32 (N, 3, p, p)  [0, 1] RGB
    hr       float32 (N, 3, P, P)  [0, 1] RGB, P = round(p * scale_max); the valid S x S patch
                                   is in the top-left corner, the rest is zero
    hr_size  int32   (N,)          S, the valid HR side
    scale    float32 (N,)          S / p, the exact scale of the pair (s rounded to the pixel grid)
    skipped  int32   (N,)          samples of this batch that were dropped (undecodable, no image
                                   member, or smaller than S), counted on the batch's first row
                                   and 0 elsewhere: summing the column over everything consumed
                                   gives the number of dropped samples. A batch whose samples
                                   are all bad emits no row; its drops are added to the next
                                   batch of its block that emits one (and logged as a warning).
                                   Training logs the running sum as `skipped_samples`.
    epoch    int32   (N,)          the epoch the row belongs to

Randomness: each batch draws from `numpy.random.SeedSequence([seed, epoch, block_id])` where
block_id is a stable hash of the batch's first sample key, so no two batches share a stream,
the same shards and seed give the same pairs (wherever the shards are stored), and a new epoch
gives new crops. The file order is shuffled with a seed derived from (seed, epoch). With
`crops=k`, an epoch yields k independent crops of every image, the extra ones from
`[seed, epoch, block_id, crop]`.

Deterministic streams (`data.deterministic`, `train_dataset(deterministic=True, rank, world)`):
Ray Data otherwise emits batches in the order its tasks finish and `streaming_split` deals them
to whichever worker asks, so the batches a worker sees vary from run to run. In deterministic
mode the stream is a pure function of (shards, seed, start epoch, epochs, crops, batch size,
workers), written out by `batch_plan`: epoch after epoch, the shards in the seeded order of
`shard_order`, each shard's crops in turn, each crop's samples cut into batches of
`batch_size` in shard order; batch number g of that sequence goes to worker g % world. Every
worker runs its own dataset that makes only its batches, in order (`preserve_order`), and
reads them through `iter_torch_batches` (rows concatenated, re-cut into batches, the last
partial batch dropped). Costs: each worker reads every shard's bytes (decoding only its own
samples), and a slow task holds up the batches behind it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from srplatform import storage
from srplatform.data.images import DecodeError, decode, to_float
from srplatform.errors import UserError

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# Ray settings for clusters that run these tasks with fractional `num_cpus`. Ray keeps at most
# about one idle worker process per CPU and kills the others after 1 s idle; with 0.25 CPU per
# task there are up to 4 task workers per CPU, so every pause in the stream (a slow training
# step, the next epoch) kills some, and each replacement pays the torch import again. Measured on
# 2 CPUs, 0.25 CPU/task, 6-epoch streams with 3 s pauses between them: 16-19 pairs/s with Ray's
# defaults, 325-371 pairs/s with this setting. Pass it as
# `ray.init(_system_config=RAY_SYSTEM_CONFIG)`, or as environment variables `RAY_<name>=<value>`
# of `ray start` on every node.
RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}

# Extensions of members that can hold the sample's image, in order of preference.
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
OUTPUT_COLUMNS = ("lr", "hr", "hr_size", "scale", "skipped", "epoch")


# --------------------------------------------------------------------------------------
# Pair making (pure numpy/torch; runs inside Ray tasks, DataLoader workers or locally)
# --------------------------------------------------------------------------------------


def hr_patch_max(patch: int, scale_max: float) -> int:
    """P, the side of the fixed-size HR column: round(patch * scale_max)."""
    return int(round(patch * scale_max))


def block_seed(seed: int, epoch: int, first_key: str, crop: int = 0) -> np.random.SeedSequence:
    """The seed sequence of one batch: (seed, epoch, 64-bit hash of its first key[, crop]);
    `crop` > 0 numbers the extra crops of an epoch (see `train_dataset(crops=...)`)."""
    digest = hashlib.blake2b(first_key.encode("utf-8"), digest_size=8).digest()
    entropy = [int(seed), int(epoch), int.from_bytes(digest, "little")]
    return np.random.SeedSequence(entropy + ([int(crop)] if crop else []))


def normalise_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """`read_webdataset` decoder: one WebDataset sample -> the fixed row schema
    {key: str, url: str, image: bytes (b"" when the sample has no image member), members: str}.

    No pixel decoding happens here (that is the map task's job); the point is a schema that
    does not depend on which members a shard happens to contain.
    """
    members = sorted(k for k in sample if not k.startswith("__"))
    image = b""
    for ext in IMAGE_MEMBERS:
        value = sample.get(ext)
        if isinstance(value, (bytes, bytearray)):
            image = bytes(value)
            break
    return {
        "key": str(sample.get("__key__", "")),
        "url": str(sample.get("__url__", "")),
        "image": image,
        "members": ",".join(members),
    }


def _as_list(col: Any) -> list:
    if col is None:
        return []
    return list(col)


def make_pairs(
    batch: Mapping[str, Any],
    *,
    patch: int,
    scale_min: float = 1.0,
    scale_max: float = 4.0,
    fixed_scale: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    crop_index: int = 0,
    quantize_lr: bool = True,
    counts: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """One batch of raw samples -> LR/HR pairs (see the module docstring for the columns).

    batch: columns "key" (str), "image" (bytes) and optionally "url" (str), as produced by
        `normalise_sample`; numpy arrays or lists.
    counts: if given, `counts["skipped"]` is set to the number of samples dropped, also when
        all were dropped and there is no row to carry the count.
    """
    import torch

    from c2disr.ops.resize import imresize

    keys = [str(k) for k in _as_list(batch.get("key"))]
    images = _as_list(batch.get("image"))
    urls = _as_list(batch.get("url")) or [""] * len(keys)
    n = len(keys)
    s_max = float(fixed_scale) if fixed_scale else float(scale_max)
    big = hr_patch_max(patch, s_max)
    rng = np.random.default_rng(block_seed(seed, epoch, keys[0] if n else "", crop_index))
    if fixed_scale:
        side = int(patch * fixed_scale)
    else:
        side = int(round(patch * rng.uniform(scale_min, scale_max)))
        side = min(max(side, patch), big)
    # Draw every sample's randomness up front: a bad sample must not shift the others' crops.
    u = rng.random((n, 5))

    crops: list[np.ndarray] = []
    bad: list[str] = []
    for i in range(n):
        data = images[i]
        if data is None or (isinstance(data, float) and math.isnan(data)) or len(data) == 0:
            bad.append(f"{keys[i]} ({urls[i]}): no image member")
            continue
        try:
            arr, _ = decode(bytes(data))
        except DecodeError as exc:
            bad.append(f"{keys[i]} ({urls[i]}): {exc}")
            continue
        h, w = arr.shape[:2]
        if h < side or w < side:
            bad.append(f"{keys[i]} ({urls[i]}): {w}x{h} is smaller than the HR patch {side}")
            continue
        y = int(u[i, 0] * (h - side + 1))
        x = int(u[i, 1] * (w - side + 1))
        crop = arr[y : y + side, x : x + side]
        if u[i, 2] < 0.5:
            crop = crop[:, ::-1]
        if u[i, 3] < 0.5:
            crop = crop[::-1, :]
        if u[i, 4] < 0.5:
            crop = crop.transpose(1, 0, 2)
        crops.append(to_float(np.ascontiguousarray(crop)))

    if bad and not crop_index:  # extra crops of an epoch meet the same samples again
        log.warning("skipped %d of %d samples: %s", len(bad), n, "; ".join(bad[:8]))
    if counts is not None:
        counts["skipped"] = len(bad)
    m = len(crops)
    hr_out = np.zeros((m, 3, big, big), dtype=np.float32)
    lr_out = np.zeros((m, 3, patch, patch), dtype=np.float32)
    if m:
        hr = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()  # (m,3,S,S)
        lr = imresize(hr, size=(patch, patch)).clamp_(0.0, 1.0)
        if quantize_lr:
            lr = lr.mul_(255.0).round_().div_(255.0)
        lr_out[:] = lr.numpy()
        hr_out[:, :, :side, :side] = hr.numpy()
    skipped = np.zeros(m, dtype=np.int32)
    if m:
        skipped[0] = len(bad)
    return {
        "lr": lr_out,
        "hr": hr_out,
        "hr_size": np.full(m, side, dtype=np.int32),
        "scale": np.full(m, side / patch, dtype=np.float32),
        "skipped": skipped,
        "epoch": np.full(m, epoch, dtype=np.int32),
    }


class _PairTask:
    """The map_batches function: cuts each incoming block into batches of `batch_size` rows
    and yields `make_pairs` of each, so every training-size batch gets its own scale.

    It takes whole blocks (map_batches batch_size=None) on purpose: Ray Data fuses a map that
    takes whole blocks into the read task, so one task reads a shard and makes its pairs with
    no raw bytes passing through the object store (a map with a fixed batch_size is never fused
    with a read). One torch thread per task: Ray runs several tasks per core budget and threads
    inside them would only fight each other.
    """

    def __init__(self, *, batch_size: int, crops: int = 1,
                 plan: Mapping[str, tuple[int, int]] | None = None, rank: int = 0, world: int = 1,
                 **options: Any):
        self.batch_size = batch_size
        self.crops = crops
        # Deterministic mode: shard path -> (number of its first batch in the stream, samples);
        # only the batches numbered rank (mod world) are made.
        self.plan = dict(plan) if plan is not None else None
        self.rank = rank
        self.world = world
        self.options = options

    def _first_batch(self, block: dict[str, np.ndarray], n: int) -> int:
        url = str(block["url"][0]) if n else ""
        entry = self.plan.get(url) or self.plan.get(url.rsplit("/", 1)[-1])
        if entry is None:
            raise RuntimeError(f"deterministic data: block of unknown shard {url!r}")
        first, count = entry
        if n != count or any(str(u) != url for u in block["url"]):
            raise RuntimeError(
                f"deterministic data: shard {url} holds {n} samples, its manifest says {count}: "
                "re-pack the data or turn data.deterministic off")
        return first

    def __call__(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import torch

        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        n = len(block["key"])
        first = self._first_batch(block, n) if self.plan is not None else 0
        per_crop = -(-n // self.batch_size)
        # Drops of a batch that emits no row (every sample bad, or smaller than the HR patch of
        # the scale it drew) are carried to the next batch that does, so that the `skipped`
        # column still counts them; only drops after the block's last emitted row are left to
        # make_pairs' warning.
        pending = 0
        # Crop-major: the block's batches once per crop, so repeats of an image are far apart.
        for crop in range(self.crops):
            for start in range(0, n, self.batch_size):
                if self.plan is not None and (
                        first + crop * per_crop + start // self.batch_size) % self.world != self.rank:
                    continue
                part = {k: v[start : start + self.batch_size] for k, v in block.items()}
                counts: dict[str, int] = {}
                out = make_pairs(part, crop_index=crop, counts=counts, **self.options)
                if not crop:  # a bad sample is counted once, on crop 0
                    pending += counts.get("skipped", 0)
                if len(out["lr"]):
                    out["skipped"][:] = 0
                    out["skipped"][0] = pending
                    pending = 0
                    yield out


def read_shard(path: str, fs: Any = None) -> list[dict[str, Any]]:
    """The samples of one WebDataset shard, in tar order, as `normalise_sample` rows. `path`:
    a path of the pyarrow filesystem `fs`, or (fs None) a local path / URI. Members group into
    samples as `read_webdataset` groups them (consecutive members sharing the name before the
    first dot of their base name); member extensions are kept as written."""
    import io
    import tarfile

    if fs is None:
        data = storage.read_bytes(path)
    else:
        with fs.open_input_stream(path) as f:
            data = f.read()
    samples: list[dict[str, Any]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            if not info.isfile():
                continue
            head, _, base = info.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or not stem:
                continue
            key = f"{head}/{stem}" if head else stem
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__url__": path})
            samples[-1][ext] = tar.extractfile(info).read()
    return [normalise_sample(x) for x in samples]


class _ShardTask:
    """Deterministic streams' map function: one (epoch, shard) item -> this worker's batches of
    that shard (`read_shard`, then `_PairTask` with the shard's place in `batch_plan`)."""

    def __init__(self, *, fs: Any, batch_size: int, crops: int, rank: int, world: int,
                 **options: Any):
        self.fs = fs
        self.kw = dict(batch_size=batch_size, crops=crops, rank=rank, world=world, **options)

    def __call__(self, items: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for ep, path, first, count in zip(items["epoch"], items["path"], items["first"],
                                          items["count"]):
            rows = read_shard(str(path), self.fs)
            block = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "url", "image")}
            task = _PairTask(plan={str(path): (int(first), int(count))}, epoch=int(ep), **self.kw)
            yield from task(block)


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


def shard_uris(
    uri: str, settings: storage.S3Settings | Mapping[str, Any] | None = None
) -> list[str]:
    """The shards of a pack: those its manifest lists when DEST/manifest.json exists, else
    every `.tar` under the prefix (or the one `.tar` the URI names). Raises `UserError` when
    there are none."""
    from srplatform.data.pack import read_manifest

    u = storage.parse_uri(uri)
    if u.key.endswith(".tar"):
        if not storage.exists(u, settings):
            raise UserError(f"shard {u} does not exist: check the URI")
        return [str(u)]
    manifest = read_manifest(str(u), settings)
    if manifest is not None:
        shards = [storage.join(u, sh["name"]) for sh in manifest.get("shards", [])]
        if not shards:
            raise UserError(f"the manifest at {u} lists no shards: re-run `c2d data pack`")
        return shards
    entries = storage.list_files(u, settings, suffixes=(".tar",), allow_empty=True)
    if not entries:
        raise UserError(
            f"no WebDataset shards (.tar) under {u} (empty or missing prefix): pack images "
            "there first with `c2d data pack SRC " + str(u) + "`"
        )
    return [e.uri for e in entries]


def shard_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which a deterministic stream reads the `n` shards in `epoch`: a permutation
    seeded by (seed, epoch) (the same seed the file shuffle of a plain stream gets)."""
    file_seed = int(block_seed(seed, epoch, "files").generate_state(1)[0])
    return [int(i) for i in np.random.default_rng(file_seed).permutation(n)]


def batch_plan(counts: list[int], *, batch_size: int, seed: int, epoch: int = 0, epochs: int = 1,
               crops: int = 1, world: int = 1, shuffle_files: bool = True
               ) -> Iterator[tuple[int, int, int, int, int, int]]:
    """The batches of a deterministic stream, in order, as (epoch, shard, crop, start, stop,
    rank): rows start:stop of shard number `shard` (in `shard_uris` order, `counts[shard]`
    samples), made by `make_pairs(..., epoch=epoch, crop_index=crop)`, go to worker `rank`.
    What a worker trains on is its batches' rows, concatenated and re-cut into `batch_size`."""
    g = 0
    for ep in range(epoch, epoch + epochs):
        order = shard_order(len(counts), seed, ep) if shuffle_files else range(len(counts))
        for i in order:
            for crop in range(crops):
                for start in range(0, counts[i], batch_size):
                    yield ep, i, crop, start, min(start + batch_size, counts[i]), g % world
                    g += 1


def shard_counts(uri: str, shards: list[str],
                 settings: storage.S3Settings | Mapping[str, Any] | None = None) -> list[int]:
    """Samples per shard: from the pack's manifest, else counted by reading each shard."""
    import io
    import tarfile

    from srplatform.data.pack import read_manifest

    manifest = read_manifest(uri, settings) if not uri.endswith(".tar") else None
    known = {sh["name"]: int(sh["samples"]) for sh in (manifest or {}).get("shards", [])
             if "samples" in sh}
    out = []
    for shard in shards:
        name = shard.rsplit("/", 1)[-1]
        if name in known:
            out.append(known[name])
            continue
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard, settings))) as tar:
            keys = {m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar if m.isfile()}
        out.append(len(keys))
    return out


def local_stream(shards: list[list[Mapping[str, Any]]], *, rank: int, world: int, batch_size: int,
                 seed: int, epoch: int = 0, epochs: int = 1, crops: int = 1,
                 shuffle_files: bool = True, passes: int | None = None,
                 **options: Any) -> Iterator[dict[str, np.ndarray]]:
    """What worker `rank` of `world` reads from the deterministic stream, made here without Ray:
    batches of exactly `batch_size` rows (its planned batches' rows concatenated and re-cut,
    the partial rest of a pass dropped, as `iter_torch_batches(drop_last=True)` does), pass
    after pass over epochs epoch .. epoch + epochs - 1 (`passes`: None = forever).

    shards: every shard's samples in `shard_uris` order, each {"key": str, "image": bytes}
    (as `normalise_sample` gives them). options: `make_pairs`' patch, scales, fixed_scale.
    """
    counts = [len(sh) for sh in shards]
    done = 0
    while passes is None or done < passes:
        rows: list[dict[str, np.ndarray]] = []
        have = 0
        for ep, i, crop, start, stop, r in batch_plan(
                counts, batch_size=batch_size, seed=seed, epoch=epoch, epochs=epochs, crops=crops,
                world=world, shuffle_files=shuffle_files):
            if r != rank:
                continue
            part = shards[i][start:stop]
            out = make_pairs({"key": [x["key"] for x in part], "image": [x["image"] for x in part]},
                             seed=seed, epoch=ep, crop_index=crop, **options)
            if not len(out["lr"]):
                continue
            if crop:
                out["skipped"][:] = 0
            rows.append(out)
            have += len(out["lr"])
            while have >= batch_size:
                cat = {k: np.concatenate([b[k] for b in rows]) for k in rows[0]}
                yield {k: v[:batch_size] for k, v in cat.items()}
                have -= batch_size
                rows = [{k: v[batch_size:] for k, v in cat.items()}] if have else []
        done += 1


def rank_dataset_name(rank: int) -> str:
    """The Ray Train dataset name of worker `rank`'s deterministic stream."""
    return f"train_{rank}"


def ray_train_datasets(uri: str, *, workers: int, deterministic: bool = False, **options: Any
                       ) -> tuple[dict[str, ray.data.Dataset], Any]:
    """(datasets, dataset_config) for a `TorchTrainer`: one dataset "train" that Ray Train
    splits between the workers, or, when `deterministic`, one dataset per worker
    (`rank_dataset_name`), none split, all read in order."""
    if not deterministic:
        return {"train": train_dataset(uri, **options)}, None
    from ray.train import DataConfig

    exec_options = DataConfig.default_ingest_options()
    exec_options.preserve_order = True
    datasets = {rank_dataset_name(r): train_dataset(uri, deterministic=True, rank=r, world=workers,
                                                    **options)
                for r in range(workers)}
    return datasets, DataConfig(datasets_to_split=[], execution_options=exec_options)


def _check_options(patch: int, batch_size: int, scale_min: float, scale_max: float,
                   fixed_scale: int | None, num_cpus: float) -> None:
    if patch < 1:
        raise UserError(f"patch must be a positive number of LR pixels (got {patch})")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive (got {batch_size})")
    if fixed_scale is not None:
        if int(fixed_scale) != fixed_scale or fixed_scale < 1:
            raise UserError(f"fixed_scale must be a positive integer (got {fixed_scale})")
    elif not (1.0 <= scale_min <= scale_max):
        raise UserError(f"need 1 <= scale_min <= scale_max (got {scale_min}, {scale_max})")
    if num_cpus <= 0:
        raise UserError(f"num_cpus must be positive (got {num_cpus})")


def train_dataset(
    uri: str,
    *,
    patch: int,
    batch_size: int,
    scale_min: float = 1.0,
    scale_max: float = 4.0,
    fixed_scale: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    epochs: int = 1,
    crops: int = 1,
    settings: storage.S3Settings | Mapping[str, Any] | None = None,
    num_cpus: float = 0.25,
    shuffle_files: bool = True,
    deterministic: bool = False,
    rank: int = 0,
    world: int = 1,
) -> ray.data.Dataset:
    """A Ray Dataset of LR/HR pairs from the shards at `uri` (a pack's DEST, a prefix of
    `.tar` files, or one `.tar`); columns as in the module docstring.

    patch: LR patch side p. batch_size: samples per map task batch (all rows of one batch
    share a scale; use the training batch size). fixed_scale: discrete training at this
    integer scale (scale_min/max ignored). epochs: > 1 chains that many epochs (epoch,
    epoch + 1, ...) into one dataset, each with its own file order and crops; the `epoch`
    column tells them apart (convenient for a Ray Train loop that iterates its shard once).
    crops: independent random crops (scale, position, symmetry) of every image per epoch, each
    from its own seed stream; crop 0 is exactly what `crops=1` gives. Lets a long run draw
    fresh pairs without chaining thousands of epochs into one dataset.
    num_cpus: CPUs reserved per read+pairs task (fractional so tasks fit beside training).
    deterministic: worker `rank` of `world`'s share of the deterministic stream (see the module
    docstring and `batch_plan`), in order; iterate it with `preserve_order` (set on the
    dataset's context; Ray Train needs it in its `DataConfig`, see `ray_train_datasets`).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    _check_options(patch, batch_size, scale_min, scale_max, fixed_scale, num_cpus)
    if epochs < 1:
        raise UserError(f"epochs must be at least 1 (got {epochs})")
    if crops < 1:
        raise UserError(f"crops must be at least 1 (got {crops})")
    u = storage.parse_uri(uri)
    s = storage.resolve_settings(settings) if u.scheme == "s3" else None
    shards = shard_uris(str(u), s)
    _warn_min_size(str(u), s, patch, float(fixed_scale or scale_max))
    fs, _ = storage.filesystem(u, s)
    paths = [storage.parse_uri(x).fs_path for x in shards]
    pair_options = dict(patch=patch, scale_min=float(scale_min), scale_max=float(scale_max),
                        fixed_scale=int(fixed_scale) if fixed_scale else None, seed=int(seed))
    if deterministic:
        # One task per (epoch, shard), in stream order, each reading its shard itself
        # (`read_shard`) and making this worker's batches of it; no union (Ray's ordered union
        # interleaves its inputs block by block) and no split.
        if not 0 <= rank < world:
            raise UserError(f"rank must be in [0, {world}) (got {rank})")
        counts = shard_counts(str(u), shards, s)
        items = []
        for g, (ep, i, crop, start, _, _) in enumerate(batch_plan(
                counts, batch_size=batch_size, seed=seed, epoch=epoch, epochs=epochs,
                crops=crops, world=world, shuffle_files=shuffle_files)):
            if crop == 0 and start == 0:
                items.append({"epoch": ep, "path": paths[i], "first": g, "count": counts[i]})
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ShardTask(fs=fs, batch_size=batch_size, crops=int(crops), rank=int(rank),
                       world=int(world), **pair_options),
            batch_format="numpy", batch_size=None, num_cpus=num_cpus)
        ds.context.op_resource_reservation_enabled = False
        ds.context.execution_options.preserve_order = True
        return ds

    def one_epoch(ep: int) -> ray.data.Dataset:
        shuffle = None
        if shuffle_files:
            file_seed = int(block_seed(seed, ep, "files").generate_state(1)[0])
            shuffle = FileShuffleConfig(seed=file_seed)
        ds = ray.data.read_webdataset(
            paths,
            filesystem=fs,
            decoder=normalise_sample,
            shuffle=shuffle,
            num_cpus=num_cpus,
            # One read task per shard: shards are the unit of parallelism and of file shuffle.
            override_num_blocks=len(paths),
        )
        return ds.map_batches(
            _PairTask(
                batch_size=batch_size,
                crops=int(crops),
                patch=patch,
                scale_min=float(scale_min),
                scale_max=float(scale_max),
                fixed_scale=int(fixed_scale) if fixed_scale else None,
                seed=int(seed),
                epoch=int(ep),
            ),
            batch_format="numpy",
            batch_size=None,
            num_cpus=num_cpus,
        )

    ds = one_epoch(epoch)
    if epochs > 1:
        ds = ds.union(*[one_epoch(epoch + k) for k in range(1, epochs)])
    # Ray Data reserves half of its CPU budget per operator and splits it across all pending
    # operators (each epoch of the union is one), which on a small machine lets only one task
    # run at a time. This pipeline is a chain of identical read+pairs operators with nothing to
    # starve, so the reservation only costs throughput (2 CPUs, 1 CPU/task: 118 -> 191 pairs/s
    # in benchmarks/data.py). The setting lives in this dataset's own context.
    ds.context.op_resource_reservation_enabled = False
    return ds


def epoch_datasets(
    uri: str, *, start_epoch: int = 0, epochs: int | None = None, **options: Any
) -> Iterator[tuple[int, ray.data.Dataset]]:
    """Yield `(epoch, train_dataset(uri, epoch=epoch, **options))` for epoch = start_epoch,
    start_epoch + 1, ... (forever when `epochs` is None): a fresh stream per epoch, with the
    epoch in the seed."""
    ep = start_epoch
    while epochs is None or ep < start_epoch + epochs:
        yield ep, train_dataset(uri, epoch=ep, **options)
        ep += 1


def _warn_min_size(uri: str, settings: Any, patch: int, scale_max: float) -> None:
    from srplatform.data.pack import read_manifest

    try:
        manifest = read_manifest(uri, settings)
    except UserError:
        return
    if not manifest:
        return
    packed_min = int(manifest.get("params", {}).get("min_size", 0))
    need = hr_patch_max(patch, scale_max)
    images = manifest.get("images", {})
    smallest = min(int(images.get("width", {}).get("min", 0) or 0),
                   int(images.get("height", {}).get("min", 0) or 0))
    if packed_min < need and smallest < need:
        log.warning(
            "%s holds images with a side of %d, under the largest HR patch (%d): each batch "
            "skips the images too small for the scale it drew (counted in the `skipped` "
            "column; training logs the sum as skipped_samples)",
            uri, smallest, need,
        )


# --------------------------------------------------------------------------------------
# Validation pairs
# --------------------------------------------------------------------------------------


def val_pairs(folder: str, scale: int, *, max_images: int = 0) -> list[tuple[str, Any, Any]]:
    """Whole benchmark images with their deterministic LR:
    `[(name, lr (1,3,h,w), hr (1,3,h*scale,w*scale)), ...]`, float32 [0, 1] RGB torch tensors,
    sorted by file name; HR is cropped to a multiple of `scale` and LR made by MATLAB bicubic,
    rounded to 8-bit levels (`c2disr.evaluate.list_images / load_image / make_pair`, the
    convention of published tables).

    folder: a local folder or `file://` URI of images (not searched recursively).
    max_images: 0 = all. Missing folder, no images or an unreadable image: `UserError`.
    """
    from c2disr.evaluate import list_images, load_image, make_pair

    if int(scale) != scale or scale < 1:
        raise UserError(f"validation scale must be a positive integer (got {scale})")
    u = storage.parse_uri(folder)
    if u.scheme != "file":
        raise UserError(f"validation images must be a local folder (got {folder})")
    try:
        paths = list_images(u.key)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"validation folder: {exc}") from None
    if max_images:
        paths = paths[:max_images]
    out = []
    for path in paths:
        try:
            hr = load_image(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"validation image: {exc}") from None
        lr, hr_c = make_pair(hr, int(scale))
        out.append((path.stem, lr.unsqueeze(0), hr_c.unsqueeze(0)))
    return out
