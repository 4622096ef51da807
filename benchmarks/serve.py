"""`c2d serve` under load: requests/s and latency for 1 and 2 replicas, batching on and off, and a
promotion in the middle of the load with no failed request.

    python benchmarks/serve.py [--quick] [--requests 48] [--clients 4] [--size 64]

Everything runs on this machine and talks to 127.0.0.1 only: a private Ray (`ray.init`, its own
temp dir), Ray Serve on a free loopback port, the embedded MLflow server (`srplatform.stack.up`
in a temp C2D_HOME, stopped at the end). The model is a tiny SwinIR-L (c2d) x2, registered twice
(two seeds) as `c2disr-swinir_l-c2d-x2`; version 1 is made champion with `c2d promote --force`.

Load test (bounded): `--clients` threads send `--requests` POST /upscale in total (the same
`--size` x `--size` RGB PNG, `--tile` LR tiles, so each request is several tiles), then stop.
Each configuration gets a fresh app and 2 warm-up requests per client first. Reported:
requests/s (completed / wall time), p50/p95/p99 latency, errors (non-200 or exceptions).
Configurations: replicas 1 and 2 (`--replica-cpus` each) x batching on (`--max-batch-size`, up
to 4 tiles per model call) and off (1).

Promotion: one replica following `models:/NAME@champion` with `--poll 1`; after a quarter of
`--promote-requests` requests, `c2d promote NAME --version 2 --force` moves the alias; the load
goes on to the end. Reported: requests, errors, which versions answered and the request index at
which version 2 first answered.

Writes benchmarks/results/serve.json ({"table": Markdown, "rows": [...], "promotion": {...},
"machine": ...}) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.common import finish, log  # noqa: E402

NAME = "c2disr-swinir_l-c2d-x2"


def _post(url: str, body: bytes, timeout: float = 300) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status, resp.headers.get("X-Model-Version", "")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return -1, ""


def load(url: str, body: bytes, *, requests: int, clients: int,
         on_progress=None) -> dict:
    """Send `requests` POSTs from `clients` threads; latency stats, errors and versions seen."""
    lock = threading.Lock()
    todo = iter(range(requests))
    done: list[tuple[int, float, int, str]] = []  # (index in completion order, latency, code, version)

    def worker():
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            t0 = time.perf_counter()
            code, version = _post(url, body)
            dt = time.perf_counter() - t0
            with lock:
                done.append((len(done), dt, code, version))
                n = len(done)
            if on_progress:
                on_progress(n)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array([d[1] for d in done]) * 1000.0
    ok = sum(1 for d in done if d[2] == 200)
    return {"requests": len(done), "ok": ok, "errors": len(done) - ok, "wall_s": round(wall, 2),
            "rps": round(ok / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "versions": [d[3] for d in done]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--requests", type=int, default=48, help="requests per configuration")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients")
    ap.add_argument("--size", type=int, default=64, help="input image side (LR pixels)")
    ap.add_argument("--tile", type=int, default=32, help="LR tile side (--size 64: 9 tiles per request)")
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--max-batch-size", type=int, default=4, help="batching on: tiles per model call")
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    ap.add_argument("--ray-cpus", type=float, default=2)
    ap.add_argument("--promote-requests", type=int, default=80)
    ap.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.promote_requests = 16, 40

    scratch = Path(tempfile.mkdtemp(prefix="c2d-bench-serve-"))
    os.environ["C2D_HOME"] = str(scratch / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")

    import mlflow
    import ray
    import torch
    from PIL import Image
    from ray import serve

    from c2disr.models import build_model
    from srplatform import registry, stack
    from srplatform import serve as srv
    from srplatform.cli import main as c2d
    from srplatform.mlmodel import log_sr_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(buf, format="PNG")
    body = buf.getvalue()
    bench = scratch / "bench"
    bench.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(bench / f"{i}.png")

    rows, promotion = [], {}
    state = None
    try:
        log("[serve] starting the MLflow server and registering two tiny models")
        state = stack.up(s3=False, quiet=True)
        uri = state["mlflow"]["tracking_uri"]
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bench-serve")
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = build_model("swinir_l", variant="c2d", flavor="tiny", scale=2).eval()
            with mlflow.start_run():
                info = log_sr_model(model)
            registry.register(info.model_uri, arch="swinir_l", variant="c2d", scale=2, metrics={},
                              config_hash="-", manifest_hash="-", parent_run_id=None, tracking_uri=uri)
        with contextlib.redirect_stdout(sys.stderr):  # stdout keeps only the table
            assert c2d(["promote", NAME, "--version", "1", "--force", "--reason", "benchmark",
                        "--data", str(bench), "--tracking-uri", uri]) == 0

        from srplatform.stack import free_port

        port = free_port()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False, _temp_dir=str(scratch / "ray"))
        common = dict(model=f"models:/{NAME}@champion", tracking_uri=uri, port=port,
                      num_cpus=args.replica_cpus, tile=args.tile, overlap=args.overlap,
                      max_ongoing_requests=16, app_name="bench")
        for replicas in (1, 2):
            for batching in (True, False):
                opts = srv.ServeOptions(num_replicas=replicas, poll_s=0,
                                        max_batch_size=args.max_batch_size if batching else 1, **common).check()
                log(f"[serve] replicas {replicas}, batching {'on' if batching else 'off'}: deploying")
                srv.deploy(opts, timeout=600)
                load(opts.url + "/upscale", body, requests=2 * args.clients, clients=args.clients)  # warm-up
                res = load(opts.url + "/upscale", body, requests=args.requests, clients=args.clients)
                res.pop("versions")
                row = {"replicas": replicas, "batching": "on" if batching else "off",
                       "max_batch_size": opts.max_batch_size, **res}
                log(f"[serve]   {row}")
                rows.append(row)
                serve.delete("bench")

        log("[serve] promotion under load")
        opts = srv.ServeOptions(num_replicas=1, poll_s=1.0, max_batch_size=args.max_batch_size, **common).check()
        srv.deploy(opts, timeout=600)
        load(opts.url + "/upscale", body, requests=2 * args.clients, clients=args.clients)
        fired = threading.Event()
        promote_rc = []

        def maybe_promote(n: int) -> None:
            if n >= args.promote_requests // 4 and not fired.is_set():
                fired.set()

                def go():
                    with contextlib.redirect_stdout(sys.stderr):
                        promote_rc.append(c2d(["promote", NAME, "--version", "2", "--force", "--reason",
                                               "benchmark: promotion under load", "--data",
                                               str(bench), "--tracking-uri", uri]))

                threading.Thread(target=go, daemon=True).start()

        res = load(opts.url + "/upscale", body, requests=args.promote_requests, clients=args.clients,
                   on_progress=maybe_promote)
        versions = res.pop("versions")
        first_v2 = next((i for i, v in enumerate(versions) if v == "2"), None)
        final = srv._http_json(opts.url + "/model") or {}
        promotion = {"requests": res["requests"], "errors": res["errors"], "rps": res["rps"],
                     "p99_ms": res["p99_ms"], "promote_exit": promote_rc[0] if promote_rc else None,
                     "answered_by_v1": versions.count("1"), "answered_by_v2": versions.count("2"),
                     "first_v2_at_request": first_v2, "version_after": final.get("version")}
        log(f"[serve]   {promotion}")
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            if state is not None:
                stack.down(quiet=True)

    lines = [f"Tiny SwinIR-L (c2d) x2, {args.size}x{args.size} PNG in ({args.tile}-pixel tiles, "
             f"overlap {args.overlap}), {args.requests} requests from {args.clients} clients, "
             f"{args.replica_cpus} CPU per replica, Ray with {args.ray_cpus:g} CPUs",
             "",
             "| replicas | batching | requests/s | p50 ms | p95 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['replicas']} | {r['batching']} (max {r['max_batch_size']}) | {r['rps']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']}/{r['requests']} |")
    p = promotion
    if p:
        lines += ["", f"Promotion under load (1 replica, batching on, poll 1 s): {p['requests']} requests, "
                      f"{p['errors']} failed; answered by v1 {p['answered_by_v1']}, by v2 {p['answered_by_v2']} "
                      f"(first at request {p['first_v2_at_request']}); /model after: version {p['version_after']}"]
    out = {"table": "\n".join(lines), "rows": rows, "promotion": promotion, "args": vars(args),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()}}
    rc = finish(out, args.out, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return rc if p.get("errors") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
