"""Pack HR images into WebDataset tar shards with a manifest (`c2d data pack`).

    manifest = pack("/data/DIV2K_train_HR", "s3://bucket/div2k", shard_size_mb=64)

Layout at DEST:
    shard-000000.tar, shard-000001.tar, ...   WebDataset shards
    manifest.json                             written last: its presence means "complete"
    _pack_state.json                          only while a pack is unfinished (resume record)

Each sample is one source image: `KEY.png` or `KEY.jpg` plus `KEY.json` (source name, size,
mode, format, whether transcoded). Keys come from the path relative to SRC with the extension
removed and every character outside [A-Za-z0-9_-] replaced by "_" (WebDataset splits member
names at the first dot, so keys must not contain one); names that collide after that get a
suffix from a hash of their original path, so keys are deterministic and unique. Samples are
written sorted by key, so each sample's members are contiguous and shards are reproducible.

Stored bytes: PNG and JPEG files are stored byte for byte (no quality loss, no re-encoding
cost, any bit depth or mode; the readers apply `srplatform.data.images` rules). Other formats
(WebP, BMP, TIFF) are transcoded losslessly to PNG of their decoded pixels, so readers need
only PNG and JPEG. Every image is decoded fully at pack time; corrupt, truncated, non-image and
too-small (under `min_size`, by default the smallest HR crop any training can cut) files are
skipped and listed per file with the reason in the manifest.

Idempotent and resumable: the manifest records a fingerprint of the inputs (relative names,
sizes, modification times) and the options; re-running with the same ones finds the complete
pack and does nothing. Shards are built in a local temporary file and committed atomically
(rename for files, one upload for S3), and after each one `_pack_state.json` records which
inputs it consumed, so an interrupted pack resumes after its last committed shard without
duplicating samples.
"""

from __future__ import annotations

import collections
import fnmatch
import glob as globlib
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import stat as stat_mod
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from srplatform import storage
from srplatform.data.images import IMAGE_SUFFIXES, DecodeError, decode, storable
from srplatform.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "c2disr-webdataset/1"
MANIFEST = "manifest.json"
STATE = "_pack_state.json"
SHARD_PATTERN = "shard-{:06d}.tar"
# The default --min-size: the smallest HR crop any training run can cut. A crop is
# round(data.patch * s) pixels with data.patch >= 4 (srplatform.config) and s >= 1, so a smaller
# image fits no crop at all. A pack keeps every other image: it does not depend on one training
# setting; at run time each batch skips (and counts) the images too small for its scale.
DEFAULT_MIN_SIZE = 4
# The pack summary warns when more than this fraction of the inputs was dropped.
DROPPED_WARN_FRACTION = 0.05
_GLOB_CHARS = set("*?[")
_TAR_BLOCK = 512


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One input file: where it is, its name relative to SRC, and its listing fingerprint."""

    uri: str
    rel: str
    size: int
    mtime_ns: int


def _split_glob(pattern: str) -> tuple[str, str]:
    """("dir/without/glob", "rest/with/*.png") for a path pattern."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return "/".join(parts[:i]), "/".join(parts[i:])
    return pattern, ""


@dataclass
class LinkSkips:
    """What a local listing left out because of symbolic links: folder links that lead back
    into a folder already on the walk (`loops`, relative names), and files that are the same
    file as one already listed (`duplicates`, `(name, kept name)`), e.g. a link to it."""

    loops: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)


def _walk_local(root: str, skips: LinkSkips) -> list[tuple[str, os.stat_result]]:
    """`[(path, stat)]` of the files under the local folder `root`, following symbolic links
    but never into a folder that is already on the current walk (a loop). Hidden names are
    left out, as `storage.list_files` does."""
    found: list[tuple[str, os.stat_result]] = []

    def visit(folder: str, chain: frozenset) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"cannot list {folder}: {exc.strerror or exc}") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                st = os.stat(e.path)  # follows links; a dangling link raises
            except OSError:
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if ident in chain:
                    skips.loops.append(os.path.relpath(e.path, root))
                    continue
                visit(e.path, chain | {ident})
            elif stat_mod.S_ISREG(st.st_mode):
                found.append((e.path, st))

    top = os.stat(root)
    visit(root, frozenset({(top.st_dev, top.st_ino)}))
    return found


def _unique_files(paths: list[tuple[str, os.stat_result]], root: str,
                  skips: LinkSkips) -> list[Source]:
    """One `Source` per distinct file (device, inode): of several names for the same file the
    one reached without symbolic links is kept (then the shallower, then the first by name)."""

    def rank(item: tuple[str, os.stat_result]) -> tuple:
        path = item[0]
        rel = os.path.relpath(path, root)
        return (os.path.realpath(path) != os.path.abspath(path), rel.count(os.sep), rel)

    by_file: dict[tuple[int, int], list[tuple[str, os.stat_result]]] = collections.defaultdict(list)
    for item in paths:
        by_file[(item[1].st_dev, item[1].st_ino)].append(item)
    out = []
    for group in by_file.values():
        group.sort(key=rank)
        keep, st = group[0]
        keep_rel = os.path.relpath(keep, root)
        out.append(Source("file://" + os.path.abspath(keep), keep_rel, st.st_size, st.st_mtime_ns))
        skips.duplicates.extend((os.path.relpath(p, root), keep_rel) for p, _ in group[1:])
    skips.duplicates.sort()
    return sorted(out, key=lambda s: s.rel)


def list_sources(
    src: str, settings: storage.S3Settings | Mapping[str, Any] | None = None,
    skips: LinkSkips | None = None,
) -> list[Source]:
    """Every file under SRC (a folder, a glob, an `s3://` prefix, optionally with a glob, or
    one file), sorted by relative name. Raises `UserError` when nothing is there.

    Local folders are walked following symbolic links, except links back into a folder already
    on the walk (loops), and each file is listed once however many names reach it; what was
    left out that way is recorded in `skips`."""
    text = os.fspath(src)
    is_glob = bool(_GLOB_CHARS & set(text))
    skips = skips if skips is not None else LinkSkips()
    if "://" not in text or text.startswith("file://"):
        u = storage.parse_uri(text)
        if is_glob:
            root, _ = _split_glob(u.key)
            hits = sorted(p for p in globlib.glob(u.key, recursive=True) if os.path.isfile(p))
            if not hits:
                raise UserError(f"the pattern {text!r} matched no files: check it (quote it "
                                "so your shell does not expand it)")
            return _unique_files([(p, os.stat(p)) for p in hits], root or ".", skips)
        if os.path.isfile(u.key):
            st = os.stat(u.key)
            return [Source("file://" + os.path.abspath(u.key), os.path.basename(u.key),
                           st.st_size, st.st_mtime_ns)]
        if not os.path.isdir(u.key):
            raise UserError(f"folder {u.key} does not exist: check the path")
        out = _unique_files(_walk_local(u.key, skips), u.key, skips)
        if not out:
            raise UserError(f"no files under {u}: check the folder")
        return out
    u = storage.parse_uri(text)  # s3 (or an unknown scheme: parse_uri raises)
    if is_glob:
        prefix, pattern = _split_glob(u.key)
        base = storage.URI("s3", u.bucket, prefix)
        entries = storage.list_files(base, settings, allow_empty=True)
        full = u.key
        entries = [e for e in entries if fnmatch.fnmatchcase(storage.parse_uri(e.uri).key, full)]
        root = prefix
    else:
        entries = storage.list_files(u, settings, allow_empty=True)
        root = u.key.rstrip("/")
        if len(entries) == 1 and storage.parse_uri(entries[0].uri).key == root:
            root = posixpath.dirname(root)
    if not entries:
        raise UserError(f"no objects under {text} (empty or missing prefix): check the URI")
    return [
        Source(e.uri, posixpath.relpath(storage.parse_uri(e.uri).key, root or "."), e.size,
               e.mtime_ns)
        for e in entries
    ]


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]+")


def sanitize_key(rel: str) -> str:
    """Relative file name -> a WebDataset key: extension removed, any run of characters outside
    [A-Za-z0-9_-] (dots, slashes, spaces, unicode) replaced by one "_"."""
    stem = rel
    base = posixpath.basename(rel.replace(os.sep, "/"))
    if "." in base.lstrip("."):
        stem = rel[: len(rel) - (len(base) - base.rfind("."))]
    key = _KEY_BAD.sub("_", stem.replace(os.sep, "/")).strip("_")
    return key or "image"


def assign_keys(rels: list[str]) -> dict[str, str]:
    """Unique keys for relative names; deterministic for a given set of names. Names whose
    sanitised key collides get `_<8 hex of sha1(name)>` appended (more digits if needed)."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for rel in rels:
        groups[sanitize_key(rel)].append(rel)
    out: dict[str, str] = {}
    taken = {k for k, v in groups.items() if len(v) == 1}
    for key, members in groups.items():
        if len(members) == 1:
            out[members[0]] = key
            continue
        for rel in sorted(members):
            digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()
            n = 8
            while f"{key}_{digest[:n]}" in taken:
                n += 4
            out[rel] = f"{key}_{digest[:n]}"
            taken.add(out[rel])
    return out


def fingerprint(sources: list[Source], params: dict[str, Any]) -> str:
    """sha256 over the format, the options and every input's (name, size, mtime)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "params": params}, sort_keys=True).encode())
    for s in sources:
        h.update(f"\n{s.rel}\t{s.size}\t{s.mtime_ns}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@dataclass
class Checked:
    """One input after validation: either a sample to store or a skip reason."""

    source: Source
    key: str
    payload: bytes = b""
    ext: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str = ""
    read_bytes: int = 0


def _check(source: Source, key: str, min_size: int, settings: Any) -> Checked:
    if not source.rel.lower().endswith(IMAGE_SUFFIXES):
        return Checked(source, key, skip="not an image file name (expected one of "
                       + ", ".join(IMAGE_SUFFIXES) + ")")
    data = storage.read_bytes(source.uri, settings)
    try:
        arr, probe = decode(data)
    except DecodeError as exc:
        return Checked(source, key, skip=str(exc), read_bytes=len(data))
    h, w = arr.shape[:2]
    del arr
    if min(h, w) < min_size:
        return Checked(source, key, read_bytes=len(data),
                       skip=f"too small: {w}x{h} is under --min-size {min_size}")
    payload, ext, transcoded = storable(data, probe)
    meta = {
        "source": source.rel,
        "width": w,
        "height": h,
        "mode": probe.mode,
        "format": probe.format,
        "transcoded": transcoded,
    }
    return Checked(source, key, payload, ext, meta, read_bytes=len(data))


def _member_bytes(n: int) -> int:
    return _TAR_BLOCK + math.ceil(n / _TAR_BLOCK) * _TAR_BLOCK


def _checked_stream(
    todo: list[tuple[Source, str]], min_size: int, settings: Any, workers: int
) -> Iterator[Checked]:
    """Validate inputs on a small thread pool (reads and Pillow decoding release the GIL), in
    input order, with a bounded look-ahead so memory stays at a few images."""
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="c2d-pack") as pool:
        window: collections.deque[Future] = collections.deque()
        it = iter(todo)
        for src, key in it:
            window.append(pool.submit(_check, src, key, min_size, settings))
            if len(window) >= 2 * workers:
                break
        while window:
            result = window.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(_check, nxt[0], nxt[1], min_size, settings))
            yield result


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


class _ShardBuilder:
    """Collects validated samples for one shard and writes them with webdataset's TarWriter."""

    def __init__(self, index: int):
        self.index = index
        self.name = SHARD_PATTERN.format(index)
        self.samples: list[Checked] = []
        self.consumed: list[str] = []  # every input rel this shard accounts for, skips too
        self.skipped: list[dict[str, str]] = []
        self.size = 2 * _TAR_BLOCK  # end-of-archive marker

    def fits(self, item: Checked, cap_bytes: int, cap_count: int) -> bool:
        if not self.samples:
            return True
        extra = _member_bytes(len(item.payload)) + _member_bytes(len(_meta_json(item)))
        return self.size + extra <= cap_bytes and len(self.samples) < cap_count

    def add(self, item: Checked) -> None:
        self.samples.append(item)
        self.consumed.append(item.source.rel)
        self.size += _member_bytes(len(item.payload)) + _member_bytes(len(_meta_json(item)))

    def add_skip(self, item: Checked) -> None:
        self.consumed.append(item.source.rel)
        self.skipped.append({"source": item.source.rel, "reason": item.skip})

    def write(self, path: str) -> tuple[int, str]:
        """Write the tar to a local path; returns (bytes, sha256)."""
        import webdataset as wds

        with open(path, "wb") as f:
            # mtime fixed: identical inputs must give byte-identical shards.
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            for s in sorted(self.samples, key=lambda c: c.key):
                writer.write({"__key__": s.key, s.ext: s.payload, "json": _meta_json(s)})
            writer.close()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return os.path.getsize(path), h.hexdigest()


def _meta_json(item: Checked) -> bytes:
    return json.dumps(item.meta, sort_keys=True).encode("utf-8")


def _image_stats(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """Mergeable image statistics of a shard (sums, not means, so shards add up)."""
    return {
        "count": len(metas),
        "w_min": min((m["width"] for m in metas), default=0),
        "w_max": max((m["width"] for m in metas), default=0),
        "w_sum": sum(m["width"] for m in metas),
        "h_min": min((m["height"] for m in metas), default=0),
        "h_max": max((m["height"] for m in metas), default=0),
        "h_sum": sum(m["height"] for m in metas),
        "modes": dict(collections.Counter(m["mode"] for m in metas)),
        "formats": dict(collections.Counter(m["format"] for m in metas)),
        "transcoded": sum(1 for m in metas if m["transcoded"]),
    }


def _summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-shard image statistics into the manifest's `images` entry."""
    parts = [p for p in parts if p["count"]]
    n = sum(p["count"] for p in parts)
    modes: collections.Counter = collections.Counter()
    formats: collections.Counter = collections.Counter()
    for p in parts:
        modes.update(p["modes"])
        formats.update(p["formats"])

    def stat(axis: str) -> dict[str, float]:
        if not n:
            return {"min": 0, "max": 0, "mean": 0.0}
        return {
            "min": min(p[f"{axis}_min"] for p in parts),
            "max": max(p[f"{axis}_max"] for p in parts),
            "mean": round(sum(p[f"{axis}_sum"] for p in parts) / n, 2),
        }

    transcoded = sum(p["transcoded"] for p in parts)
    return {
        "width": stat("w"),
        "height": stat("h"),
        "modes": dict(sorted(modes.items())),
        "formats": dict(sorted(formats.items())),
        "transcoded_to_png": transcoded,
        "stored_as_is": n - transcoded,
    }


def _names_digest(rels: list[str]) -> str:
    return hashlib.sha256("\n".join(rels).encode("utf-8")).hexdigest()


def read_manifest(
    uri: str, settings: storage.S3Settings | Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The manifest at a pack's DEST (None when there is none). A manifest that is not
    valid JSON raises `UserError` naming it."""
    m_uri = storage.join(uri, MANIFEST)
    if not storage.exists(m_uri, settings):
        return None
    raw = storage.read_bytes(m_uri, settings)
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{m_uri} is not valid JSON ({exc}): re-run `c2d data pack`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{m_uri} is not a {FORMAT} manifest: was it written by c2d data pack?")
    return manifest


def _read_state(dest: str, settings: Any) -> dict[str, Any] | None:
    s_uri = storage.join(dest, STATE)
    if not storage.exists(s_uri, settings):
        return None
    try:
        return json.loads(storage.read_bytes(s_uri, settings))
    except json.JSONDecodeError:
        log.warning("ignoring unreadable resume record %s", s_uri)
        return None


def pack(
    src: str,
    dest: str,
    *,
    shard_size_mb: float = 64.0,
    min_size: int = DEFAULT_MIN_SIZE,
    min_shards: int = 8,
    settings: storage.S3Settings | Mapping[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    create_bucket: bool = False,
    workers: int = 4,
) -> dict[str, Any]:
    """Pack HR images from `src` into WebDataset shards at `dest`; returns the manifest.

    src: a folder, a glob (`"/data/**/*.png"`), an `s3://bucket/prefix` (optionally with a
        glob) or one file. Formats png, jpg/jpeg, webp, bmp, tif/tiff; any bit depth and mode.
    dest: `file://...`, `s3://bucket/prefix` or a plain local path.
    shard_size_mb: the cap on a shard's size (a single larger image gets a shard of its own).
    min_size: images whose shorter side is below this are skipped (default
        `DEFAULT_MIN_SIZE`, the smallest crop any training can cut: a pack serves every
        setting, and training skips and counts what is too small for the scale it drew).
    min_shards: also cap samples per shard at ceil(inputs / min_shards), so small sets still
        give enough shards for parallel reading.
    overwrite: replace a complete pack of different inputs at `dest` (else `UserError`).
    create_bucket: create the S3 bucket of `dest` if it is missing.

    The returned dict is the manifest written to `dest/manifest.json` plus a "run" entry
    (not written) with the status ("packed", "resumed" or "already complete"), the number of
    shards reused and the seconds taken.
    """
    if shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb must be positive (got {shard_size_mb})")
    if min_size < 1:
        raise UserError(f"--min-size must be at least 1 (got {min_size})")
    if min_shards < 1:
        raise UserError(f"--min-shards must be at least 1 (got {min_shards})")
    t0 = time.perf_counter()
    dest_u = storage.parse_uri(dest)
    dest = str(dest_u)
    # Resolve S3 settings once (env, stack state), not once per object read.
    settings = storage.resolve_settings(settings)
    if dest_u.scheme == "file":  # before any input is read: a bad DEST fails at once
        storage.check_writable_folder(dest_u.key, "DEST")
    if dest_u.scheme == "s3":
        if create_bucket:
            storage.create_bucket(dest_u, settings)
        storage.check_bucket(dest_u, settings)

    links = LinkSkips()
    sources = list_sources(src, settings, links)
    keys = assign_keys([s.rel for s in sources])
    sources.sort(key=lambda s: keys[s.rel])
    params = {"shard_size_mb": float(shard_size_mb), "min_size": int(min_size),
              "min_shards": int(min_shards)}
    fp = fingerprint(sorted(sources, key=lambda s: s.rel), params)

    existing = read_manifest(dest, settings)
    if existing is not None and existing.get("fingerprint") == fp and not overwrite:
        # Same inputs and options: complete unless a shard went missing or changed size since.
        for sh in existing.get("shards", []):
            entry = storage.stat(storage.join(dest, sh["name"]), settings)
            if entry is None or entry.size != sh["bytes"]:
                log.warning("%s: shard %s is missing or damaged; packing again", dest,
                            sh["name"])
                overwrite = True
                break
    if existing is not None:
        if existing.get("fingerprint") == fp and not overwrite:
            log.info("%s already holds this pack (%d samples); nothing to do", dest,
                     existing.get("samples", 0))
            existing["run"] = {"status": "already complete", "shards_reused":
                               len(existing.get("shards", [])), "seconds":
                               round(time.perf_counter() - t0, 3)}
            return existing
        if not overwrite:
            raise UserError(
                f"{dest} already holds a complete pack of different inputs or options "
                f"(source {existing.get('source')!r}). Choose another DEST, or pass "
                "--overwrite to replace it."
            )

    state = _read_state(dest, settings)
    done: list[dict[str, Any]] = []
    if state and state.get("fingerprint") == fp:
        done = list(state.get("shards", []))
        # Trust a committed shard only if its object is really there with the recorded size.
        for i, sh in enumerate(done):
            entry = storage.stat(storage.join(dest, sh["name"]), settings)
            if entry is None or entry.size != sh["bytes"]:
                done = done[:i]
                break
    elif state:
        log.warning("discarding an unfinished pack of different inputs at %s", dest)
    # The committed shards consumed a prefix of the sorted inputs; check it really is one.
    n_consumed = 0
    for i, sh in enumerate(done):
        names = [s.rel for s in sources[n_consumed : n_consumed + sh["consumed"]]]
        if len(names) != sh["consumed"] or _names_digest(names) != sh["consumed_sha256"]:
            done = done[:i]
            break
        n_consumed += sh["consumed"]
    n_reused = len(done)
    todo = [(s, keys[s.rel]) for s in sources[n_consumed:]]

    n_inputs = len(sources)
    cap_bytes = int(shard_size_mb * 1024 * 1024)
    cap_count = max(1, math.ceil(n_inputs / min_shards))

    from tqdm import tqdm

    bar = tqdm(total=n_inputs, initial=n_consumed, unit="img", file=sys.stderr,
               disable=not progress, desc=f"pack -> {dest}", dynamic_ncols=True)
    read_total = 0
    t_read = time.perf_counter()

    def commit(builder: _ShardBuilder) -> None:
        fd, tmp = tempfile.mkstemp(prefix="c2d-shard-", suffix=".tar")
        os.close(fd)
        try:
            nbytes, sha = builder.write(tmp)
            storage.upload_file(tmp, storage.join(dest, builder.name), settings)
        finally:
            os.unlink(tmp)
        done.append({
            "name": builder.name,
            "samples": len(builder.samples),
            "bytes": nbytes,
            "sha256": sha,
            "first_key": builder.samples[0].key if builder.samples else "",
            "last_key": builder.samples[-1].key if builder.samples else "",
            "consumed": len(builder.consumed),
            "consumed_sha256": _names_digest(builder.consumed),
            "skipped": builder.skipped,
            "stats": _image_stats([s.meta for s in builder.samples]),
        })
        state_doc = {"format": FORMAT, "fingerprint": fp, "source": str(src),
                     "params": params, "shards": done}
        storage.write_bytes(storage.join(dest, STATE), json.dumps(state_doc).encode(), settings)

    builder = _ShardBuilder(len(done))
    try:
        for item in _checked_stream(todo, min_size, settings, max(1, workers)):
            read_total += item.read_bytes
            if item.skip:
                log.info("skipping %s: %s", item.source.rel, item.skip)
                builder.add_skip(item)
            else:
                if not builder.fits(item, cap_bytes, cap_count):
                    commit(builder)
                    builder = _ShardBuilder(len(done))
                builder.add(item)
            bar.update(1)
            rate = read_total / 1e6 / max(time.perf_counter() - t_read, 1e-6)
            bar.set_postfix_str(f"{rate:.1f} MB/s", refresh=False)
        if builder.samples:
            commit(builder)
    finally:
        bar.close()

    shards = list(done)
    # Skips after the last committed shard (trailing ones) live only in the open builder.
    trailing = builder.skipped if not builder.samples else []
    skipped = [sk for sh in done for sk in sh["skipped"]] + trailing
    if not shards:
        reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:5])
        raise UserError(
            f"no usable images in {src} ({len(skipped)} skipped: {reasons}"
            f"{' ...' if len(skipped) > 5 else ''}). Nothing was written to {dest}."
        )

    # Leftover shards of an earlier, larger pack at the same DEST would confuse a reader that
    # lists the folder instead of reading the manifest: remove them.
    keep = {sh["name"] for sh in shards}
    for entry in storage.list_files(dest, settings, suffixes=(".tar",), recursive=False,
                                    allow_empty=True):
        name = entry.name
        if re.fullmatch(r"shard-\d{6}\.tar", name) and name not in keep:
            storage.delete(entry.uri, settings)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "source": str(src),
        "dest": dest,
        "fingerprint": fp,
        "params": params,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "samples": sum(sh["samples"] for sh in shards),
        "bytes": sum(sh["bytes"] for sh in shards),
        "inputs": n_inputs,
        "shards": [
            {k: sh[k] for k in ("name", "samples", "bytes", "sha256", "first_key", "last_key")}
            for sh in shards
        ],
        "images": _summarise([sh["stats"] for sh in shards]),
        "skipped_count": len(skipped),
        "skipped": skipped,
        # Not inputs at all: folder links back into the walk, and second names of one file.
        "symlink_loops_skipped": len(links.loops),
        "symlink_loops": links.loops,
        "duplicates_skipped": len(links.duplicates),
        "duplicates": [{"source": a, "same_as": b} for a, b in links.duplicates],
    }
    storage.write_bytes(storage.join(dest, MANIFEST),
                        json.dumps(manifest, indent=1).encode(), settings)
    storage.delete(storage.join(dest, STATE), settings)
    manifest["run"] = {
        "status": "resumed" if n_reused else "packed",
        "shards_reused": n_reused,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return manifest


def summary(manifest: Mapping[str, Any]) -> str:
    """A few human lines about a manifest (for `c2d data info` and logs)."""
    im = manifest.get("images", {})
    w, h = im.get("width", {}), im.get("height", {})
    lines = [
        f"{manifest.get('dest')}: {manifest.get('samples')} samples in "
        f"{len(manifest.get('shards', []))} shards, {manifest.get('bytes', 0) / 1e6:.1f} MB "
        f"(format {manifest.get('format')}, packed {manifest.get('created_at')})",
        f"  source      {manifest.get('source')}  ({manifest.get('inputs')} files)",
        f"  width       min {w.get('min')}  max {w.get('max')}  mean {w.get('mean')}",
        f"  height      min {h.get('min')}  max {h.get('max')}  mean {h.get('mean')}",
        f"  modes       {im.get('modes')}",
        f"  formats     {im.get('formats')}  (transcoded to PNG: {im.get('transcoded_to_png')})",
        f"  options     {manifest.get('params')}",
        f"  skipped     {manifest.get('skipped_count')}",
    ]
    loops, dups = manifest.get("symlink_loops_skipped", 0), manifest.get("duplicates_skipped", 0)
    if loops or dups:
        lines.insert(2, f"  links       not packed: {loops} symlink loop(s) (folder links back "
                        f"into SRC), {dups} duplicate name(s) of the same file")
    inputs, dropped = int(manifest.get("inputs") or 0), int(manifest.get("skipped_count") or 0)
    if inputs and dropped > DROPPED_WARN_FRACTION * inputs:
        small = sum(1 for sk in manifest.get("skipped", []) if sk["reason"].startswith("too small"))
        hint = (f"; {small} too small for --min-size "
                f"{manifest.get('params', {}).get('min_size')} (lower it to keep them)" if small else "")
        lines.append(f"  WARNING     {dropped} of {inputs} inputs ({dropped / inputs:.0%}) were "
                     f"dropped{hint}")
    for sk in manifest.get("skipped", [])[:20]:
        lines.append(f"    {sk['source']}: {sk['reason']}")
    if manifest.get("skipped_count", 0) > 20:
        lines.append(f"    ... and {manifest['skipped_count'] - 20} more (see manifest.json)")
    return "\n".join(lines)
