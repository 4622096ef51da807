"""Backbones x {plain, hit, c2d}: parameters, MACs, CPU latency and training-step time, with ratios
against the plain backbone measured in the same run; plus the C2D mode study (constant vs resample).

    python benchmarks/models.py [--quick] [--threads 1] [--archs swinir_l,srformer_l,mambairv2_l]

Per backbone and variant (light flavor, discrete head):
- params at x4 (and x2), MACs of one 1280x720-output forward at x4 and x2 (meta device,
  FlopCounterMode / 2; c2disr.complexity);
- CPU forward latency: batch 1, LR 64x64, x4, eval, no grad (median of --repeats);
- training step: batch 4, LR 48x48, x4, L1 + AdamW step (median of --repeats).
C2D mode study: params/MACs of c2d "constant" vs "resample" for every backbone, and a quality
proxy: tiny SwinIR models (plain, hit, c2d constant, c2d resample) trained for --proxy-steps
steps on the same T91 x2 batches, then PSNR-Y on Set5 x2 (bicubic as reference).

Writes benchmarks/results/models.json ({"table": Markdown, "rows": ..., "machine": ...}).
Timings use --threads torch threads (default 1: this 2-core machine is shared, and OpenMP
spinning under load makes multi-thread timings meaningless); ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from c2disr.complexity import count_macs, count_params, lr_size_for_output  # noqa: E402
from c2disr.models import ARCHS, VARIANTS, build_model  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, mask caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(arch: str, variant: str, args, overrides=None) -> dict:
    row = {"arch": arch, "variant": variant, "overrides": overrides or {}}
    for scale in (4, 2):
        with torch.device("meta"):
            model = build_model(arch, variant=variant, scale=scale, overrides=overrides)
        row[f"params_x{scale}"] = count_params(model)
        row[f"macs_x{scale}"] = count_macs(model, lr_size_for_output(scale))
    if args.no_timing:
        return row
    torch.manual_seed(0)
    model = build_model(arch, variant=variant, scale=4, overrides=overrides)
    model.eval()
    x = torch.rand(1, 3, args.lat_size, args.lat_size)
    with torch.no_grad():
        row["latency_s"] = timed(lambda: model(x), args.repeats)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_b = torch.rand(4, 3, args.train_size, args.train_size)
    hr_b = torch.rand(4, 3, 4 * args.train_size, 4 * args.train_size)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (model(lr_b) - hr_b).abs().mean()
        loss.backward()
        opt.step()

    row["train_step_s"] = timed(step, args.repeats)
    return row


# ----------------------------------------------------------------------------- quality proxy


def _load_rgb(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def quality_proxy(args) -> list[dict]:
    from c2disr.metrics import psnr, quantize
    from c2disr.ops.resize import imresize

    shared = Path(os.environ.get("C2D_SHARED", HERE.parent.parent / "shared")) / "data"
    if not (shared / "T91").is_dir() or not (shared / "Set5").is_dir():
        log(f"quality proxy skipped: no T91/Set5 under {shared}")
        return []
    train = [_load_rgb(p) for p in sorted((shared / "T91").glob("*.png"))]
    val = [_load_rgb(p) for p in sorted((shared / "Set5").glob("*.png"))]
    gen = torch.Generator().manual_seed(1234)
    patch, batch, scale = 64, 8, 2
    batches = []  # the same batches for every model
    for _ in range(args.proxy_steps):
        crops = []
        for _ in range(batch):
            img = train[int(torch.randint(len(train), (1,), generator=gen))]
            y = int(torch.randint(img.shape[1] - patch + 1, (1,), generator=gen))
            x = int(torch.randint(img.shape[2] - patch + 1, (1,), generator=gen))
            c = img[:, y : y + patch, x : x + patch]
            if torch.rand((), generator=gen) < 0.5:
                c = c.flip(-1)
            crops.append(c)
        hr = torch.stack(crops)
        batches.append((imresize(hr, 1 / scale), hr))
    val_pairs = []
    for hr in val:
        h, w = (hr.shape[1] // scale) * scale, (hr.shape[2] // scale) * scale
        hr = hr[:, :h, :w][None]
        val_pairs.append((imresize(hr, 1 / scale), hr))

    def evaluate(upscale) -> float:
        vals = [float(psnr(quantize(upscale(lr)), hr, scale)[0]) for lr, hr in val_pairs]
        return sum(vals) / len(vals)

    rows = [{"model": "bicubic", "psnr_set5_x2": evaluate(lambda lr: imresize(lr, scale)), "params": 0}]
    log(f"  bicubic: Set5 x2 PSNR-Y {rows[0]['psnr_set5_x2']:.2f} dB")
    configs = [
        ("plain", "plain", None),
        ("hit", "hit", None),
        ("c2d constant", "c2d", {"c2d_mode": "constant"}),
        ("c2d resample", "c2d", {"c2d_mode": "resample"}),
    ]
    for name, variant, ov in configs:
        torch.manual_seed(0)
        model = build_model("swinir_l", variant=variant, flavor="tiny", scale=scale, overrides=ov)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(batches))
        t0 = time.perf_counter()
        model.train()
        for lr, hr in batches:
            opt.zero_grad(set_to_none=True)
            (model(lr) - hr).abs().mean().backward()
            opt.step()
            sched.step()
        train_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            value = evaluate(model)
        with torch.device("meta"):
            meta = build_model("swinir_l", variant=variant, flavor="tiny", scale=scale, overrides=ov)
        rows.append(
            {
                "model": f"swinir_l tiny {name}",
                "psnr_set5_x2": value,
                "params": count_params(model),
                "macs_x2_1280x720": count_macs(meta, lr_size_for_output(2)),
                "train_s": train_s,
            }
        )
        log(f"  {name}: Set5 x2 PSNR-Y {value:.2f} dB after {len(batches)} steps ({train_s:.0f}s)")
    return rows


# ----------------------------------------------------------------------------- report


def _ratio(value, base) -> str:
    return f"{value / base:.2f}" if base else "-"


def tables(rows: list[dict], modes: list[dict], proxy: list[dict], args) -> str:
    out = [
        "### Backbones x variants (light, discrete head)",
        "",
        f"MACs: one forward producing 1280x720 (FlopCounterMode / 2, meta device). Latency: LR "
        f"{args.lat_size}x{args.lat_size} x4 batch 1; train step: batch 4, LR {args.train_size}x"
        f"{args.train_size} x4, L1 + AdamW; CPU, {args.threads} thread(s), median of {args.repeats}. "
        "Ratios are against the plain backbone of the same run.",
        "",
        "| backbone | variant | params x4 | MACs x4 (G) | MACs x2 (G) | latency (s) | train step (s) "
        "| params ratio | MACs x4 ratio | MACs x2 ratio | latency ratio | train ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['arch']} | {r['variant']} | not measured: {r['error']} |||||||||| |")
            continue
        base = next((b for b in rows if b["arch"] == r["arch"] and b["variant"] == "plain" and "error" not in b), None)
        lat, trn = r.get("latency_s"), r.get("train_step_s")
        out.append(
            f"| {r['arch']} | {r['variant']} | {r['params_x4']:,} | {r['macs_x4'] / 1e9:.1f} | "
            f"{r['macs_x2'] / 1e9:.1f} | {lat if lat is None else f'{lat:.3f}'} | "
            f"{trn if trn is None else f'{trn:.3f}'} | "
            + " | ".join(
                _ratio(r[k], base[k]) if base and r.get(k) is not None and base.get(k) else "-"
                for k in ("params_x4", "macs_x4", "macs_x2", "latency_s", "train_step_s")
            )
            + " |"
        )
    if modes:
        out += [
            "",
            "### C2D mode: constant resolution vs down/up-sampling around the bottleneck",
            "",
            "| backbone | c2d_mode | params x4 | MACs x4 (G) | MACs x2 (G) | MACs x4 vs constant |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in modes:
            if "error" in r:
                out.append(f"| {r['arch']} | {r['mode']} | not measured: {r['error']} |||| |")
                continue
            base = next(b for b in modes if b["arch"] == r["arch"] and b["mode"] == "constant")
            out.append(
                f"| {r['arch']} | {r['mode']} | {r['params_x4']:,} | {r['macs_x4'] / 1e9:.1f} | "
                f"{r['macs_x2'] / 1e9:.1f} | {_ratio(r['macs_x4'], base['macs_x4'])} |"
            )
    if proxy:
        steps = args.proxy_steps
        out += [
            "",
            f"### Quality proxy: tiny SwinIR, {steps} steps of batch 8 (64x64 HR crops of T91, x2), Set5 x2 PSNR-Y",
            "",
            "| model | params | MACs x2 (G) | Set5 x2 PSNR-Y (dB) | train time (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in proxy:
            macs = r.get("macs_x2_1280x720")
            out.append(
                f"| {r['model']} | {r['params']:,} | {'-' if macs is None else f'{macs / 1e9:.2f}'} | "
                f"{r['psnr_set5_x2']:.2f} | {r.get('train_s', 0):.0f} |"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 timing repeat, smaller inputs, 40 proxy steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timings")
    ap.add_argument("--archs", default=",".join(sorted(ARCHS)), help="comma-separated backbones")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats (median)")
    ap.add_argument("--proxy-steps", type=int, default=None, help="training steps of the quality proxy (0: skip)")
    ap.add_argument("--no-timing", action="store_true", help="params and MACs only")
    ap.add_argument("--out", default=str(HERE / "results" / "models.json"))
    ap.add_argument(
        "--update", action="store_true",
        help="keep the rows of backbones not measured now (and the proxy when --proxy-steps 0) from --out",
    )
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.lat_size, args.train_size = (32, 24) if args.quick else (64, 48)
    if args.proxy_steps is None:
        args.proxy_steps = 40 if args.quick else 400
    torch.set_num_threads(args.threads)
    archs = [a for a in args.archs.split(",") if a]
    t_start = time.time()

    rows, modes = [], []
    for arch in archs:
        for variant in VARIANTS:
            log(f"[{time.time() - t_start:6.0f}s] {arch} {variant} ...")
            try:
                r = measure(arch, variant, args)
            except Exception as exc:  # noqa: BLE001 - one broken backbone must not hide the others
                r = {"arch": arch, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:200]}
                log(f"    FAILED: {r['error']}")
            else:
                log(
                    f"    params {r['params_x4']:,}  MACs x4 {r['macs_x4'] / 1e9:.1f}G x2 {r['macs_x2'] / 1e9:.1f}G"
                    + (f"  latency {r['latency_s']:.3f}s  train {r['train_step_s']:.3f}s" if "latency_s" in r else "")
                )
            rows.append(r)
        for mode in ("constant", "resample"):
            ns = argparse.Namespace(**{**vars(args), "no_timing": True})
            try:
                r = measure(arch, "c2d", ns, overrides={"c2d_mode": mode})
                modes.append({"arch": arch, "mode": mode, **{k: r[k] for k in r if k.startswith(("params", "macs"))}})
            except Exception as exc:  # noqa: BLE001
                modes.append({"arch": arch, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:200]})
    proxy = []
    if args.proxy_steps > 0:
        log(f"[{time.time() - t_start:6.0f}s] quality proxy ({args.proxy_steps} steps per model) ...")
        proxy = quality_proxy(args)

    out = Path(args.out)
    if args.update and out.is_file():
        old = json.loads(out.read_text())
        rows = [r for r in old.get("rows", []) if r["arch"] not in archs] + rows
        modes = [r for r in old.get("c2d_modes", []) if r["arch"] not in archs] + modes
        order = {a: i for i, a in enumerate(sorted(ARCHS))}
        rows.sort(key=lambda r: (order.get(r["arch"], 99), VARIANTS.index(r["variant"])))
        modes.sort(key=lambda r: order.get(r["arch"], 99))
        if not proxy:
            proxy = old.get("quality_proxy", [])
            args.proxy_steps = old.get("args", {}).get("proxy_steps", args.proxy_steps)
    table = tables(rows, modes, proxy, args)
    print("\n" + table)
    machine = (
        f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
        f"{args.threads} thread(s); quick={args.quick}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"table": table, "rows": rows, "c2d_modes": modes, "quality_proxy": proxy,
                               "machine": machine, "args": {k: v for k, v in vars(args).items()}}, indent=2))
    log(f"\nwrote {out} after {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
