"""`c2d demo`: the whole platform end to end on the embedded stack, in minutes on a laptop.

Steps (each reuses what a previous run left, so a second run is quick):
 1. start the local stack (MLflow server + S3 endpoint);
 2. gather images (a folder the user names, else scikit-image's bundled photographs);
 3. pack them into WebDataset shards (file:// under $C2D_HOME);
 4. continuous-scale pretraining, then the discrete fine-tunes fanned out per scale (each
    fine-tuned model is registered in MLflow as a `candidate`);
 5. a small Ray Tune search over the hierarchical-encoding hyperparameters;
 6. promotion: each scale's candidate is re-evaluated against the champion and promoted
    when better (the first one always);
 7. upscaling a sample image with the x4 (or largest) champion;
 8. a summary table (bicubic vs model per scale, MACs, time) and a Markdown report with plots.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srplatform.errors import UserError

REPO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
REPO_SPACE = Path(__file__).resolve().parents[1] / "jobs" / "spaces" / "tiny.yaml"


@dataclass
class DemoOptions:
    name: str = "demo"
    images: str = ""  # folder of HR images; empty = bundled sample photographs
    config: str = ""  # base config; empty = jobs/configs/demo.yaml
    space: str = ""  # search space; empty = jobs/spaces/tiny.yaml
    overrides: list[str] = field(default_factory=list)
    search: bool = True
    search_trials: int = 2
    val: str = ""  # validation/benchmark folder; empty = Set5 when present, else held-out photos


class _Steps:
    def __init__(self, total: int):
        self.total = total
        self.n = 0
        self.t0 = time.time()

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {title}  (t+{time.time() - self.t0:.0f}s)", flush=True)


def _shared_set(name: str) -> Path | None:
    from srplatform.train.api import shared_candidates

    for cand in shared_candidates(name):
        if cand.is_dir():
            return cand
    return None


def extract_subimages(images: list[Path], dest: Path, *, crop: int = 192, step: int = 144,
                      max_per_image: int = 12) -> list[Path]:
    """Cut each image into overlapping crop x crop sub-images (what BasicSR's DIV2K preparation
    does), so a handful of photographs still gives every training worker full batches: the
    pipeline takes one random patch per stored image per epoch. Images smaller than `crop` are
    kept whole. Idempotent: existing sub-images are reused; stale ones are removed."""
    import numpy as np
    from PIL import Image

    def starts(length: int) -> list[int]:
        if length <= crop:
            return [0]
        pos = list(range(0, length - crop + 1, step))
        if pos[-1] != length - crop:
            pos.append(length - crop)
        return pos

    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in images:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            boxes = [(x, y) for y in starts(h) for x in starts(w)]
            if len(boxes) > max_per_image:  # evenly spaced subset: big photos must not dominate
                keep = np.linspace(0, len(boxes) - 1, max_per_image).round().astype(int)
                boxes = [boxes[i] for i in sorted(set(keep.tolist()))]
            for x, y in boxes:
                out = dest / f"{path.stem}_{y:04d}_{x:04d}.png"
                if not out.exists():
                    tmp = out.with_suffix(".tmp.png")
                    im.crop((x, y, min(w, x + crop), min(h, y + crop))).save(tmp)
                    tmp.replace(out)
                written.append(out)
    keep_names = {p.name for p in written}
    for stale in dest.glob("*.png"):
        if stale.name not in keep_names:
            stale.unlink()
    return written


def _demo_config(opts: DemoOptions, home: Path, train_dir: Path, val: str):
    from srplatform.config import load_config

    base = opts.config or str(REPO_CONFIG)
    overrides = [
        f"name={opts.name}",
        f"data.source={train_dir}",
        f"data.train={(home / 'shards' / opts.name).as_uri()}",
        f"data.val={val}",
        *opts.overrides,
    ]
    return load_config(base, overrides)


def _pick_val(opts: DemoOptions, home: Path, images: list[Path]) -> tuple[str, list[Path]]:
    """The validation/benchmark folder and the images left for training."""
    if opts.val:
        return opts.val, images
    set5 = _shared_set("Set5")
    if set5 is not None:
        return str(set5), images
    # No benchmark set here: hold out two photographs.
    if len(images) < 4:
        raise UserError("need at least 4 images to hold 2 out for validation; pass --val DIR")
    held = home / "demo" / opts.name / "val"
    held.mkdir(parents=True, exist_ok=True)
    for p in images[:2]:
        target = held / p.name
        if not target.exists():
            target.write_bytes(p.read_bytes())
    return str(held), images[2:]


def run_demo(opts: DemoOptions) -> int:
    from srplatform import report, stack

    steps = _Steps(8)
    home = stack.data_dir()
    out_dir = home / "demo" / opts.name
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    steps("Local stack: MLflow tracking server and S3 endpoint on 127.0.0.1")
    state = stack.up(s3=True)
    mlflow_uri = state["mlflow"]["tracking_uri"]
    print(f"  MLflow UI: {mlflow_uri}")

    steps("Images")
    if opts.images:
        src = Path(opts.images).expanduser()
        if not src.is_dir():
            raise UserError(f"--images {src}: not a folder of images")
        from c2disr.evaluate import list_images

        images = list_images(src)
        if not images:
            raise UserError(f"--images {src}: no images (png, jpg, webp, bmp, tif) found")
        print(f"  {len(images)} images from {src}")
    else:
        images = report.sample_images(home / "samples")
        print(f"  {len(images)} photographs bundled with scikit-image -> {home / 'samples'}")
    val, train_images = _pick_val(opts, home, images)
    train_dir = out_dir / "train-subimages"
    subs = extract_subimages(train_images, train_dir)
    print(f"  training on {len(train_images)} images ({len(subs)} sub-images of up to 192x192); "
          f"validating on {val}")

    cfg = _demo_config(opts, home, train_dir, val)

    steps("Pack into WebDataset shards")
    from srplatform.data import pack

    t = time.time()
    from srplatform.data.pipeline import hr_patch_max

    manifest = pack(str(train_dir), cfg.data.train, shard_size_mb=cfg.data.shard_size_mb,
                    min_size=hr_patch_max(cfg.data.patch, cfg.data.scale_max), progress=True,
                    overwrite=True)  # the demo owns this folder: new inputs replace old shards
    timings["pack"] = time.time() - t
    run_info = manifest.get("run", {})
    print(f"  {manifest.get('samples')} samples in {len(manifest.get('shards', []))} shards at "
          f"{cfg.data.train} ({run_info.get('status', 'packed')})")

    steps("Train: continuous-scale pretraining, then discrete fine-tunes fanned out per scale")
    from srplatform.train.api import run_pipeline, summary_table

    t = time.time()
    pipe = run_pipeline(cfg)
    timings["pipeline"] = time.time() - t
    stages = [pipe.pretrain, *pipe.finetune.values()]
    print(summary_table(stages))
    if not pipe.ok:
        failed = [r for r in stages if not r.ok]
        for r in failed:
            print(f"  {r.name}: {r.error}", file=sys.stderr)
        raise UserError("training failed; see the errors above (re-run `c2d demo` to resume)")

    tune_result = None
    if opts.search:
        steps("Search: Ray Tune over the hierarchical-encoding hyperparameters")
        from srplatform.tune import run_tune

        t = time.time()
        tune_result = run_tune(cfg, opts.space or str(REPO_SPACE), name=f"{opts.name}-search",
                               trials=opts.search_trials)
        timings["search"] = time.time() - t
        print(tune_result.table())
        if tune_result.best_config_path:
            print(f"  best config (accepted by `c2d pipeline --config`): {tune_result.best_config_path}")
    else:
        steps("Search: skipped (--no-search)")

    steps("Registry: re-evaluate each scale's candidate against its champion and promote")
    from srplatform.registry import format_result, promote

    promotions = {}
    for s, r in sorted(pipe.finetune.items()):
        name = r.registered_model.split(":")[0] if r.registered_model else ""
        if not name:
            print(f"  x{s}: not registered ({'tracking unavailable' if not r.mlflow_run_id else 'no model'})")
            continue
        res = promote(name, data=val, tracking_uri=mlflow_uri, log=lambda m: print("  " + m))
        promotions[s] = res
        print(format_result(res))

    steps("Upscale a sample image with the champion")
    sample_out = None
    if promotions:
        top = max(promotions)
        from srplatform.mlmodel import load_sr_model
        from srplatform.upscale import upscale_path

        model = load_sr_model(f"models:/{promotions[top].name}@champion", tracking_uri=mlflow_uri)
        sample_in = sorted(images)[-1]
        sample_out = out_dir / f"{sample_in.stem}_x{top}.png"
        upscale_path(model, sample_in, sample_out)
        print(f"  {sample_in} -> {sample_out}")
    else:
        print("  no champion: nothing to upscale")

    steps("Summary and report")
    rows, comparison = _summary_rows(pipe, promotions, val, mlflow_uri, out_dir, cfg)
    from srplatform.report import markdown_table

    headers = ["scale", "bicubic PSNR/SSIM", "model PSNR/SSIM", "gain dB", "MACs (G, 1280x720)",
               "params", "train s", "champion"]
    table = markdown_table(headers, rows)
    print(table)
    report_path = _write_report(out_dir, opts, cfg, pipe, tune_result, promotions, table, comparison,
                                mlflow_uri, sample_out, timings, steps)
    print_closing(report_path, mlflow_uri, cfg.tracking.experiment, time.time() - steps.t0)
    return 0


def print_closing(report_path: Path, mlflow_uri: str, experiment: str, seconds: float) -> None:
    """The demo's last lines: where the results are, and that the stack it started is still up
    (the MLflow UI stays browsable) with the command that stops it."""
    print(f"\nreport: {report_path}")
    print(f"MLflow: {mlflow_uri}  (experiment '{experiment}')")
    print(f"done in {seconds:.0f}s")
    print("The local stack (MLflow server, S3 endpoint) is still running, so the MLflow UI above "
          "stays browsable; stop it with `c2d stack down`.")


def _summary_rows(pipe, promotions, val: str, mlflow_uri: str, out_dir: Path, cfg):
    import torch

    from c2disr.complexity import count_macs, count_params
    from c2disr.evaluate import evaluate_folder, list_images, load_image, make_pair
    from c2disr.ops.resize import imresize
    from srplatform.mlmodel import load_sr_model

    rows = []
    comparison = None
    for s, r in sorted(pipe.finetune.items()):
        bic = evaluate_folder(lambda lr, s=s: imresize(lr, scale=s).clamp(0, 1), val, s)
        res = promotions.get(s)
        if res is not None:
            model = load_sr_model(f"models:/{res.name}@champion", tracking_uri=mlflow_uri)
            label = f"{res.name} v{res.champion_after}"
        else:
            from c2disr.evaluate import load_model

            model = load_model(r.model_path)
            label = "(not registered)"
        model.eval()
        with torch.no_grad():
            ev = evaluate_folder(lambda lr, m=model: m(lr).clamp(0, 1), val, s)
        macs = count_macs(model, (720 // s, 1280 // s)) / 1e9
        rows.append([f"x{s}", f"{bic['psnr']:.2f} / {bic['ssim']:.4f}",
                     f"{ev['psnr']:.2f} / {ev['ssim']:.4f}", f"{ev['psnr'] - bic['psnr']:+.2f}",
                     f"{macs:.2f}", f"{count_params(model):,}", f"{r.seconds:.0f}", label])
        if s == max(pipe.finetune):
            first = list_images(val)[0]
            lr, hr = make_pair(load_image(first), s)
            with torch.no_grad():
                sr = model(lr[None]).clamp(0, 1)[0]
            bicubic = imresize(lr, scale=s).clamp(0, 1)
            from srplatform.report import comparison_strip

            comparison = comparison_strip(lr, bicubic, sr, hr, out_dir / f"comparison_x{s}.png")
    return rows, comparison


def _write_report(out_dir: Path, opts, cfg, pipe, tune_result, promotions, table: str, comparison,
                  mlflow_uri: str, sample_out, timings, steps) -> Path:
    import mlflow

    from srplatform.report import metric_history, plot_curves

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = {"pretrain": pipe.pretrain, **{f"x{s}": r for s, r in sorted(pipe.finetune.items())}}
    loss = {k: metric_history(client, r.mlflow_run_id, "loss") for k, r in runs.items() if r.mlflow_run_id}
    psnr = {}
    for k, r in runs.items():
        if not r.mlflow_run_id:
            continue
        if r.scale:
            psnr[k] = metric_history(client, r.mlflow_run_id, f"val_x{r.scale}_psnr")
        else:
            for s in sorted(pipe.finetune):
                psnr[f"pretrain x{s}"] = metric_history(client, r.mlflow_run_id, f"val_x{s}_psnr")
    loss_png = plot_curves(loss, out_dir / "loss.png", title="training loss (L1)", ylabel="loss")
    psnr_png = plot_curves(psnr, out_dir / "psnr.png", title="validation PSNR (Y)", ylabel="dB")
    lines = [f"# c2disr demo report: {opts.name}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; total "
             f"{time.time() - steps.t0:.0f}s. MLflow: {mlflow_uri}", "",
             f"Model: {cfg.model.arch} ({cfg.model.variant}, {cfg.model.flavor}); pretrain "
             f"{cfg.pretrain.steps} steps, fine-tune {cfg.finetune.steps} steps per scale; "
             f"validation on `{cfg.data.val}`.", "", "## Per scale", "", table, ""]
    if loss_png:
        lines += ["## Training loss", "", f"![loss]({loss_png.name})", ""]
    if psnr_png:
        lines += ["## Validation PSNR", "", f"![psnr]({psnr_png.name})", ""]
    if comparison:
        lines += ["## Visual comparison", "", "LR (nearest) | bicubic | model | HR", "",
                  f"![comparison]({Path(comparison).name})", ""]
    if tune_result is not None:
        lines += ["## Search", "", "```", tune_result.table(), "```", ""]
        if tune_result.plot_path:
            lines += [f"PSNR against MACs, Pareto front marked: `{tune_result.plot_path}`", ""]
        if tune_result.best_config_path:
            lines += [f"Best config: `{tune_result.best_config_path}`", ""]
    if promotions:
        lines += ["## Promotion decisions", ""]
        for s, res in sorted(promotions.items()):
            lines.append(f"- x{s}: {res.name}: **{res.decision}** — {res.message}")
        lines.append("")
    if sample_out:
        lines += ["## Upscaled sample", "", f"`{sample_out}`", ""]
    lines += ["## Timings", "", *(f"- {k}: {v:.0f}s" for k, v in timings.items()), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    (out_dir / "summary.json").write_text(json.dumps(
        {"pipeline": pipe.to_dict(), "timings": timings,
         "promotions": {str(s): r.to_dict() for s, r in promotions.items()}}, indent=2, default=str))
    return path
