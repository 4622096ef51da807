"""`c2d data`: pack images into WebDataset shards, inspect a pack, preview training pairs."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "Pack HR images into WebDataset shards (file:// or s3://); inspect and preview them"
DESCRIPTION = """\
Training data lives as WebDataset tar shards plus a manifest.json in object storage
(s3://bucket/prefix) or on disk (file:///path or a plain path).

  c2d data pack SRC DEST      pack a folder, glob or s3:// prefix of HR images
  c2d data info URI           print the manifest summary of a pack (--verify checks checksums)
  c2d data preview URI --out DIR
                              write a few LR/HR training pairs as PNG, made exactly as the
                              training pipeline makes them

S3 endpoint and credentials: --endpoint-url, else C2D_S3_ENDPOINT_URL / AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_REGION, else the local stack (`c2d stack up`).
Credentials are never taken on the command line.

Examples:
  c2d data pack ../shared/data/T91 s3://c2disr/t91
  c2d data pack '/data/DIV2K/*.png' file:///data/shards/div2k --shard-size-mb 256
  c2d data info s3://c2disr/t91
  c2d data preview s3://c2disr/t91 --out /tmp/pairs --patch 48 --scale 4

(s3://c2disr is the bucket of the local stack, `c2d stack up`.)
"""

PACK_DESCRIPTION = """\
Pack HR images into WebDataset tar shards at DEST, with DEST/manifest.json (samples, bytes and
sha256 per shard, image size statistics, modes, and every skipped file with its reason).

SRC: a folder (searched recursively), a quoted glob ('/data/**/*.png'), an s3:// prefix, or one
file. Formats: png, jpg/jpeg, webp, bmp, tif/tiff, any bit depth and mode. PNG and JPEG are
stored byte for byte; other formats are transcoded losslessly to PNG. Every image is decoded
fully: corrupt, truncated and non-image files, and images whose shorter side is under
--min-size, are skipped and listed in the manifest; the summary warns when more than 5% of the
inputs were dropped. Symbolic links are followed, but a folder link back into SRC (a loop) and a
second name of a file already packed are left out and counted in the manifest.

Re-running the same pack finds the complete output and does nothing. An interrupted pack
resumes after its last completed shard (shards are committed atomically; a resume record at
DEST/_pack_state.json lists them until the manifest is written).
"""


def _add_s3(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint (e.g. http://127.0.0.1:9000); default: env, then the local stack",
    )


def _settings(args) -> dict | None:
    return {"endpoint_url": args.endpoint_url} if args.endpoint_url else None


def configure(parser: argparse.ArgumentParser) -> None:
    from srplatform.data.pack import DEFAULT_MIN_SIZE

    fmt = parser.formatter_class
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", title="actions")

    p = sub.add_parser("pack", help="pack images into WebDataset shards + manifest",
                       description=PACK_DESCRIPTION, formatter_class=fmt)
    p.add_argument("src", metavar="SRC", help="folder, quoted glob, s3:// prefix or one file")
    p.add_argument("dest", metavar="DEST", help="file:///path, s3://bucket/prefix or a path")
    p.add_argument("--shard-size-mb", type=float, default=64.0,
                   help="cap on each shard's size in MB")
    p.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE,
                   help="skip images whose shorter side is below this many pixels. The default "
                        f"({DEFAULT_MIN_SIZE}) is the smallest HR crop any training can cut "
                        "(data.patch >= 4 at scale >= 1), so a pack serves every setting; "
                        "training skips and counts the images too small for the scale a batch "
                        "draws (the skipped_samples metric)"),
    p.add_argument("--min-shards", type=int, default=8,
                   help="also cap samples per shard at ceil(files / N), so small sets still "
                        "give enough shards for parallel reading")
    p.add_argument("--workers", type=int, default=4,
                   help="threads that read and validate images")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete pack of different inputs at DEST")
    p.add_argument("--create-bucket", action="store_true",
                   help="create the S3 bucket of DEST if it does not exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    _add_s3(p)

    p = sub.add_parser("info", help="print the manifest summary of a pack",
                       description="Print the summary of the manifest at URI (a pack's DEST).",
                       formatter_class=fmt)
    p.add_argument("uri", metavar="URI", help="file:///path, s3://bucket/prefix or a path")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--verify", action="store_true",
                   help="also re-read every shard and check its size and sha256")
    _add_s3(p)

    p = sub.add_parser(
        "preview",
        help="write a few LR/HR training pairs as PNG",
        description=(
            "Write COUNT training pairs from the first shards at URI to DIR as PNG files\n"
            "(KEY_lr.png, KEY_hr.png, and KEY_pair.png: the LR enlarged by pixel repetition\n"
            "beside the HR), made by the same function the Ray Data pipeline runs\n"
            "(srplatform.data.pipeline.make_pairs), without starting Ray."
        ),
        formatter_class=fmt,
    )
    p.add_argument("uri", metavar="URI", help="a pack's DEST, a prefix of .tar shards or a .tar")
    p.add_argument("--out", required=True, metavar="DIR", help="local folder for the PNG files")
    p.add_argument("--count", type=int, default=8, help="number of pairs")
    p.add_argument("--patch", type=int, default=48, help="LR patch side p")
    p.add_argument("--scale", type=int, default=None,
                   help="discrete scale (default: continuous, drawn in [--scale-min, --scale-max])")
    p.add_argument("--scale-min", type=float, default=1.0)
    p.add_argument("--scale-max", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    _add_s3(p)


def run(args) -> int:
    action = getattr(args, "data_command", None)
    if action is None:
        print("c2d data: give an action: pack, info or preview (see `c2d data --help`)",
              file=sys.stderr)
        return 2
    return {"pack": _pack, "info": _info, "preview": _preview}[action](args)


def _pack(args) -> int:
    import logging

    from srplatform.data.pack import pack, summary

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    manifest = pack(
        args.src,
        args.dest,
        shard_size_mb=args.shard_size_mb,
        min_size=args.min_size,
        min_shards=args.min_shards,
        settings=_settings(args),
        progress=not args.no_progress,
        overwrite=args.overwrite,
        create_bucket=args.create_bucket,
        workers=args.workers,
    )
    run_info = manifest.pop("run", {})
    if args.json:
        print(json.dumps(manifest, indent=1))
        return 0
    status = run_info.get("status", "")
    if status == "already complete":
        print(f"{manifest['dest']} is already complete for these inputs: nothing to do.")
    elif status == "resumed":
        print(f"resumed: reused {run_info['shards_reused']} completed shard(s).")
    print(summary(manifest))
    print(f"done in {run_info.get('seconds', 0):.1f} s")
    return 0


def _info(args) -> int:
    import hashlib

    from srplatform import storage
    from srplatform.data.pack import read_manifest, summary
    from srplatform.errors import UserError

    manifest = read_manifest(args.uri, _settings(args))
    if manifest is None:
        shards = storage.list_files(args.uri, _settings(args), suffixes=(".tar",),
                                    allow_empty=True)
        hint = (f" It holds {len(shards)} .tar file(s) but no manifest: pack with "
                "`c2d data pack` to get one.") if shards else ""
        raise UserError(f"no manifest.json at {args.uri}.{hint}")
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        print(summary(manifest))
    if not args.verify:
        return 0
    bad = 0
    for sh in manifest["shards"]:
        uri = storage.join(args.uri, sh["name"])
        h = hashlib.sha256()
        size = 0
        if not storage.exists(uri, _settings(args)):
            print(f"  MISSING  {sh['name']}")
            bad += 1
            continue
        with storage.open_input(uri, _settings(args)) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        ok = size == sh["bytes"] and h.hexdigest() == sh["sha256"]
        bad += not ok
        print(f"  {'ok      ' if ok else 'MISMATCH'} {sh['name']}  {size} bytes")
    print(f"verified {len(manifest['shards'])} shards: {bad} bad")
    return 1 if bad else 0


def _preview(args) -> int:
    import os
    import tarfile

    import numpy as np
    from PIL import Image

    from srplatform import storage
    from srplatform.data.pipeline import make_pairs, normalise_sample, shard_uris
    from srplatform.errors import UserError

    if args.count < 1:
        raise UserError("--count must be at least 1")
    settings = _settings(args)
    samples: list[dict] = []
    for shard in shard_uris(args.uri, settings):
        with storage.open_input(shard, settings) as stream:
            current: dict = {}
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        if not member.isreg():
                            continue
                        base = member.name.rsplit("/", 1)[-1]
                        key, _, ext = base.partition(".")
                        prefix = member.name[: len(member.name) - len(base)] + key
                        if current and current["__key__"] != prefix:
                            samples.append(normalise_sample(current))
                            current = {}
                        current.setdefault("__key__", prefix)
                        current[ext] = tar.extractfile(member).read()
                        if len(samples) >= args.count:
                            break
            except tarfile.TarError as exc:
                raise UserError(f"{shard} is not a readable tar file ({exc})") from None
            if current and len(samples) < args.count:
                samples.append(normalise_sample(current))
        if len(samples) >= args.count:
            break
    samples = samples[: args.count]
    batch = {k: np.array([s[k] for s in samples], dtype=object) for k in ("key", "url", "image")}
    out = make_pairs(
        batch,
        patch=args.patch,
        scale_min=args.scale_min,
        scale_max=args.scale_max,
        fixed_scale=args.scale,
        seed=args.seed,
    )
    os.makedirs(args.out, exist_ok=True)
    n = len(out["lr"])
    if n == 0:
        raise UserError(f"none of the first {len(samples)} samples made a pair (see warnings): "
                        "try a smaller --patch or --scale")
    # Rows whose samples were dropped are not in `out`: name files by the surviving keys only
    # when nothing was dropped, else by position.
    names = [s["key"] for s in samples] if n == len(samples) else [f"pair{i:02d}" for i in
                                                                      range(n)]
    side = int(out["hr_size"][0])
    for i in range(n):
        lr = (out["lr"][i].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        hr = (out["hr"][i, :, :side, :side].transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(lr).save(os.path.join(args.out, f"{names[i]}_lr.png"))
        Image.fromarray(hr).save(os.path.join(args.out, f"{names[i]}_hr.png"))
        big = Image.fromarray(lr).resize((side, side), Image.NEAREST)
        pair = Image.new("RGB", (2 * side + 4, side), (255, 255, 255))
        pair.paste(big, (0, 0))
        pair.paste(Image.fromarray(hr), (side + 4, 0))
        pair.save(os.path.join(args.out, f"{names[i]}_pair.png"))
    skipped = int(out["skipped"].sum())
    print(f"wrote {n} pairs to {args.out}: LR {args.patch}x{args.patch}, HR {side}x{side}, "
          f"scale {side / args.patch:.3f}" + (f"; {skipped} sample(s) skipped" if skipped else ""))
    return 0
