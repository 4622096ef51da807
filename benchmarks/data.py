"""Data plane throughput: LR/HR training pairs per second from the same WebDataset shards,
through the Ray Data pipeline and through a plain PyTorch DataLoader, on file:// and s3://;
and MATLAB-bicubic `imresize` against PIL's bicubic resize for the same output.

    python benchmarks/data.py [--quick] [--src ../shared/data/T91]

What is compared (same run, same shards, same CPUs):
- "Ray Data": `srplatform.data.pipeline.train_dataset` (read_webdataset + the fused pairs task,
  all timed epochs chained in one dataset) on `ray.init(num_cpus=2,
  _system_config=RAY_SYSTEM_CONFIG)`, consumed with `iter_torch_batches` as a Ray Train worker
  would. Several `num_cpus` per task are measured (how many tasks share the 2 CPUs); the full
  run adds 0.25 CPU/task on a Ray with default worker settings and a 3 s consumer pause before
  each run (as a slower training step makes), to show what the setting does.
- "DataLoader": webdataset's own `WebDataset` reader over the same shard URLs (s3:// opened
  by a streaming boto3 GET per worker process, registered as a webdataset URL scheme), the same
  per-batch transform (`make_pairs`, one scale per batch), `torch.utils.data.DataLoader` with
  2 worker processes (persistent), batches of the same size.
Each configuration first runs one untimed warm-up of the same length (worker start-up,
imports), then the timed epochs; configurations alternate repeat by repeat so load changes on
this shared machine hit all of them alike, and the median is reported.
- "resize": a batch of HR crops (float32, S x S) to p x p LR: `c2disr.ops.resize.imresize`
  (batched, one torch thread) vs PIL `Image.resize(..., BICUBIC)` per image on uint8 RGB and on
  float32 ("F", per channel) images.

The S3 endpoint is a moto server started here on 127.0.0.1 (a free port) and stopped at the end.
Writes benchmarks/results/data.json ({"table": Markdown, "rows": [...], "machine": ...}).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from srplatform import storage  # noqa: E402
from srplatform.data.pack import pack  # noqa: E402
from srplatform.data.pipeline import (  # noqa: E402
    RAY_SYSTEM_CONFIG,
    make_pairs,
    normalise_sample,
    shard_uris,
)

BUCKET = "c2d-bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# S3 endpoint
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """A moto S3 server on 127.0.0.1 for the length of the benchmark."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.settings = {"endpoint_url": self.endpoint, "access_key": "bench-access-key",
                         "secret_key": "bench-secret-key", "region": "us-east-1"}

    def __enter__(self) -> MotoServer:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("moto_server exited at start-up") from None
                time.sleep(0.3)
        storage.create_bucket(f"s3://{BUCKET}", self.settings)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------------------
# DataLoader baseline
# --------------------------------------------------------------------------------------

_S3_SETTINGS: dict | None = None
_CLIENTS: dict[int, object] = {}


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset URL handler for s3://: a streaming GET with a boto3 client made in this
    process (DataLoader workers are forked, and the AWS C++ SDK under pyarrow is not fork-safe;
    boto3 per worker is also what a plain PyTorch setup would use)."""
    client = _CLIENTS.get(os.getpid())
    if client is None:
        client = _CLIENTS[os.getpid()] = storage.boto3_client(_S3_SETTINGS)
    u = storage.parse_uri(url)
    return client.get_object(Bucket=u.bucket, Key=u.key)["Body"]


def _collate_raw(samples: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([s[k] for s in samples], dtype=object) for k in ("key", "url", "image")}


def _pairs(batch: dict, **options) -> dict[str, np.ndarray]:
    return make_pairs(batch, **options)


def dataloader_epoch(urls: list[str], *, patch: int, batch_size: int, workers: int,
                     loader_cache: dict) -> int:
    """One epoch through DataLoader(WebDataset(...)); returns the number of pairs."""
    key = (tuple(urls), patch, batch_size, workers)
    loader = loader_cache.get(key)
    if loader is None:
        import importlib

        import webdataset as wds

        # `import webdataset.gopen as m` yields the gopen *function* (the package re-exports
        # it under the module's name); the module holds the scheme table.
        importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3
        ds = (
            wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .map(normalise_sample)
            .batched(batch_size, collation_fn=_collate_raw, partial=True)
            .map(functools.partial(_pairs, patch=patch, scale_min=1.0, scale_max=4.0))
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                             persistent_workers=True, prefetch_factor=2)
        loader_cache[key] = loader
    n = 0
    for batch in loader:
        n += int(batch["lr"].shape[0])
    return n


# --------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------


def ray_epoch(uri: str, *, patch: int, batch_size: int, num_cpus: float, settings, epoch: int,
              epochs: int) -> int:
    from srplatform.data.pipeline import train_dataset

    ds = train_dataset(uri, patch=patch, batch_size=batch_size, num_cpus=num_cpus,
                       settings=settings, epoch=epoch, epochs=epochs)
    n = 0
    for batch in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
        n += int(batch["lr"].shape[0])
    return n


# --------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------


def resize_bench(*, batch: int, side: int, patch: int, repeats: int) -> list[dict]:
    from PIL import Image

    from c2disr.ops.resize import imresize

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    hr_u8 = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    hr = torch.from_numpy(hr_u8).permute(0, 3, 1, 2).float() / 255

    def t_torch():
        imresize(hr, size=(patch, patch))

    pil_u8 = [Image.fromarray(x) for x in hr_u8]
    pil_f = [[Image.fromarray(x[..., c].astype(np.float32) / 255, "F") for c in range(3)]
             for x in hr_u8]

    def t_pil_u8():
        for im in pil_u8:
            im.resize((patch, patch), Image.BICUBIC)

    def t_pil_f():
        for chans in pil_f:
            for im in chans:
                im.resize((patch, patch), Image.BICUBIC)

    def t_interp():  # torch's own antialiased bicubic: not MATLAB's borders, for context only
        torch.nn.functional.interpolate(hr, size=(patch, patch), mode="bicubic",
                                        antialias=True, align_corners=False)

    out = []
    for name, fn in (("imresize (torch, batched, float32)", t_torch),
                     ("PIL bicubic, uint8 RGB", t_pil_u8),
                     ("PIL bicubic, float32 per channel", t_pil_f),
                     ("torch interpolate bicubic+antialias (not MATLAB), batched", t_interp)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append({"what": name, "ms_per_image": 1000 * statistics.median(times) / batch})
    return out


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and repeats (~2 min)")
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "T91"),
                    help="folder of HR images to pack")
    ap.add_argument("--patch", type=int, default=32, help="LR patch side")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--min-shards", type=int, default=8,
                    help="pack option: at least this many shards (fewer = longer tasks)")
    ap.add_argument("--epochs", type=int, default=None, help="timed epochs per measurement")
    ap.add_argument("--repeats", type=int, default=None, help="alternating repeats")
    ap.add_argument("--num-cpus", default="0.25,0.5,1",
                    help="Ray num_cpus per task to measure")
    ap.add_argument("--no-default-ray", action="store_true",
                    help="skip the extra run with Ray's default worker settings (slow)")
    ap.add_argument("--out", default=str(HERE / "results" / "data.json"))
    args = ap.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 3)
    cpus = [float(x) for x in args.num_cpus.split(",") if x]
    patch, bs = args.patch, args.batch_size
    if not Path(args.src).is_dir():
        log(f"no images at {args.src}: pass --src FOLDER")
        return 2

    import ray

    work = Path(tempfile.mkdtemp(prefix="c2d-bench-data-"))
    rows: list[dict] = []
    try:
        with MotoServer() as s3:
            global _S3_SETTINGS
            _S3_SETTINGS = s3.settings
            min_size = int(round(patch * 4.0))
            local = str(work / "shards")
            remote = f"s3://{BUCKET}/shards"
            m = pack(args.src, local, min_size=min_size, min_shards=args.min_shards,
                     progress=False)
            pack(args.src, remote, min_size=min_size, min_shards=args.min_shards,
                 settings=s3.settings, progress=False)
            n_img = m["samples"]
            log(f"packed {n_img} images ({m['bytes'] / 1e6:.1f} MB, {len(m['shards'])} shards)")

            configs = []
            for where, uri, st in (("file://", local, None), ("s3://", remote, s3.settings)):
                urls = shard_uris(uri, st)
                urls = [storage.parse_uri(u).key if u.startswith("file://") else u for u in urls]
                cache: dict = {}
                configs.append((where, "DataLoader + WebDataset (2 workers)",
                                functools.partial(_dl_epochs, urls, patch=patch, batch_size=bs,
                                                  cache=cache)))
                for c in cpus:
                    configs.append((where, f"Ray Data (num_cpus={c:g}/task)",
                                    functools.partial(ray_epoch, uri, patch=patch, batch_size=bs,
                                                      num_cpus=c, settings=st)))
            # Warm-up: worker start-up, imports, first reads. DataLoader workers are forked
            # before Ray starts its threads (forking a threaded process is asking for trouble).
            ray_started = False
            for where, name, fn in sorted(configs, key=lambda c: c[1].startswith("Ray")):
                if name.startswith("Ray") and not ray_started:
                    start_ray(RAY_SYSTEM_CONFIG)
                    ray_started = True
                t0 = time.perf_counter()
                # As many epochs as a timed run: at 0.25 CPU/task the worker count only
                # reaches its steady state when that many tasks can be in flight.
                fn(epoch=0, epochs=epochs)
                log(f"warm-up {where} {name}: {time.perf_counter() - t0:.1f} s")
            times: dict[tuple, list[float]] = {}
            counts: dict[tuple, int] = {}
            for r in range(repeats):
                for where, name, fn in configs:
                    t0 = time.perf_counter()
                    n = fn(epoch=1 + r * epochs, epochs=epochs)
                    dt = time.perf_counter() - t0
                    times.setdefault((where, name), []).append(dt)
                    counts[(where, name)] = n
                    log(f"repeat {r}: {where} {name}: {n} pairs in {dt:.2f} s = {n / dt:.0f}/s")
            ray.shutdown()
            if not (args.quick or args.no_default_ray):
                # The same pipeline on a Ray started with its default worker settings: shows
                # what RAY_SYSTEM_CONFIG is for (idle task workers killed and restarted).
                start_ray({})
                name = ("Ray Data (num_cpus=0.25/task), Ray default worker settings, "
                        "3 s pause before each run")
                fn = functools.partial(ray_epoch, local, patch=patch, batch_size=bs,
                                       num_cpus=0.25, settings=None)
                fn(epoch=0, epochs=epochs)
                for r in range(repeats):
                    # A consumer pause, as a training step slower than the data makes (and as
                    # the other configurations' turns make in the alternating runs above).
                    time.sleep(3)
                    t0 = time.perf_counter()
                    n = fn(epoch=1 + r * epochs, epochs=epochs)
                    dt = time.perf_counter() - t0
                    times.setdefault(("file://", name), []).append(dt)
                    counts[("file://", name)] = n
                    log(f"repeat {r}: file:// {name}: {n} pairs in {dt:.2f} s = {n / dt:.0f}/s")
                ray.shutdown()
            for where in ("file://", "s3://"):
                base_key = (where, "DataLoader + WebDataset (2 workers)")
                base = counts[base_key] / statistics.median(times[base_key])
                for (w, name), ts in times.items():
                    if w != where:
                        continue
                    rate = counts[(w, name)] / statistics.median(ts)
                    rows.append({"section": "pairs", "storage": w, "pipeline": name,
                                 "pairs": counts[(w, name)], "seconds": statistics.median(ts),
                                 "pairs_per_s": rate, "ratio_vs_dataloader": rate / base})
        for r in resize_bench(batch=bs, side=int(round(patch * 4)), patch=patch,
                              repeats=5 if args.quick else 20):
            rows.append({"section": "resize", **r})
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    pil = next(r for r in rows if r.get("what") == "PIL bicubic, uint8 RGB")["ms_per_image"]
    for r in rows:
        if r["section"] == "resize":
            r["ratio_vs_pil_uint8"] = r["ms_per_image"] / pil
    table = [
        f"Pairs: {n_img} images of {Path(args.src).name}, LR {patch}x{patch}, scale ~ U[1, 4] "
        f"(HR up to "
        f"{int(round(patch * 4))}), batch {bs}, {epochs} epochs per measurement, median of "
        f"{repeats}; {len(m['shards'])} shards of ~{m['samples'] // len(m['shards'])} images; "
        "2 CPUs for either pipeline.",
        "",
        "| storage | pipeline | pairs/s | vs DataLoader |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        if r["section"] == "pairs":
            table.append(f"| {r['storage']} | {r['pipeline']} | {r['pairs_per_s']:.0f} | "
                         f"{r['ratio_vs_dataloader']:.2f}x |")
    table += [
        "",
        f"Resize: {bs} HR crops {int(round(patch * 4))}^2 -> {patch}^2, one thread.",
        "",
        "| resize | ms / image | vs PIL uint8 |",
        "|---|---:|---:|",
    ]
    for r in rows:
        if r["section"] == "resize":
            table.append(f"| {r['what']} | {r['ms_per_image']:.3f} | "
                         f"{r['ratio_vs_pil_uint8']:.2f}x |")
    text = "\n".join(table)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "table": text,
        "rows": rows,
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, torch {torch.__version__}",
        "args": vars(args),
    }, indent=1))
    log(f"wrote {out}")
    return 0


def start_ray(system_config: dict) -> None:
    import ray
    import ray.data

    # address="local": always a fresh local Ray, never a cluster someone else started here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _system_config=system_config)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _dl_epochs(urls, *, patch, batch_size, cache, epoch, epochs) -> int:
    return sum(dataloader_epoch(urls, patch=patch, batch_size=batch_size, workers=2,
                                loader_cache=cache) for _ in range(epochs))


if __name__ == "__main__":
    sys.exit(main())
