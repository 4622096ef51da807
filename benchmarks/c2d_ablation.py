"""C2D ablation at small scale, several seeds per arm: does continuous pretraining help the
discrete models on the same step budget, and how do the plain, HiT-style and C2D encodings compare?

    python benchmarks/c2d_ablation.py [--quick] [--steps N] [--seeds 3] [--jobs 2]

Arms (tiny SwinIR-L, T91 training images, the same optimiser settings for every discrete stage):
- "discrete only": a fresh backbone with the pixel-shuffle head of the platform's stage 2
  (bilinear base, least-squares start) trained 2N steps at each scale;
- "C2D": N steps of continuous-scale pretraining (implicit head, scales in [1, 4]), then the
  backbone with a fitted pixel-shuffle head fine-tuned N steps at each scale, for each of the
  variants plain, hit and c2d;
- "continuous (stage 1)": the stage-1 model of the c2d variant itself, rendered at x2 and x4.
Training runs in the reference trainer (`benchmarks/reference.py`: the platform's model, data
transform, step and optimiser in a plain loop; `reference.py --compare` shows it reaches the
platform's validation PSNR), so the seeds can run side by side without Ray's start-up per run.

Evaluation: PSNR/SSIM (Y, border = scale, uint8 rounding: `c2disr.evaluate.evaluate_folder`) of
the EMA weights on Set5 and Set14, which no arm trains or validates on, with bicubic beside them.
Reported per arm: mean and sample standard deviation over the seeds.

Writes benchmarks/results/c2d_ablation.json ({"table": Markdown, "runs": [...], ...}).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import finish, log  # noqa: E402

SETS = ("Set5", "Set14")


def config(steps: int, seed: int, variant: str):
    from srplatform.config import load_config

    return load_config(REPO / "jobs" / "configs" / "tiny.yaml", [
        f"seed={seed}", f"model.variant={variant}", "data.patch=24", "data.batch_size=4",
        "resources.num_workers=2", f"pretrain.steps={steps}", "pretrain.lr=4e-4",
        f"pretrain.l2_steps={min(100, steps // 3)}", "pretrain.warmup_steps=20",
        "pretrain.ema_decay=0.99", f"finetune.steps={steps}", "finetune.lr=2e-4",
        "finetune.warmup_steps=20", "finetune.ema_decay=0.99",
        f"run.log_every={max(1, steps // 3)}"])


def training_samples(folder: Path, min_side: int) -> list[dict]:
    from io import BytesIO

    from PIL import Image

    from c2disr.evaluate import list_images

    out = []
    for path in list_images(folder):
        data = path.read_bytes()
        if min(Image.open(BytesIO(data)).size) >= min_side:
            out.append({"key": path.stem, "image": data})
    return out


def evaluate(model, bench: Path, scales) -> dict:
    import torch

    from c2disr.evaluate import evaluate_folder

    model.eval()
    out = {}
    for s in scales:
        fn = model if not model.continuous else (
            lambda x, s=s: model(x, out_size=(x.shape[-2] * s, x.shape[-1] * s)))
        with torch.no_grad():
            for name in SETS:
                r = evaluate_folder(fn, bench / name, s)
                out[f"x{s}/{name}"] = {"psnr": r["psnr"], "ssim": r["ssim"]}
    return out


def one_job(job: dict) -> list[dict]:
    """One seed of one arm (all its scales); runs in a worker process with one torch thread."""
    import torch

    from benchmarks.reference import train
    from c2disr.models import build_model

    torch.set_num_threads(1)
    n, seed, variant, arm = job["steps"], job["seed"], job["variant"], job["arm"]
    bench, scales = Path(job["bench"]), job["scales"]
    cfg = config(n, seed, variant)
    samples = training_samples(Path(job["src"]), round(cfg.data.patch * cfg.data.scale_max))
    quiet = lambda m: None  # noqa: E731
    rows, t0 = [], time.perf_counter()
    if arm == "discrete only":
        long = config(2 * n, seed, variant)
        torch.manual_seed(seed)
        fresh = build_model(cfg.model.arch, variant=variant, flavor=cfg.model.flavor, head="continuous")
        for s in scales:
            res = train(long, kind="finetune", samples=samples, scale=s, init=fresh, say=quiet)
            rows.append({"arm": arm, "variant": variant, "seed": seed, "scale": s,
                         "steps": f"{2 * n} x{s}", **evaluate(res["ema"], bench, [s])})
    else:
        pre = train(cfg, kind="pretrain", samples=samples, say=quiet)
        if job.get("continuous_row"):
            rows.append({"arm": "continuous (stage 1)", "variant": variant, "seed": seed, "scale": 0,
                         "steps": f"{n} continuous", **evaluate(pre["ema"], bench, scales)})
        for s in scales:
            res = train(cfg, kind="finetune", samples=samples, scale=s, init=pre["ema"], say=quiet)
            rows.append({"arm": arm, "variant": variant, "seed": seed, "scale": s,
                         "steps": f"{n} continuous + {n} x{s}", **evaluate(res["ema"], bench, [s])})
    for r in rows:
        r["seconds"] = time.perf_counter() - t0
    return rows


def bicubic(bench: Path, scales) -> dict:
    from c2disr.evaluate import evaluate_folder
    from c2disr.ops.resize import imresize

    return {f"x{s}/{name}": evaluate_folder(lambda x, s=s: imresize(x, scale=s), bench / name, s)["psnr"]
            for s in scales for name in SETS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 20, 1 seed, x2 only (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="N (default 300; quick 20)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; quick 1)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default 2)")
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "T91"))
    ap.add_argument("--bench", default=str(REPO.parent / "shared" / "data"),
                    help="folder holding Set5/ and Set14/")
    ap.add_argument("--out", default=str(HERE / "results" / "c2d_ablation.json"))
    args = ap.parse_args(argv)
    n = args.steps or (20 if args.quick else 300)
    seeds = args.seeds or (1 if args.quick else 3)
    scales = [2] if args.quick else [2, 4]
    bench = Path(args.bench)
    if not Path(args.src).is_dir() or not all((bench / s).is_dir() for s in SETS):
        log(f"need training images at {args.src} and Set5/Set14 under {bench}")
        return 2
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    common = {"steps": n, "bench": str(bench), "src": args.src, "scales": scales}
    jobs = []
    for seed in range(seeds):
        jobs.append({**common, "seed": seed, "variant": "c2d", "arm": "C2D", "continuous_row": True})
        jobs.append({**common, "seed": seed, "variant": "c2d", "arm": "discrete only"})
        jobs += [{**common, "seed": seed, "variant": v, "arm": "C2D"} for v in ("plain", "hit")]
    log(f"{len(jobs)} runs (N = {n}, {seeds} seed(s), scales {scales}), {args.jobs} at a time ...")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    runs: list[dict] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for i, rows in enumerate(pool.map(one_job, jobs)):
            runs += rows
            log(f"  run {i + 1}/{len(jobs)} done ({time.perf_counter() - t0:.0f}s)")
    ref = bicubic(bench, scales)

    cols = [f"x{s}/{name}" for s in scales for name in SETS]
    arms = [("bicubic", None, None), ("continuous (stage 1)", "c2d", None),
            ("discrete only", "c2d", 2 * n), ("C2D", "c2d", n), ("C2D", "hit", n), ("C2D", "plain", n)]
    lines = ["| arm | variant | steps | " + " | ".join(c.replace("/", " ") for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    summary = {}
    for arm, variant, steps in arms:
        cells = []
        for c in cols:
            if arm == "bicubic":
                cells.append(f"{ref[c]:.2f}")
                continue
            s = int(c.split("/")[0][1:])
            vals = [r[c]["psnr"] for r in runs if r["arm"] == arm and r["variant"] == variant
                    and c in r and (r["scale"] in (0, s))]
            if not vals:
                cells.append("-")
                continue
            mean = statistics.fmean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary[f"{arm}/{variant}/{c}"] = {"mean": mean, "sd": sd, "n": len(vals),
                                               "gain_vs_bicubic": mean - ref[c]}
            cells.append(f"{mean:.2f} ± {sd:.2f}")
        label = {"bicubic": "-", "continuous (stage 1)": f"{n} continuous",
                 "discrete only": f"{2 * n} per scale", "C2D": f"{n} + {n} per scale"}[arm]
        lines.append(f"| {arm} | {variant or '-'} | {label} | " + " | ".join(cells) + " |")

    def gap(a: str, b: str, c: str) -> float:
        return summary[a + "/" + c]["mean"] - summary[b + "/" + c]["mean"]

    lines += ["", "PSNR (dB, Y) mean ± sample s.d. over " + f"{seeds} seed(s) per arm; tiny SwinIR-L, "
              f"T91, LR patch 24, 2 x 4 patches per step, Adam, lr 4e-4 (continuous, L2 for the first "
              f"{min(100, n // 3)} steps, then L1) and 2e-4 (discrete, L1) with 20 warm-up steps and "
              "cosine decay, EMA 0.99; every discrete model adds the bilinear base and starts from "
              "its least-squares head. "
              "Differences of the means (dB): "
              + "; ".join(f"{c.replace('/', ' ')}: C2D - discrete-only {gap('C2D/c2d', 'discrete only/c2d', c):+.2f}, "
                          f"c2d - plain {gap('C2D/c2d', 'C2D/plain', c):+.2f}, "
                          f"c2d - hit {gap('C2D/c2d', 'C2D/hit', c):+.2f}" for c in cols) + "."]
    out = {"table": "\n".join(lines), "summary": summary, "runs": runs, "bicubic": ref,
           "steps_n": n, "seeds": seeds, "quick": args.quick, "seconds": time.perf_counter() - t0,
           "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load:.1f} at start"}
    return finish(out, args.out)


if __name__ == "__main__":
    sys.exit(main())
