"""A reference trainer: both C2D stages as a plain single-process PyTorch loop, to measure the
platform against (no Ray, no MLflow, no DDP).

    python benchmarks/reference.py [--quick] [--config jobs/configs/tiny.yaml] [--set k=v ...]

It trains what the platform trains, the way the platform trains it, with none of its machinery:
- the same model and initial weights (`build_stage_model` after `torch.manual_seed(cfg.seed)`);
- the same batches: the platform runs with `data.deterministic` on (forced here), so every
  worker's batches are a pure function of the shards and the seed (`batch_plan`); the reference
  makes exactly those batches, worker by worker, with `local_stream` (the shards read with
  `tarfile`, not Ray Data; pairs cut by the platform's own transform `make_pairs`: one scale per
  batch, MATLAB bicubic LR, flips/transposes, seeded per (seed, epoch, batch));
- the same step: `num_workers` batches of `batch_size` per step (simulated rank r takes worker
  r's stream), whose mean loss is what DDP averages; query sampling (`sample_queries`, one
  generator per simulated rank seeded as the workers seed theirs), the loss (`stage_loss`), the
  optimiser, schedule, clipping and EMA of `srplatform.train.optim`; stage 2 starts from
  `to_discrete` with the head fitted by least squares on every rank's first batches;
- the same validation (`srplatform.train.loop.validate` on `val_pairs`).
What differs is the machinery only (Ray Train workers, DDP's gradient all-reduce, Ray Data
tasks, checkpoints), so the two trainers' losses agree step by step to float rounding, and
their PSNRs should agree to a few hundredths of a dB.

`--compare` (the default) also runs the platform's `run_stage` (Ray Train + Ray Data) on the same
config and prints, per stage, bicubic, the reference, the platform and their difference; stage 2
of both starts from the platform's stage-1 model, so each stage is compared on its own.
Writes benchmarks/results/reference.json.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import finish, log  # noqa: E402

QUICK = ["pretrain.steps=40", "finetune.steps=20", "run.val_every=20"]


def read_samples(uri: str) -> list[list[dict[str, Any]]]:
    """Every shard's samples ({"key", "image"}: bytes of its image member), in shard order."""
    from srplatform.data.pipeline import read_shard, shard_uris

    return [read_shard(shard) for shard in shard_uris(uri)]


def rank_streams(shards: list[list[dict[str, Any]]], *, cfg, kind: str, scale: int | None,
                 seed: int) -> list[Iterator[dict[str, Any]]]:
    """Endless training batches of `data.batch_size` (torch tensors) per simulated worker: what
    the platform's worker r reads with `data.deterministic` on (same epochs and crops plan)."""
    import torch

    from srplatform.data.pipeline import local_stream
    from srplatform.train.api import plan_epochs

    d = cfg.data
    section = cfg.pretrain if kind == "pretrain" else cfg.finetune
    world = cfg.resources.num_workers
    epochs, crops = plan_epochs(samples=sum(map(len, shards)), batch_size=d.batch_size,
                                workers=world, steps_left=section.steps)

    def one(rank: int) -> Iterator[dict[str, Any]]:
        for b in local_stream(shards, rank=rank, world=world, batch_size=d.batch_size, seed=seed,
                              epoch=0, epochs=epochs, crops=crops, patch=d.patch,
                              scale_min=d.scale_min, scale_max=d.scale_max,
                              fixed_scale=scale if kind == "finetune" else None):
            yield {k: torch.from_numpy(v) for k, v in b.items()}

    return [one(r) for r in range(world)]


def as_shards(samples: list) -> list[list[dict[str, Any]]]:
    """`samples` as shards: a list of shards as is; a flat list of samples as one-sample shards,
    so that the seeded shard order of every epoch is a full reshuffle of the samples."""
    if samples and isinstance(samples[0], dict):
        return [[s] for s in samples]
    return samples


def pair_stream(samples: list, *, cfg, kind: str, scale: int | None, seed: int,
                rank: int = 0) -> Iterator[dict[str, Any]]:
    """Endless training batches (torch tensors) of simulated worker `rank` (see `rank_streams`)."""
    return rank_streams(as_shards(samples), cfg=cfg, kind=kind, scale=scale, seed=seed)[rank]


def train(cfg, *, kind: str, samples: list, scale: int | None = None,
          init: Any = None, val: dict[int, list] | None = None,
          say: Callable[[str], None] = log) -> dict[str, Any]:
    """One stage, plain PyTorch. `samples`: the shards' samples (`read_samples`) or a flat list
    of samples (see `as_shards`). `init`: the stage-1 model (finetune). Returns {"model", "ema",
    "history": [(step, loss)], "metrics": last validation, "val": [(step, metrics)],
    "seconds"}."""
    import torch

    from c2disr.models import build_model, to_discrete
    from srplatform.train.loop import fit_head_on_batches, sample_queries, validate
    from srplatform.train.optim import EMA, build_optimizer, build_scheduler, stage_loss

    section = cfg.pretrain if kind == "pretrain" else cfg.finetune
    world = cfg.resources.num_workers
    torch.manual_seed(cfg.seed)
    if kind == "pretrain":
        m = cfg.model
        model = build_model(m.arch, variant=m.variant, flavor=m.flavor, head="continuous",
                            overrides=m.overrides or None, head_overrides=m.head_overrides or None)
    else:
        model = to_discrete(init, int(scale), residual=cfg.finetune.residual)
    data_seed = cfg.seed + (0 if kind == "pretrain" else 1000 * int(scale))
    streams = rank_streams(as_shards(samples), cfg=cfg, kind=kind, scale=scale, seed=data_seed)
    samplers = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + r) for r in range(world)]
    optimizer = build_optimizer(model, section)
    scheduler = build_scheduler(optimizer, section)
    first: list[dict[str, Any]] = []
    if kind == "finetune" and cfg.finetune.head_init == "lstsq":
        # every simulated rank's first head_fit_batches batches, as the platform's workers
        firsts = [list(itertools.islice(st, cfg.finetune.head_fit_batches)) for st in streams]
        fit_head_on_batches(model, [b for f in firsts for b in f], int(scale), cfg.data.patch,
                            torch.device("cpu"), lambda t: t)
        streams = [itertools.chain(f, st) for f, st in zip(firsts, streams)]
    ema = EMA(model, section.ema_decay) if section.ema_decay > 0 else None
    q = cfg.data.patch * cfg.data.patch
    history, vals, metrics = [], [], {}
    t0 = time.perf_counter()
    model.train()

    def evaluate(step: int) -> dict[str, float]:
        models = {"": model, **({"ema": ema.module} if ema is not None else {})}
        model.eval()
        got, _ = validate(models, val, rank=0, world=1, device=torch.device("cpu"),
                          allreduce=lambda t: t)
        model.train()
        vals.append((step, got))
        return got

    for step in range(1, section.steps + 1):
        losses, shown = [], []
        for rank in range(world):
            batch = next(streams[rank])
            if kind == "pretrain":
                coords, cells, target = sample_queries(batch["hr"], batch["hr_size"], q, samplers[rank])
                pred = model.query(batch["lr"], coords, cells)
            else:
                side = int(batch["hr_size"][0])
                target = batch["hr"][..., :side, :side]
                pred = model(batch["lr"])
            objective, l1 = stage_loss(pred, target, step=step - 1, section=section)
            losses.append(objective)
            shown.append(l1)
        loss = torch.stack(losses).mean()  # DDP averages the ranks' gradients
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if section.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        history.append((step, float(torch.stack(shown).mean())))
        if step % cfg.run.log_every == 0:  # the mean over the window, as the platform logs it
            shown_mean = sum(v for _, v in history[-cfg.run.log_every:]) / cfg.run.log_every
            say(f"  reference {kind}{'' if scale is None else f' x{scale}'} step {step}/{section.steps} "
                f"loss {shown_mean:.4f}")
        if val and (step % cfg.run.val_every == 0 or step == section.steps):
            metrics = evaluate(step)
    return {"model": model, "ema": ema.module if ema is not None else model, "history": history,
            "metrics": metrics, "val": vals, "seconds": time.perf_counter() - t0}


def bicubic_metrics(val: dict[int, list]) -> dict[int, float]:
    """Bicubic PSNR on the validation pairs, with the same measurement as the trainers."""
    from c2disr.ops.resize import imresize
    from srplatform.train.loop import measure

    return {s: sum(measure(imresize(lr, scale=s), hr, s)[0] for _, lr, hr in pairs) / len(pairs)
            for s, pairs in val.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "jobs" / "configs" / "tiny.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as for `c2d pipeline` (repeatable)")
    ap.add_argument("--scale", type=int, default=2, help="the stage-2 scale compared (default 2)")
    ap.add_argument("--quick", action="store_true", help="a smoke run (40 + 20 steps)")
    ap.add_argument("--no-compare", dest="compare", action="store_false",
                    help="train the reference only (no Ray)")
    ap.add_argument("--out", default=str(HERE / "results" / "reference.json"))
    args = ap.parse_args(argv)

    home = tempfile.mkdtemp(prefix="c2d-bench-reference-")
    os.environ.setdefault("C2D_HOME", home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import torch

    from srplatform.config import load_config
    from srplatform.data.pipeline import val_pairs
    from srplatform.train.api import prepare_data, ray_session, resolve_images, run_stage
    from srplatform.train.loop import load_model_uri

    cfg = load_config(args.config, [*(QUICK if args.quick else []), *args.overrides,
                                    f"finetune.scales=[{args.scale}]", "data.deterministic=true"])
    if not cfg.data.val:
        log("reference: data.val is empty: nothing to compare on")
        return 2
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker * cfg.resources.num_workers)))
    data = prepare_data(cfg, say=log)
    samples = read_samples(data.uri)
    folder = resolve_images(cfg.data.val, "data.val")
    val1 = {s: val_pairs(folder, s, max_images=cfg.data.val_max_images) for s in (2, 3, 4)}
    val2 = {args.scale: val1.get(args.scale) or val_pairs(folder, args.scale,
                                                           max_images=cfg.data.val_max_images)}
    bic = bicubic_metrics(val1)
    ema = "_ema" if cfg.pretrain.ema_decay > 0 else ""

    log(f"reference stage 1: {cfg.pretrain.steps} steps on {sum(map(len, samples))} samples ...")
    ref1 = train(cfg, kind="pretrain", samples=samples, val=val1)
    rows = []
    plat1 = plat2 = None
    init = ref1["ema"]
    if args.compare:
        from srplatform.tracking import Tracker

        with ray_session():
            log("platform stage 1 (Ray Train) ...")
            plat1 = run_stage(cfg, kind="pretrain", data=data, tracker=Tracker(None))
            init = load_model_uri(plat1.model_path)
            log(f"platform stage 2 x{args.scale} ...")
            plat2 = run_stage(cfg, kind="finetune", scale=args.scale, init_from=plat1.model_path,
                              data=data, tracker=Tracker(None), register=False)
    log(f"reference stage 2 x{args.scale}: {cfg.finetune.steps} steps ...")
    ref2 = train(cfg, kind="finetune", samples=samples, scale=args.scale, init=init, val=val2)

    def row(stage: str, s: int, ref: dict, plat) -> dict:
        key = f"val_x{s}_psnr{ema}"
        r = {"stage": stage, "scale": s, "bicubic": bic[s], "reference": ref["metrics"][key],
             "reference_seconds": ref["seconds"]}
        if plat is not None:
            r["platform"] = float(plat.metrics[key])
            r["difference"] = r["platform"] - r["reference"]
            r["platform_seconds"] = plat.seconds
        return r

    rows = [row(f"1 continuous, {cfg.pretrain.steps} steps", s, ref1, plat1) for s in (2, 3, 4)]
    rows.append(row(f"2 x{args.scale}, {cfg.finetune.steps} steps", args.scale, ref2, plat2))
    lines = ["| stage | scale | bicubic | reference | platform | platform - reference |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        plat = f"{r['platform']:.2f}" if "platform" in r else "-"
        diff = f"{r['difference']:+.2f}" if "difference" in r else "-"
        lines.append(f"| {r['stage']} | x{r['scale']} | {r['bicubic']:.2f} | {r['reference']:.2f} | "
                     f"{plat} | {diff} |")
    worst = max((abs(r["difference"]) for r in rows if "difference" in r), default=float("nan"))
    lines += ["", f"Validation PSNR (dB, Y, {'EMA' if ema else 'raw'} weights) on `{cfg.data.val}`"
              f"{f' (first {cfg.data.val_max_images})' if cfg.data.val_max_images else ''}; "
              f"{cfg.model.arch} {cfg.model.variant} {cfg.model.flavor}, {cfg.resources.num_workers} "
              f"x {cfg.data.batch_size} per step, patch {cfg.data.patch}, seed {cfg.seed}. "
              f"Largest |platform - reference|: {worst:.2f} dB."]
    out = {"table": "\n".join(lines), "rows": rows, "max_abs_difference": worst,
           "config": cfg.to_dict(), "quick": args.quick,
           "curves": {"reference_pretrain": ref1["history"], "reference_finetune": ref2["history"]}}
    finish(out, args.out, home if os.environ.get("C2D_HOME") == home else None)
    return 0 if not args.compare or worst <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
