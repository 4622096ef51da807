"""C2D ablation at small scale: does continuous pretraining help a discrete x4 model on the same
step budget?

    python benchmarks/c2d_ablation.py [--quick] [--steps N] [--src ../shared/data/T91]

Two arms, same model (tiny C2D SwinIR-L), same data (T91 shards), same workers, run through the
platform (`srplatform.train.api.run_stage`, Ray Train):
- "discrete only": a fresh x4 model (pixel-shuffle head) trained 2N steps;
- "C2D": N steps of continuous-scale pretraining (implicit head, scales in [1, 4]), then the
  backbone with a fresh x4 head fine-tuned N steps.
Both arms' discrete stages use the same optimiser settings, those of stage 1 in the tiny config
(Adam, lr, warm-up, cosine, EMA): the pixel-shuffle head is freshly initialised in both, and a
lower fine-tuning lr for one arm only would confound the comparison. Both are evaluated with
their EMA weights.

Evaluation: x4 PSNR/SSIM (Y, border 4, uint8 rounding: `c2disr.evaluate.evaluate_folder`) on
Set14 (held out: no arm validates on it) and Set5, with bicubic as the reference. The wall-clock
time of each arm is reported too: steps are equal, but a continuous step (Q = p*p queries per
sample) does not cost the same as a discrete x4 step.

Writes benchmarks/results/c2d_ablation.json ({"table": Markdown, "rows": [...], ...}).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import finish, log  # noqa: E402


def config(args, name: str, extra: list[str]):
    from srplatform.config import load_config

    return load_config(REPO / "jobs" / "configs" / "tiny.yaml", [
        f"name={name}", f"data.source={args.src}", "data.val=", "finetune.scales=[4]",
        f"run.checkpoint_every={10 * args.steps}", f"run.val_every={10 * args.steps}",
        f"run.log_every={max(1, args.steps // 5)}", f"seed={args.seed}", *extra])


def evaluate(model_file: str, folders: dict[str, Path]) -> dict:
    from c2disr.evaluate import evaluate_folder, load_model

    model = load_model(model_file)
    out = {}
    for name, folder in folders.items():
        r = evaluate_folder(model, folder, 4)
        out[name] = {"psnr": r["psnr"], "ssim": r["ssim"]}
    return out


def bicubic(folders: dict[str, Path]) -> dict:
    from c2disr.evaluate import evaluate_folder
    from c2disr.ops.resize import imresize

    return {name: {k: evaluate_folder(lambda x: imresize(x, scale=4), f, 4)[k] for k in ("psnr", "ssim")}
            for name, f in folders.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 40 (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="N (default 300; quick 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "T91"))
    ap.add_argument("--bench", default=str(REPO.parent / "shared" / "data"),
                    help="folder holding Set14/ and Set5/")
    ap.add_argument("--out", default=str(HERE / "results" / "c2d_ablation.json"))
    args = ap.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 300)
    folders = {n: Path(args.bench) / n for n in ("Set14", "Set5")}
    if not Path(args.src).is_dir() or not all(f.is_dir() for f in folders.values()):
        log(f"need training images at {args.src} and Set14/Set5 under {args.bench}")
        return 2
    home = tempfile.mkdtemp(prefix="c2d-bench-ablation-")
    os.environ["C2D_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import torch

    from c2disr.evaluate import save_model
    from srplatform.tracking import Tracker
    from srplatform.train.api import prepare_data, ray_session, run_stage
    from srplatform.train.loop import StageSpec, build_stage_model

    n = args.steps
    load = os.getloadavg()[0]
    rows = []
    with ray_session():
        base = config(args, "abl", [])
        data = prepare_data(base, say=log)
        quiet = Tracker(None)

        # Arm A: a fresh discrete x4 model, 2N steps with stage-1 (from scratch) settings.
        torch.manual_seed(args.seed)
        fresh = Path(home) / "fresh_continuous.pt"
        save_model(fresh, build_stage_model(base, StageSpec(kind="pretrain", run_name="fresh")))
        p = base.pretrain
        same_optim = [f"finetune.lr={p.lr}", f"finetune.warmup_steps={p.warmup_steps}",
                      f"finetune.schedule={p.schedule}", f"finetune.ema_decay={p.ema_decay}"]
        # From scratch every parameter is new: no higher head lr for arm A (when the config
        # has that knob; arm B keeps the config's fine-tuning value).
        scratch = ["finetune.head_lr_mult=1.0"] if hasattr(base.finetune, "head_lr_mult") else []
        cfg_a = config(args, "abl-discrete", [f"finetune.steps={2 * n}", *same_optim, *scratch])
        log(f"arm A: discrete only, {2 * n} steps ...")
        t0 = time.perf_counter()
        a = run_stage(cfg_a, kind="finetune", scale=4, init_from=str(fresh), data=data, tracker=quiet)
        time_a = time.perf_counter() - t0

        # Arm B: N continuous steps, then N discrete x4 steps from that backbone.
        cfg_b = config(args, "abl-c2d", [f"pretrain.steps={n}", f"finetune.steps={n}", *same_optim])
        log(f"arm B: continuous {n} + discrete {n} steps ...")
        t0 = time.perf_counter()
        pre = run_stage(cfg_b, kind="pretrain", data=data, tracker=quiet)
        time_b1 = time.perf_counter() - t0
        b = run_stage(cfg_b, kind="finetune", scale=4, init_from=pre.model_path, data=data, tracker=quiet)
        time_b = time.perf_counter() - t0
    for r in (a, pre, b):
        if not r.ok:
            log(f"{r.name} failed: {r.error}")
            return 1

    log("evaluating on Set14 and Set5 at x4 ...")
    ref = bicubic(folders)
    res_a, res_b = evaluate(a.model_path, folders), evaluate(b.model_path, folders)
    rows = [
        {"arm": "bicubic", "steps": "-", "set14": ref["Set14"], "set5": ref["Set5"], "seconds": 0.0},
        {"arm": f"discrete only ({2 * n} x4 steps)", "steps": 2 * n, "set14": res_a["Set14"],
         "set5": res_a["Set5"], "seconds": time_a},
        {"arm": f"C2D ({n} continuous + {n} x4 steps)", "steps": 2 * n, "set14": res_b["Set14"],
         "set5": res_b["Set5"], "seconds": time_b, "pretrain_seconds": time_b1},
    ]
    delta14 = res_b["Set14"]["psnr"] - res_a["Set14"]["psnr"]
    delta5 = res_b["Set5"]["psnr"] - res_a["Set5"]["psnr"]
    lines = ["| arm | Set14 x4 PSNR / SSIM | Set5 x4 PSNR / SSIM | wall time |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['set14']['psnr']:.2f} / {r['set14']['ssim']:.4f} | "
                     f"{r['set5']['psnr']:.2f} / {r['set5']['ssim']:.4f} | "
                     + (f"{r['seconds']:.0f}s |" if r["seconds"] else "- |"))
    lines += ["", f"C2D minus discrete-only: {delta14:+.2f} dB on Set14, {delta5:+.2f} dB on Set5 "
              f"(tiny C2D SwinIR-L, T91, N = {n}, batch {base.data.batch_size} x "
              f"{base.resources.num_workers} workers, LR patch {base.data.patch}, Adam lr {p.lr} "
              f"cosine for every stage, x4 head init `{getattr(base.finetune, 'head_init', 'random')}` "
              f"in both arms, EMA weights, seed {args.seed}; wall time includes each run's "
              "start-up)."]
    out = {"table": "\n".join(lines), "rows": rows, "delta_psnr_set14": delta14,
           "head_init": getattr(base.finetune, "head_init", "random"),
           "delta_psnr_set5": delta5, "steps_n": n, "quick": args.quick, "seed": args.seed,
           "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load:.1f} at start, "
                      f"torch {torch.__version__}"}
    return finish(out, args.out, home)


if __name__ == "__main__":
    sys.exit(main())
