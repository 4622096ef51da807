"""The per-worker training loop of both stages, run by Ray Train's `TorchTrainer` on every worker.

    TorchTrainer(train_loop_per_worker, train_loop_config=loop_config(cfg, stage), ...)

One loop, two kinds of stage:
- "pretrain" (C2D stage 1): backbone + continuous implicit head on continuous-scale batches.
- "finetune" (C2D stage 2): the stage-1 backbone with a fresh pixel-shuffle head at one scale.

Continuous batches mix scales: a Ray Data map task picks one scale per batch it makes, but a
torch batch of the training shard can span two of those, so rows differ in their valid HR side
(`hr_size`; the HR tensor is zero-padded to a fixed P). We train the continuous head in query
mode, as HIIF does: per sample, Q = p*p HR pixels are drawn without replacement inside its valid
region and the model predicts RGB at those coordinates with that sample's cell size. Why not
render whole HR patches per scale group: the cost of a rendered patch grows with s^2 (16x the
queries at x4 as at x1) and groups would make the batch size depend on the draw; sampled
queries cost the same for every scale, stack into one `(B, Q, 2)` call whatever the mix, and
are the published recipe of the head we build.

Rank discipline (STYLE.md 10): every rank runs the same schedule of collectives and
`ray.train.report` calls (one per checkpoint or validation step), decided only by the step
count; rank 0 alone writes checkpoints,
talks to MLflow and sends progress to the driver; validation metrics are all-reduced first.

Checkpoints (a directory per report, `checkpoint_<step>`):
    state.pt       weights, EMA, optimizer, scheduler, step, per-rank RNG states, config (JSON
                   string): every value a tensor or a plain container, so it loads with
                   `torch.load(..., weights_only=True)`
    model.pt       the raw weights in the project's model-file format (`save_model`)
    model_ema.pt   the EMA weights, same format (when EMA is on)
    meta.json      step, epoch, metrics: what the driver reads without torch
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
EMA_FILE = "model_ema.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"
COMPARISON_CROP = 96  # HR side of the crops in comparison images


# --------------------------------------------------------------------------------------
# What the driver sends to every worker
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class StageSpec:
    """One training run, as the driver describes it to the workers (JSON-safe)."""

    kind: str  # "pretrain" | "finetune"
    run_name: str  # shown in progress lines, e.g. "tiny/x2"
    scale: int | None = None  # finetune: the discrete scale
    init_uri: str = ""  # finetune: model file (file://, s3:// or path) of the stage-1 weights
    val_folder: str = ""  # a local folder of benchmark images ("" = no validation)
    val_scales: list[int] = field(default_factory=list)
    mlflow_uri: str = ""
    mlflow_run_id: str = ""
    # Complete checkpoints the driver found in the run's storage, newest first, as [uri, step].
    # A restarted driver's Ray Train may not know the newest of them (killed between the upload
    # and the controller's commit); the loop then resumes from the newest one that loads.
    resume_from: list[list[Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageSpec":
        return cls(**data)


def loop_config(cfg_dict: dict[str, Any], stage: StageSpec, progress: Any = None) -> dict[str, Any]:
    """The `train_loop_config` of a stage: the plain config dict, the stage, a progress queue."""
    return {"cfg": cfg_dict, "stage": stage.to_dict(), "progress": progress}


# --------------------------------------------------------------------------------------
# Query sampling (continuous stage)
# --------------------------------------------------------------------------------------


def sample_queries(hr: torch.Tensor, hr_size: torch.Tensor, q: int,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `q` HR pixels per sample inside its valid region.

    hr: `(B, 3, P, P)` float [0, 1] RGB, sample b valid in `[:S_b, :S_b]` (zero elsewhere).
    hr_size: `(B,)` ints S_b, or `(B, 2)` (H_b, W_b).
    Returns coords `(B, q, 2)` (pixel centres of the valid region mapped to [-1, 1], order
    (y, x)), cells `(B, q, 2)` = (2/H_b, 2/W_b) and targets `(B, q, 3)`. Pixels are drawn without
    replacement when the region has at least q of them, with replacement otherwise.
    """
    b = hr.shape[0]
    sizes = hr_size.reshape(b, -1).to(torch.long).cpu()
    if sizes.shape[1] == 1:
        sizes = sizes.expand(b, 2)
    coords = torch.empty(b, q, 2, dtype=torch.float32)
    cells = torch.empty(b, q, 2, dtype=torch.float32)
    targets = torch.empty(b, q, 3, dtype=hr.dtype, device=hr.device)
    for i in range(b):
        h, w = int(sizes[i, 0]), int(sizes[i, 1])
        if h < 1 or w < 1 or h > hr.shape[-2] or w > hr.shape[-1]:
            raise ValueError(f"hr_size {h}x{w} of sample {i} does not fit the HR tensor {tuple(hr.shape)}")
        n = h * w
        if n >= q:
            idx = torch.randperm(n, generator=generator)[:q]
        else:
            idx = torch.randint(n, (q,), generator=generator)
        iy, ix = idx // w, idx % w
        coords[i, :, 0] = -1.0 + (2.0 * iy.float() + 1.0) / h
        coords[i, :, 1] = -1.0 + (2.0 * ix.float() + 1.0) / w
        cells[i, :, 0] = 2.0 / h
        cells[i, :, 1] = 2.0 / w
        targets[i] = hr[i, :, iy.to(hr.device), ix.to(hr.device)].t()
    return coords.to(hr.device), cells.to(hr.device), targets


class TrainForward(nn.Module):
    """Routes both training calls through `forward`, so DDP sees (and syncs) every one:
    `forward(lr)` for a discrete model, `forward(lr, coords, cells)` for the continuous head's
    query mode (calling `model.query` on the DDP-wrapped module would bypass DDP's hooks)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, lr, coords=None, cells=None):
        if coords is None:
            return self.model(lr)
        return self.model.query(lr, coords, cells)


# --------------------------------------------------------------------------------------
# RNG state as tensors (weights_only-loadable)
# --------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """This process's RNG states (torch CPU/CUDA, numpy, python, the query sampler) as tensors."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": torch.tensor([int(np_state[2]), int(np_state[3])], dtype=torch.int64),
        "numpy_gauss": torch.tensor(float(np_state[4]), dtype=torch.float64),
        "python": torch.tensor(list(py_internal), dtype=torch.int64),
        "python_version": torch.tensor(int(py_version)),
        "python_gauss": torch.tensor(float("nan") if py_gauss is None else float(py_gauss),
                                     dtype=torch.float64),
    }
    if generator is not None:
        out["sampler"] = generator.get_state()
    if torch.cuda.is_available():
        out["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
    return out


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         int(state["numpy_pos"][0]), int(state["numpy_pos"][1]),
                         float(state["numpy_gauss"])))
    gauss = float(state["python_gauss"])
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python"].tolist()),
                     None if math.isnan(gauss) else gauss))
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


# --------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, *, model: nn.Module, ema, optimizer, scheduler,
                    step: int, epoch: int, rng: list[dict[str, torch.Tensor]],
                    config: dict[str, Any], stage: dict[str, Any],
                    metrics: dict[str, float] | None = None) -> Path:
    """Write one checkpoint directory (see the module docstring). `model` is the plain model
    (not DDP-wrapped); `rng` holds one `rng_state()` per rank."""
    from c2disr.evaluate import save_model

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": ema.state_dict() if ema is not None else {},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": torch.tensor(int(step)),
        "epoch": torch.tensor(int(epoch)),
        "rng": rng,
        "config": json.dumps(config, sort_keys=True),
        "stage": json.dumps(stage, sort_keys=True),
        "format": "c2disr-train-state/1",
    }
    torch.save(state, d / STATE_FILE)
    # A continuous model's files record the scales it was trained on, so that upscaling or
    # evaluating it outside them can warn.
    data = config.get("data", {}) if isinstance(config, dict) else {}
    rng = ((float(data["scale_min"]), float(data["scale_max"]))
           if getattr(model, "continuous", False) and "scale_min" in data and "scale_max" in data
           else None)
    save_model(d / MODEL_FILE, model, scale_range=rng)
    if ema is not None:
        save_model(d / EMA_FILE, ema.module, scale_range=rng)
    meta = {"step": int(step), "epoch": int(epoch), "kind": stage.get("kind"),
            "scale": stage.get("scale"), "metrics": dict(metrics or {}), "time": time.time(),
            "ema": ema is not None}
    (d / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return d


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read `state.pt` of a checkpoint directory with `weights_only=True`; the config and stage
    come back as dicts."""
    from c2disr.models.checkpoints import load_weights_only

    path = Path(directory) / STATE_FILE
    try:
        state = load_weights_only(path, map_location)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no training state in this checkpoint directory") from None
    state["config"] = json.loads(state["config"])
    state["stage"] = json.loads(state["stage"])
    return state


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _is_gray(hr: torch.Tensor) -> bool:
    return bool(torch.equal(hr[:, 0], hr[:, 1]) and torch.equal(hr[:, 1], hr[:, 2]))


def measure(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> tuple[float, float]:
    """PSNR/SSIM of one image pair with the benchmark convention of `c2disr.evaluate`
    (output clamped and rounded to uint8 levels, `scale` border pixels removed, BT.601 Y; gray
    originals measured on their gray values). `sr`, `hr` are `(1, 3, H, W)` float [0, 1]."""
    from c2disr.metrics import psnr, quantize, rgb_to_gray, ssim

    sr = quantize(sr.detach().float().cpu())
    hr = hr.float().cpu()
    if _is_gray(hr):
        a, b, use_y = rgb_to_gray(sr.double()), hr[:, :1].double(), False
    else:
        a, b, use_y = sr, hr, True
    return float(psnr(a, b, scale, y_channel=use_y)[0]), float(ssim(a, b, scale, y_channel=use_y)[0])


def upscale(model: nn.Module, lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Whole-image inference: discrete models at their own scale, continuous at `scale`."""
    if getattr(model, "continuous", False):
        return model(lr, out_size=(lr.shape[-2] * scale, lr.shape[-1] * scale))
    return model(lr)


def comparison_image(lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor, scale: int,
                     crop: int = COMPARISON_CROP) -> np.ndarray:
    """LR upsampled nearest | bicubic | SR | HR, side by side, of one centre crop:
    `(crop, 4 * crop + 6, 3)` uint8 (2-pixel white separators)."""
    from c2disr.ops.resize import imresize

    big_h, big_w = hr.shape[-2:]
    c = max(scale, min(crop, big_h, big_w) // scale * scale)
    y0 = (big_h - c) // 2 // scale * scale
    x0 = (big_w - c) // 2 // scale * scale
    lr_c = lr[..., y0 // scale: (y0 + c) // scale, x0 // scale: (x0 + c) // scale].float().cpu()
    nearest = F.interpolate(lr_c, scale_factor=scale, mode="nearest")
    bicubic = imresize(lr_c, scale=scale)
    panels = [nearest, bicubic, sr[..., y0: y0 + c, x0: x0 + c].float().cpu(),
              hr[..., y0: y0 + c, x0: x0 + c].float().cpu()]
    sep = torch.ones(1, 3, c, 2)
    row = []
    for i, p in enumerate(panels):
        if i:
            row.append(sep)
        row.append(p[..., :c, :c].clamp(0, 1))
    img = torch.cat(row, dim=-1)[0]
    return (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


class BicubicBaseline(nn.Module):
    """The dumb baseline every validation reports beside the model: MATLAB-compatible bicubic
    upsampling of the LR input (`validate` names its metrics `val_x<s>_psnr_bicubic`)."""

    continuous = True  # `upscale` passes the output size

    def forward(self, lr: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        from c2disr.ops.resize import imresize

        return imresize(lr.float(), size=tuple(out_size))


BASELINE = "bicubic"


def with_gains(metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus `val_x<s>_gain_db` (and `_gain_db_ema`): PSNR minus the bicubic PSNR."""
    out = dict(metrics)
    for key, base in metrics.items():
        if key.endswith(f"_psnr_{BASELINE}"):
            stem = key[: -len(f"_psnr_{BASELINE}")]  # val_x2
            for suffix in ("", "_ema"):
                if f"{stem}_psnr{suffix}" in metrics:
                    out[f"{stem}_gain_db{suffix}"] = metrics[f"{stem}_psnr{suffix}"] - base
    return out


@torch.no_grad()
def validate(models: dict[str, nn.Module], pairs: dict[int, list], *, rank: int, world: int,
             device: torch.device, allreduce) -> tuple[dict[str, float], dict[tuple[str, int], tuple]]:
    """PSNR/SSIM of each model ("": raw weights, "ema") at each scale on this rank's share of
    the validation images (image i goes to rank i % world), summed over ranks by `allreduce`
    (a function taking and returning a float64 tensor).

    Returns metrics `{"val_x2_psnr": ..., "val_x2_ssim": ..., "val_x2_psnr_ema": ...}` and, for
    comparison images, the first (lr, sr, hr) this rank saw per (model, scale). Pass
    `BicubicBaseline()` under the name "bicubic" for the baseline's `val_x2_psnr_bicubic`."""
    keys = [(name, s) for name in models for s in sorted(pairs)]
    sums = torch.zeros(len(keys), 3, dtype=torch.float64)
    samples: dict[tuple[str, int], tuple] = {}
    for k, (name, s) in enumerate(keys):
        model = models[name]
        for i, (_img, lr, hr) in enumerate(pairs[s]):
            if i % world != rank:
                continue
            sr = upscale(model, lr.to(device), s).float().cpu()
            p, q = measure(sr, hr, s)
            sums[k] += torch.tensor([p, q, 1.0], dtype=torch.float64)
            samples.setdefault((name, s), (lr, sr, hr))
    sums = allreduce(sums)
    metrics: dict[str, float] = {}
    for k, (name, s) in enumerate(keys):
        n = float(sums[k, 2])
        if n == 0:
            continue
        suffix = f"_{name}" if name else ""
        metrics[f"val_x{s}_psnr{suffix}"] = float(sums[k, 0]) / n
        metrics[f"val_x{s}_ssim{suffix}"] = float(sums[k, 1]) / n
    return metrics, samples


# --------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------


def build_stage_model(cfg, stage: StageSpec) -> nn.Module:
    """Stage 1: a fresh continuous model from the config. Stage 2: the stage-1 model file at
    `stage.init_uri` (weights_only load) turned discrete at `stage.scale`."""
    from c2disr.models import build_model, to_discrete

    if stage.kind == "pretrain":
        m = cfg.model
        return build_model(m.arch, variant=m.variant, flavor=m.flavor, head="continuous",
                           overrides=m.overrides or None, head_overrides=m.head_overrides or None)
    if stage.kind != "finetune":
        raise ValueError(f"unknown stage kind {stage.kind!r}")
    if not stage.init_uri:
        raise ValueError("a finetune stage needs init_uri (the stage-1 model file)")
    init = load_model_uri(stage.init_uri)
    return to_discrete(init, int(stage.scale), residual=cfg.finetune.residual)


def load_model_uri(uri: str) -> nn.Module:
    """A model file (`save_model` format) from a path, file:// or s3:// URI."""
    from c2disr.evaluate import load_model
    from srplatform import storage

    local = storage.local_path(uri) if "://" in uri else Path(uri)
    if local is not None:
        return load_model(local)
    with tempfile.TemporaryDirectory(prefix="c2d-init-") as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(storage.read_bytes(uri))
        return load_model(path)


def fit_head_on_batches(model: nn.Module, batches: list[dict[str, Any]], scale: int, patch: int,
                        device: Any, allreduce: Any) -> float:
    """Least-squares fit of a discrete model's head on `batches` (dicts with "lr", "hr" of
    `(B, 3, patch, patch)` and `(B, 3, >= patch*scale, ...)`), the normal equations summed over
    ranks by `allreduce` (float64 in, float64 out). Returns the mean L1 of the fitted model on
    this rank's batches."""
    from c2disr.models import head_fit_stats, solve_head

    side = patch * scale
    gram = xty = None
    for b in batches:
        g, x = head_fit_stats(model, b["lr"].to(device), b["hr"][..., :side, :side].to(device))
        gram, xty = (g, x) if gram is None else (gram + g, xty + x)
    d = gram.shape[0]
    both = allreduce(torch.cat([gram, xty], dim=1).cpu()).to(gram.device)
    solve_head(model, both[:, :d], both[:, d:])
    with torch.no_grad():
        errs = [float((model(b["lr"].to(device)) - b["hr"][..., :side, :side].to(device)).abs().mean())
                for b in batches]
    return sum(errs) / len(errs)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def _load_ray_checkpoint(ckpt: Any, device: Any) -> dict[str, Any]:
    """`load_state` of a Ray Train checkpoint. A remote one is downloaded into this process's
    own temporary folder: `Checkpoint.as_directory()` shares one download folder between the
    ranks of a node, and a rank that finds the download lock free re-downloads into it while
    another rank may still be reading (seen as a torn state.pt on an S3 restore)."""
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return load_state(ckpt.path, map_location=device)
    with tempfile.TemporaryDirectory(prefix="c2d-restore-") as tmp:
        return load_state(ckpt.to_directory(tmp), map_location=device)


def load_state_uri(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """`load_state` of a checkpoint directory given as a path, file:// or s3:// URI."""
    from srplatform import storage

    local = storage.local_path(uri) if "://" in uri else Path(uri)
    if local is not None:
        return load_state(local, map_location=map_location)
    with tempfile.TemporaryDirectory(prefix="c2d-resume-") as tmp:
        (Path(tmp) / STATE_FILE).write_bytes(storage.read_bytes(storage.join(uri, STATE_FILE)))
        return load_state(tmp, map_location=map_location)


def _newer_state_on_storage(stage: StageSpec, state: dict[str, Any] | None, device: Any, say: Any,
                            rank: int, dist: Any) -> dict[str, Any] | None:
    """The training state to resume from: Ray Train's checkpoint (`state`, may be None) unless
    the run's storage holds a newer one that loads (see `StageSpec.resume_from`). Rank 0
    chooses and the others follow it, so every rank resumes at the same step."""
    have = int(state["step"]) if state is not None else -1
    choice, found = [""], None
    if rank == 0:
        for uri, step in stage.resume_from:
            if int(step) <= have:
                break
            try:
                found = load_state_uri(uri, map_location=device)
            except Exception as exc:  # noqa: BLE001 - a torn upload: try an older checkpoint
                say(f"checkpoint {uri} does not load ({type(exc).__name__}: {exc}); trying an older one")
                continue
            choice = [uri]
            break
    if dist is not None:
        dist.broadcast_object_list(choice, src=0)
    if not choice[0]:
        return state
    if rank == 0:
        known = f"its newest is step {have}" if have >= 0 else "it had none"
        say(f"resuming from {choice[0]}, newer than what Ray Train recorded ({known})")
        return found
    return load_state_uri(choice[0], map_location=device)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class _Progress:
    """Rank 0's channel to the driver (a ray.util.queue.Queue); silent when there is none."""

    def __init__(self, queue: Any, run_name: str):
        self.queue = queue
        self.run = run_name

    def send(self, kind: str, **data: Any) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait({"run": self.run, "kind": kind, "time": time.time(), **data})
        except Exception:  # noqa: BLE001 - the driver went away: training goes on silently
            self.queue = None


def _threads_for(cpus: float) -> int:
    return max(1, int(cpus))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring)."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from srplatform.config import Config
    from srplatform.tracking import Tracker
    from srplatform.train.optim import EMA, build_optimizer, build_scheduler, stage_loss

    cfg = Config.from_dict(config["cfg"], source="train_loop_config")
    stage = StageSpec.from_dict(config["stage"])
    section = cfg.pretrain if stage.kind == "pretrain" else cfg.finetune
    total = int(section.steps)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads_for(cfg.resources.cpus_per_worker))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        # Object collectives on NCCL (the resume choice, node ids, RNG states) use the current
        # device; without this every rank of a node would use cuda:0.
        torch.cuda.set_device(device)
    distributed = dist.is_available() and dist.is_initialized() and world > 1

    def allreduce(t: torch.Tensor) -> torch.Tensor:
        if not distributed:
            return t
        x = t.to(device)
        dist.all_reduce(x)
        return x.cpu()

    progress = _Progress(config.get("progress") if rank == 0 else None, stage.run_name)
    def say(msg: str) -> None:
        if progress.queue is not None:
            progress.send("warning", message=msg)
        else:
            print(f"[{stage.run_name}] {msg}", flush=True)

    # Metrics and images go out from a background thread: tracking never stalls a step.
    tracker = Tracker(stage.mlflow_uri, enabled=rank == 0 and bool(stage.mlflow_run_id), say=say,
                      background=True)
    run_id = stage.mlflow_run_id or None

    # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
    torch.manual_seed(cfg.seed)
    model = build_stage_model(cfg, stage).to(device)
    optimizer = build_optimizer(model, section)
    scheduler = build_scheduler(optimizer, section)
    sampler = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)

    step, epoch_seen, resumed_from, state = 0, -1, None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        state = _load_ray_checkpoint(ckpt, device)
    state = _newer_state_on_storage(stage, state, device, say, rank,
                                    dist if distributed else None)
    if state is not None:
        model.load_state_dict(state["model"], strict=True)
    from srplatform.data.pipeline import rank_dataset_name

    # Deterministic data: this worker's own stream (see `ray_train_datasets`).
    shard = ray.train.get_dataset_shard(rank_dataset_name(rank) if cfg.data.deterministic
                                        else "train")
    passes = 0

    def batches():
        nonlocal passes
        while True:
            got = False
            for batch in shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=True,
                                                  prefetch_batches=2):
                got = True
                yield batch
            passes += 1
            if not got:
                raise RuntimeError(
                    f"{stage.run_name}: the training data gave no complete batch of "
                    f"{cfg.data.batch_size} per worker; use more images or a smaller "
                    "data.batch_size / resources.num_workers")
            if passes == 1:
                progress.send("warning", message="training data exhausted before the step budget: "
                              "iterating it again (the same crops repeat)")

    stream = batches()

    # Stage 2 from scratch: fit the fresh pixel-shuffle head in closed form on the frozen
    # features of every worker's first `head_fit_batches` batches (the normal equations are
    # summed over ranks, so every rank solves the same fit); those batches are trained on as usual.
    if state is None and stage.kind == "finetune" and cfg.finetune.head_init == "lstsq":
        first = list(itertools.islice(stream, cfg.finetune.head_fit_batches))
        err = fit_head_on_batches(model, first, int(stage.scale), cfg.data.patch, device, allreduce)
        if rank == 0:
            say(f"head fitted by least squares on {len(first) * world} batches (L1 {err:.4f})")
        stream = itertools.chain(first, stream)
    # The average starts from the weights training continues from.
    ema = EMA(model, section.ema_decay) if section.ema_decay > 0 else None
    if state is not None:
        if ema is not None and state["ema"]:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        epoch_seen = int(state["epoch"])
        resumed_from = step
        rngs = state["rng"]
        if len(rngs) == world:
            set_rng_state(rngs[rank], sampler)
        else:  # a different world size: fresh, distinct streams derived from the step
            torch.manual_seed(cfg.seed * 7919 + rank * 104729 + step)
            sampler.manual_seed(cfg.seed * 1_000_003 + rank + step * 31)
        del state

    net = ray.train.torch.prepare_model(TrainForward(model))
    net.train()

    # Validation pairs: loaded once; every rank keeps them all and evaluates its share.
    pairs: dict[int, list] = {}
    if stage.val_folder and stage.val_scales:
        from srplatform.data.pipeline import val_pairs

        for s in stage.val_scales:
            pairs[int(s)] = val_pairs(stage.val_folder, int(s), max_images=cfg.data.val_max_images)

    use_bf16 = bool(cfg.run.bf16 and device.type == "cuda")
    q = cfg.data.patch * cfg.data.patch
    latest_val: dict[str, float] = {}

    def evaluate_now(at_step: int) -> dict[str, float]:
        models = {"": model}
        if ema is not None:
            models["ema"] = ema.module
        models[BASELINE] = BicubicBaseline()
        model.eval()
        metrics, samples = validate(models, pairs, rank=rank, world=world, device=device,
                                    allreduce=allreduce)
        metrics = with_gains(metrics)
        samples = {k: v for k, v in samples.items() if k[0] != BASELINE}
        model.train()
        if rank == 0:
            tracker.log_metrics(run_id, metrics, step=at_step)
            _log_comparisons(tracker, run_id, samples, at_step)
            progress.send("val", step=at_step, total=total, metrics=metrics)
        return metrics

    def checkpoint_now(at_step: int, epoch: int, metrics: dict[str, float]) -> None:
        gathered: list[Any] = [None] * world
        mine = rng_state(sampler)
        if distributed:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        report = {"step": at_step, "epoch": epoch, **metrics}
        name = f"{CHECKPOINT_PREFIX}{at_step:07d}"
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="c2d-ckpt-") as tmp:
                save_checkpoint(tmp, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                                step=at_step, epoch=epoch, rng=gathered, config=config["cfg"],
                                stage=stage.to_dict(), metrics=metrics)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=name)
            # `report` returns once the files are uploaded, but the controller registers the
            # checkpoint a little later; a worker dying in between would lose it (the restart
            # would not see it). Wait for the commit, so that "saved" means restorable.
            try:
                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=600)
            except Exception as exc:  # noqa: BLE001 - training goes on; the next one may commit
                say(f"checkpoint {name} not confirmed by Ray Train: {exc}")
            progress.send("checkpoint", step=at_step, total=total, name=name)
        else:
            ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)

    # Where the ranks run (one small collective at start): shown in the first progress line.
    node = ray.get_runtime_context().get_node_id()
    nodes: list[Any] = [node] * world
    if distributed:
        dist.all_gather_object(nodes, node)
    progress.send("start", step=step, total=total, world=world, nodes=len(set(nodes)),
                  resumed_from=resumed_from, device=str(device), pid=os.getpid())
    if resumed_from is not None:
        progress.send("resumed", step=step, total=total)

    if step >= total:
        # Restarted after the last checkpoint was reported: nothing left to train. Report once
        # more (all ranks) so the run ends with final metrics.
        latest_val = evaluate_now(step) if pairs else {}
        ray.train.report({"step": step, "epoch": epoch_seen, **latest_val}, checkpoint=None)
        tracker.close(timeout=120)
        progress.send("end", step=step, total=total, metrics=latest_val)
        return

    # Per-window accumulators: loss sum, steps, images, data seconds, step seconds, skipped.
    window = torch.zeros(6, dtype=torch.float64)
    skipped_total = 0.0
    last_epoch = epoch_seen
    t_window = time.perf_counter()
    while step < total:
        t0 = time.perf_counter()
        batch = next(stream)
        t_data = time.perf_counter() - t0
        lr_b = batch["lr"].to(device, non_blocking=True)
        hr_b = batch["hr"].to(device, non_blocking=True)
        if "epoch" in batch and len(batch["epoch"]):
            last_epoch = max(last_epoch, int(batch["epoch"].max()))
        skipped = float(batch["skipped"].sum()) if "skipped" in batch else 0.0
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if stage.kind == "pretrain":
                coords, cells, target = sample_queries(hr_b, batch["hr_size"], q, sampler)
                pred = net(lr_b, coords, cells)  # (B, Q, 3)
            else:
                side = int(batch["hr_size"].reshape(-1)[0])
                target = hr_b[..., :side, :side]
                pred = net(lr_b)  # (B, 3, p*s, p*s)
                if pred.shape != target.shape:
                    raise ValueError(f"x{stage.scale} model output {tuple(pred.shape)} does not match "
                                     f"the HR batch {tuple(target.shape)}: data and model scales differ")
            loss, shown = stage_loss(pred, target, step=step, section=section)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if section.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), section.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_step = time.perf_counter() - t0
        window += torch.tensor([float(shown), 1.0, float(lr_b.shape[0]), t_data, t_step,
                                skipped], dtype=torch.float64)

        final = step >= total
        do_val = bool(pairs) and (step % cfg.run.val_every == 0 or final)
        do_ckpt = step % cfg.run.checkpoint_every == 0 or final
        do_log = step % cfg.run.log_every == 0 or final
        if do_log or do_val or do_ckpt:
            # One all-reduce of the window serves the progress line and the divergence check.
            # A diverged run stops here, on every rank at once, before it is validated or
            # checkpointed: a NaN model must not become the checkpoint a retry resumes from.
            # (tot[0] sums the window's losses of all ranks: one non-finite loss makes it so.)
            tot = allreduce(window.clone())
            if not math.isfinite(float(tot[0])):
                raise TrainingDiverged(
                    f"{stage.run_name}: the loss is not finite at step {step}: training diverged. "
                    f"Lower {stage.kind}.lr (now {section.lr:g}), add {stage.kind}.warmup_steps or "
                    f"set {stage.kind}.grad_clip; the last good checkpoint is the one before step {step}.")
        if do_log:
            wall = time.perf_counter() - t_window
            skipped_total += float(tot[5])
            mean_step = float(tot[4]) / max(1.0, float(tot[1]))  # seconds, averaged over ranks
            metrics = {
                "loss": float(tot[0] / tot[1]),
                "lr": float(optimizer.param_groups[0]["lr"]),
                "images_per_s": float(tot[2]) / max(1e-9, wall),
                "data_wait_frac": float(tot[3] / tot[4]) if float(tot[4]) > 0 else 0.0,
                "step_time_s": mean_step,
                "skipped_samples": skipped_total,
                "epoch": float(last_epoch),
            }
            if rank == 0:
                tracker.log_metrics(run_id, metrics, step=step)
                eta = (total - step) * wall / max(1.0, float(window[1]))
                progress.send("train", step=step, total=total, eta_s=eta, **metrics)
            window.zero_()
            t_window = time.perf_counter()

        if do_val:
            latest_val = evaluate_now(step)
        if do_ckpt:
            checkpoint_now(step, last_epoch, latest_val if do_val else {})
        elif do_val:
            # Validation results are reported too (no checkpoint), so Train callbacks such as
            # Tune's see every evaluation; all ranks take this branch at the same steps.
            ray.train.report({"step": step, "epoch": last_epoch, **latest_val}, checkpoint=None)
        if do_val or do_ckpt:
            t_window = time.perf_counter()  # validation/checkpoint time is not training speed

    tracker.close(timeout=120)
    progress.send("end", step=step, total=total, metrics=latest_val,
                  tracking=tracker.summary())


def _log_comparisons(tracker, run_id: str | None, samples: dict, step: int) -> None:
    """One PNG per (weights, scale): LR nearest | bicubic | SR | HR crops."""
    if not run_id or not tracker.available:
        return
    for (name, s), (lr, sr, hr) in sorted(samples.items()):
        tag = f"x{s}" + (f"_{name}" if name else "")
        tracker.log_image(run_id, comparison_image(lr, sr, hr, s),
                          f"comparisons/{tag}_step{step:07d}.png")


def read_meta(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`meta.json` of a local checkpoint directory."""
    return json.loads((Path(checkpoint_dir) / META_FILE).read_text())
