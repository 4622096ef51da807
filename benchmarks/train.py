"""Training throughput: the platform's Ray Train loop on 1 and 2 workers against a plain
single-process PyTorch loop of the same model and step, all measured in one run.

    python benchmarks/train.py [--quick] [--src ../shared/data/T91]

What is measured (stage-1 steps: tiny C2D SwinIR-L with the continuous head, query-sampled L1,
Adam, EMA; the tiny job's patch and batch size):
- "plain PyTorch": one process, one torch thread, synthetic tensors of the training batch's
  shapes, the same step code (`sample_queries`, forward, backward, Adam, scheduler, EMA). No data
  loading: this is the compute-only lower bound of a step.
- "Ray Train, N workers": `srplatform.train.api.run_stage` (TorchTrainer, DDP over gloo, Ray Data
  streaming T91 shards, random scales in [1, 4]) with N = 1 and 2 workers of 0.75 CPU each (one
  torch thread each; the rest of the 2 CPUs runs the data tasks). Throughput is the loop's own
  `images_per_s` (global: all workers), the data-wait fraction its `data_wait_frac`, both from
  its progress reports in the second half of the run, median over report windows: the first
  tens of steps run beside the start-up of the Ray Data task processes (each imports torch),
  which takes CPU from training on a 2-core machine; that ramp is reported separately as the
  time from `fit()` to the first report window ("start-up").
Reported ratios: Ray 1 worker / plain (platform overhead), scaling efficiency
ips(2) / (2 * ips(1)), and each run's data-wait fraction.

The machine may be shared: the configurations alternate (plain, 1 worker, 2 workers, plain, ...)
for `--repeats` rounds so that load changes hit all of them, and the median over rounds is
reported, with the load average at start and end.

Writes benchmarks/results/train.json ({"table": Markdown, "rows": [...], "machine": ...}).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import finish, log  # noqa: E402


def machine() -> str:
    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), load average "
            f"{os.getloadavg()[0]:.1f} at start, torch {torch.__version__}")


def base_config(args, name: str, workers: int):
    from srplatform.config import load_config

    steps = args.steps
    return load_config(REPO / "jobs" / "configs" / "tiny.yaml", [
        f"name={name}", f"data.source={args.src}", "data.val=", f"pretrain.steps={steps}",
        "pretrain.warmup_steps=0", f"run.log_every={args.window}", f"run.checkpoint_every={steps}",
        f"run.val_every={steps}", f"resources.num_workers={workers}", "resources.cpus_per_worker=0.75",
    ])


def plain_loop(cfg, steps: int) -> dict:
    """The training step of srplatform.train.loop without Ray, DDP or data loading."""
    import torch
    import torch.nn.functional as F

    from srplatform.train.loop import build_stage_model, sample_queries, StageSpec
    from srplatform.train.optim import EMA, build_optimizer, build_scheduler

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_stage_model(cfg, StageSpec(kind="pretrain", run_name="plain"))
    opt = build_optimizer(model, cfg.pretrain)
    sched = build_scheduler(opt, cfg.pretrain)
    ema = EMA(model, cfg.pretrain.ema_decay)
    gen = torch.Generator().manual_seed(0)
    b, p = cfg.data.batch_size, cfg.data.patch
    big = round(p * cfg.data.scale_max)
    times = []
    for i in range(steps + 3):
        side = int(round(p * (1 + 3 * (i % 7) / 6)))  # a spread of scales, as the data has
        lr = torch.rand(b, 3, p, p)
        hr = torch.rand(b, 3, big, big)
        t0 = time.perf_counter()
        coords, cells, target = sample_queries(hr, torch.full((b,), side), p * p, gen)
        loss = F.l1_loss(model.query(lr, coords, cells), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
        if i >= 3:  # warm-up steps (allocator, first-call costs) are not timed
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"run": "plain PyTorch (1 process, 1 thread)", "workers": 1, "step_s": step,
            "images_per_s": b / step, "data_wait_frac": 0.0, "windows": len(times)}


def median_rows(rows: list[dict]) -> dict:
    """One row from repeated measurements of a configuration: medians of its numbers."""
    out = dict(rows[0])
    for key in ("step_s", "images_per_s", "data_wait_frac", "wall_s", "startup_s",
                "first_half_images_per_s"):
        if key in out:
            out[key] = statistics.median(r[key] for r in rows)
    out["repeats"] = len(rows)
    out["images_per_s_each"] = [r["images_per_s"] for r in rows]
    return out


def ray_run(cfg, data, workers: int) -> dict:
    from srplatform.tracking import Tracker
    from srplatform.train.api import run_stage

    events = []
    t0 = time.time()
    result = run_stage(cfg, kind="pretrain", data=data, tracker=Tracker(None),
                       on_event=lambda ev: events.append(ev) if ev["kind"] == "train" else None)
    wall = time.time() - t0
    if not result.ok:
        raise RuntimeError(result.error)
    total = cfg.pretrain.steps
    windows = [e for e in events if e["step"] > total / 2] or events  # steady state
    return {"run": f"Ray Train, {workers} worker(s)", "workers": workers,
            "step_s": statistics.median(e["step_time_s"] for e in windows),
            "images_per_s": statistics.median(e["images_per_s"] for e in windows),
            "data_wait_frac": statistics.median(e["data_wait_frac"] for e in windows),
            "windows": len(windows), "wall_s": wall,
            "startup_s": events[0]["time"] - t0 if events else float("nan"),
            "first_half_images_per_s": statistics.median(
                e["images_per_s"] for e in events if e["step"] <= total / 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "T91"),
                    help="HR images to pack and stream (default ../shared/data/T91)")
    ap.add_argument("--steps", type=int, default=None, help="steps per Ray run (default 160, quick 40)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 2, quick 1)")
    ap.add_argument("--out", default=str(HERE / "results" / "train.json"))
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.steps = args.steps or (40 if args.quick else 160)
    args.window = 4 if args.quick else 8
    if not Path(args.src).is_dir():
        log(f"no images at {args.src}: pass --src")
        return 2
    home = tempfile.mkdtemp(prefix="c2d-bench-train-")
    os.environ["C2D_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from srplatform.train.api import prepare_data, ray_session

    info = machine()
    cfg1 = base_config(args, "bench-w1", 1)
    measured: dict[str, list[dict]] = {"plain": [], "w1": [], "w2": []}
    with ray_session():
        data = prepare_data(cfg1, say=log)
        for rnd in range(args.repeats):
            log(f"round {rnd + 1}/{args.repeats}: plain PyTorch loop ...")
            measured["plain"].append(plain_loop(cfg1, args.steps))
            for workers in (1, 2):
                log(f"round {rnd + 1}/{args.repeats}: Ray Train, {workers} worker(s) ...")
                cfg = base_config(args, f"bench-w{workers}-r{rnd}", workers)
                measured[f"w{workers}"].append(ray_run(cfg, data, workers))
    rows = [median_rows(measured[k]) for k in ("plain", "w1", "w2")]
    info += f"; load average {os.getloadavg()[0]:.1f} at end"
    plain, w1, w2 = rows
    ratios = {
        "ray_1w_vs_plain": w1["images_per_s"] / plain["images_per_s"],
        "ray_2w_vs_plain": w2["images_per_s"] / plain["images_per_s"],
        "scaling_efficiency_2w": w2["images_per_s"] / (2 * w1["images_per_s"]),
    }
    lines = ["| run | images/s (steady) | step time (s) | data-wait | vs plain | first half images/s | start-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['first_half_images_per_s']:.1f} | {r['startup_s']:.0f}s"
                 if "startup_s" in r else "- | -")
        lines.append(f"| {r['run']} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | "
                     f"{r['data_wait_frac']:.0%} | {r['images_per_s'] / plain['images_per_s']:.2f}x | {extra} |")
    lines += ["", f"Scaling efficiency 1 -> 2 workers: {ratios['scaling_efficiency_2w']:.2f} "
              "(images/s of 2 workers / twice that of 1). "
              f"Stage-1 steps, batch {cfg1.data.batch_size} per worker, LR patch {cfg1.data.patch}, "
              f"{args.steps} steps per run; steady = median over the report windows ({args.window} "
              "steps) of the second half; start-up = fit() to the first report; median of "
              f"{args.repeats} alternating round(s)."]
    out = {"table": "\n".join(lines), "rows": rows, "ratios": ratios, "machine": info,
           "quick": args.quick, "steps": args.steps, "repeats": args.repeats}
    return finish(out, args.out, home)


if __name__ == "__main__":
    sys.exit(main())
