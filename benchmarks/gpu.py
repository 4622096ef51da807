"""One-shot GPU readiness check: correctness on the device, training throughput, inference
latency and a short C2D training, written to gpu.json and gpu.md.

    PYTHONPATH=. python benchmarks/gpu.py                         # full check (cuda if present)
    PYTHONPATH=. python benchmarks/gpu.py --quick --device cpu    # tiny models, < 1 min on a CPU

Pure PyTorch (torch, numpy, PIL, the standard library and c2disr): it must run from a source
tree on a machine where the project is not installed and torch may be older (2.11), so
optional torch features (torch.compile) are guarded and a failure becomes a row, not a crash.
See docs/GPU.md for what each section measures and how the default sizes fit 8 minutes.

Exit status: 0 all ran and every correctness check passed; 1 a correctness check failed;
2 the checks passed but some measurements errored or were skipped to stay within --budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from the source tree
    sys.path.insert(0, str(REPO))

from c2disr.evaluate import list_images, make_pair, read_image  # noqa: E402
from c2disr.metrics import psnr, quantize  # noqa: E402
from c2disr.models import ARCHS, VARIANTS, build_model, head_fit_stats, solve_head, to_discrete  # noqa: E402
from c2disr.models.common import set_fused_attention  # noqa: E402
from c2disr.models.heads import make_coords  # noqa: E402
from c2disr.models.scan import cuda_kernel_available  # noqa: E402
from c2disr.ops.resize import imresize  # noqa: E402

SAME_MATH_TOL = 1e-4  # max |diff| (RGB in [0, 1]) between two fp32 paths computing the same function
BF16_PSNR_TOL = 40.0  # dB between the bf16-autocast and the fp32 output of the same weights
OUT_HW = (720, 1280)  # latency target: one 1280x720 output image
CHECKS = ("finite fwd+bwd (bf16)", "bf16 vs fp32", "SDPA vs explicit", "scan reference vs auto",
          "chunked vs whole head")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def csv(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="GPU readiness check for the c2disr models: correctness on the device, training "
                    "throughput, inference latency, a short C2D training (docs/GPU.md).",
        epilog="exit status: 0 all ran and every check passed, 1 a correctness check failed, "
               "2 rows skipped (time budget) or errored")
    add = ap.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to check [cuda if available, else cpu]")
    add("--quick", action="store_true", help="tiny flavour and sizes, few iterations, no torch.compile")
    add("--out", default=str(REPO / "benchmarks" / "results"), help="folder for gpu.json and gpu.md "
        "[benchmarks/results]")
    add("--archs", default=",".join(ARCHS), help=f"comma-separated architectures [{','.join(ARCHS)}]")
    add("--variants", default=",".join(VARIANTS), help=f"comma-separated variants [{','.join(VARIANTS)}]")
    add("--scales", default="2,4", help="comma-separated integer scales [2,4]")
    add("--batches", help="training batch sizes [16,32; quick: 2]")
    add("--lr-size", type=int, help="LR side of the throughput batches [64; quick: 16]")
    add("--train-seconds", type=float, help="wall time of the short training, both stages [180; quick: 4]")
    add("--data", help="folder with T91/ and Set5/ [benchmarks/gpu_data if present, else ../shared/data]")
    add("--no-compile", action="store_true", help="skip the torch.compile rows")
    add("--iters", type=int, help="timed steps per throughput row [5; quick: 2]")
    add("--budget", type=float, help="seconds the run may take; rows that would not fit before the short "
                                     "training are skipped and listed [450 on cuda, else no limit]")
    add("--threads", type=int, help="torch CPU threads [1 with --quick on cpu, else torch's default]")
    args = ap.parse_args(argv)
    q = args.quick
    args.flavor = "tiny" if q else "light"
    args.archs, args.variants, args.scales = csv(args.archs), csv(args.variants), csv(args.scales, int)
    args.batches = csv(args.batches, int) if args.batches else ([2] if q else [16, 32])
    args.lr_size = args.lr_size or (16 if q else 64)
    args.train_seconds = args.train_seconds if args.train_seconds is not None else (4.0 if q else 180.0)
    args.iters, args.warmup = args.iters or (2 if q else 5), (1 if q else 2)
    args.compile = not (args.no_compile or q)  # inductor's compile time alone exceeds the quick budget
    if args.budget is None:
        args.budget = 450.0 if args.device.startswith("cuda") and not q else 0.0
    if args.data is None:
        local = REPO / "benchmarks" / "gpu_data"
        shared = Path(os.environ.get("C2D_SHARED", REPO.parent / "shared")) / "data"
        args.data = str(local if local.is_dir() else shared)
    args.out_hw = (36, 64) if q else OUT_HW  # quick: 16-px tiles still cut a 64x36 output
    args.tile, args.overlap = (16, 4) if q else (256, 16)
    args.check_lr = 16 if q else 32
    return args


# ----------------------------------------------------------------------------- helpers


class Run:
    """Device, results, the time budget and incremental saving (a run killed by `timeout`
    keeps what it measured so far)."""

    def __init__(self, args, dev: torch.device):
        self.args, self.dev, self.cuda = args, dev, dev.type == "cuda"
        self.deadline = T0 + args.budget if args.budget > 0 else math.inf
        self.data = {"meta": self.meta(), "correctness": [], "throughput": [], "latency": [],
                     "latency_ratios": [], "training": None, "skipped": [], "compile_skipped": [], "errors": []}

    def meta(self) -> dict:
        cuda, b = self.cuda, torch.backends
        return {"device": str(self.dev), "device_name": torch.cuda.get_device_name(self.dev) if cuda
                else (platform.processor() or platform.machine()), "torch": torch.__version__,
                "cuda": torch.version.cuda, "python": platform.python_version(),
                "cudnn": b.cudnn.version() if cuda else None, "tf32_matmul": b.cuda.matmul.allow_tf32,
                "tf32_cudnn": b.cudnn.allow_tf32, "mamba_ssm_kernel": cuda_kernel_available(),
                "cpu_threads": torch.get_num_threads(), "flags": dict(vars(self.args)),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def fits(self, seconds: float) -> bool:
        """Is there time for `seconds` more work plus the short training still to come?"""
        reserve = 0.0 if self.data["training"] is not None else self.args.train_seconds + 30.0
        return time.perf_counter() + seconds + reserve <= self.deadline

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_mib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.dev) / 2**20, 1) if self.cuda else None

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def save(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - T0, 1)
        (out / "gpu.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (out / "gpu.md").write_text(markdown(self.data))


def bf16(dev: torch.device, enabled: bool = True):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def exact_fp32():
    """TF32 off: an fp32 reference must be fp32, not 10-bit-mantissa convolutions."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_image(b: int, h: int, w: int, dev, seed: int = 0) -> torch.Tensor:
    """`(b, 3, h, w)` in [0, 1]: smooth colour blobs plus a little noise, image-like and
    deterministic, so the checks need no data."""
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(b, 3, max(2, h // 4), max(2, w // 4), generator=g), size=(h, w),
                        mode="bicubic", align_corners=False)
    return (img + 0.05 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1).to(dev)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 999.0 if mse == 0 else 10 * math.log10(1.0 / mse)  # 999: identical (JSON has no inf)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


# ----------------------------------------------------------------------------- 1. correctness


def record_check(run: Run, where: dict, name: str, fn, *, tol: float, op: str, unit: str) -> None:
    """Run one check; `fn` returns the measured number or None (not applicable). A check that
    raises has failed: the device cannot run that path."""
    row = dict(where, check=name, tol=tol, op=op, unit=unit, value=None, passed=None, note="")
    try:
        value = fn()
        if value is None:
            row["note"] = "n/a"
        else:
            row.update(value=value, passed=bool(value >= tol if op == ">=" else value <= tol))
    except Exception as err:  # noqa: BLE001 - report, go on with the other checks
        row.update(passed=False, note=short(err))
        run.free()
    run.data["correctness"].append(row)
    state = "n/a" if row["passed"] is None else ("pass" if row["passed"] else "FAIL")
    value = "" if row["value"] is None else f"{row['value']:.4g} {unit} (needs {op} {tol:g}) "
    log(f"  check {where['arch']}/{where['variant']} x{where['scale']} {name}: {state} {value}{row['note']}")


def correctness(run: Run, arch: str, variant: str) -> None:
    a, dev = run.args, run.dev
    lr = test_image(2, a.check_lr, a.check_lr, dev)
    diff = dict(tol=SAME_MATH_TOL, op="<=", unit="max|diff|")
    for s in a.scales:
        where = {"arch": arch, "variant": variant, "scale": s}
        torch.manual_seed(0)
        model = build_model(arch, variant=variant, flavor=a.flavor, scale=s).to(dev)
        target = F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False)

        def finite() -> float:  # train mode: the path training takes (MambaIRv2's router samples)
            model.train().zero_grad(set_to_none=True)
            with bf16(dev):
                out = model(lr)
            loss = F.l1_loss(out.float(), target)
            loss.backward()
            bad = [p for p in model.parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            return float(len(bad) + (not torch.isfinite(out).all()) + (not torch.isfinite(loss)))

        record_check(run, where, CHECKS[0], finite, tol=0, op="<=", unit="non-finite tensors")
        model.eval()
        with torch.no_grad(), exact_fp32():
            ref = model(lr).float()

            def bf16_vs_fp32() -> float:
                with bf16(dev):
                    return psnr_db(model(lr).float(), ref)

            def sdpa_vs_explicit() -> float | None:
                if set_fused_attention(model, False) == 0:
                    return None  # no switchable attention (HiT's SCC blocks)
                try:
                    return max_diff(model(lr), ref)
                finally:
                    set_fused_attention(model, True)

            record_check(run, where, CHECKS[1], bf16_vs_fp32, tol=BF16_PSNR_TOL, op=">=", unit="dB")
            record_check(run, where, CHECKS[2], sdpa_vs_explicit, **diff)
            if arch == "mambairv2_l" and s == a.scales[0]:  # the backbone does not depend on s
                record_check(run, where, CHECKS[3], lambda: scan_check(model, where, a.flavor), **diff)
        del model
        record_check(run, where, CHECKS[4], lambda: chunk_check(where, a.flavor, dev), **diff)
        run.free()


def scan_check(model, where: dict, flavor: str) -> float:
    """"auto" (mamba-ssm's kernel when installed, else the chunked scan) against the per-token
    reference loop, same weights. The loop is slow: keep the image small."""
    ref = build_model(where["arch"], variant=where["variant"], flavor=flavor, scale=where["scale"],
                      overrides={"scan_backend": "reference"})
    ref = ref.to(next(model.parameters()).device).eval()
    ref.load_state_dict(model.state_dict())
    x = test_image(1, 16, 16, next(model.parameters()).device, seed=1)
    return max_diff(ref(x), model(x))


def chunk_check(where: dict, flavor: str, dev) -> float:
    """Continuous head: rendering in chunks of 97 queries (multi-pass linear attention) against
    one pass over all queries, same weights."""
    torch.manual_seed(0)
    kw = dict(variant=where["variant"], flavor=flavor, head="continuous")
    small = build_model(where["arch"], **kw, head_overrides={"chunk": 97}).to(dev).eval()
    # A fresh head's last projection is zero (heads.reset_output), which would make the two
    # renderings trivially equal; give it real weights so the attention pass matters.
    small.head.levels[-1].fc2.reset_parameters()
    whole = build_model(where["arch"], **kw, head_overrides={"chunk": 10**9}).to(dev).eval()
    whole.load_state_dict(small.state_dict())
    x, size = test_image(1, 16, 16, dev, seed=2), (16 * where["scale"], 16 * where["scale"])
    with torch.no_grad(), exact_fp32():
        return max_diff(small(x, out_size=size), whole(x, out_size=size))


# ----------------------------------------------------------------------------- 2. and 3. speed


def train_speed(run: Run, model, *, batch: int, s: int, use_bf16: bool, cl: bool, compiled: bool) -> dict:
    """Images/s of L1 + AdamW steps on random data (the content does not change the cost)."""
    a, dev, n = run.args, run.dev, run.args.lr_size
    fmt = torch.channels_last if cl else torch.contiguous_format
    model.train().to(memory_format=fmt)
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr = torch.rand(batch, 3, n, n, device=dev).contiguous(memory_format=fmt)
    hr = torch.rand(batch, 3, n * s, n * s, device=dev)

    def step():
        with bf16(dev, use_bf16):
            out = fwd(lr)
        loss = F.l1_loss(out.float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    try:
        run.reset_peak()
        t = time.perf_counter()
        for _ in range(a.warmup):  # excluded: cudnn autotuning, compilation, allocator growth
            step()
        run.sync()
        warm, t = time.perf_counter() - t, time.perf_counter()
        for _ in range(a.iters):
            step()
        run.sync()
        dt = time.perf_counter() - t
        return {"images_per_s": round(batch * a.iters / dt, 2), "step_ms": round(1000 * dt / a.iters, 2),
                "warmup_s": round(warm, 2), "peak_mib": run.peak_mib()}
    finally:
        del opt
        model.to(memory_format=torch.contiguous_format)
        if compiled and hasattr(torch, "_dynamo"):
            torch._dynamo.reset()  # drop compiled graphs and their memory before the next model


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if tile >= length:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def tiled_upscale(model, lr: torch.Tensor, s: int, tile: int, overlap: int) -> torch.Tensor:
    """Plain tiled inference: LR tiles of `tile` px overlapping by at least `overlap`, outputs
    averaged where tiles overlap (`c2d upscale` has its own feathered tiler, c2disr.tiling)."""
    b, _, h, w = lr.shape
    out = torch.zeros(b, 3, h * s, w * s, device=lr.device)
    count = torch.zeros(1, 1, h * s, w * s, device=lr.device)
    th, tw = min(tile, h), min(tile, w)
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            out[..., y * s:(y + th) * s, x * s:(x + tw) * s] += model(lr[..., y:y + th, x:x + tw]).float()
            count[..., y * s:(y + th) * s, x * s:(x + tw) * s] += 1
    return out / count


def latency(run: Run, model, s: int, tiled: bool) -> dict:
    a = run.args
    h, w = a.out_hw[0] // s, a.out_hw[1] // s
    x = test_image(1, h, w, run.dev, seed=3)
    fn = (lambda: tiled_upscale(model, x, s, a.tile, a.overlap)) if tiled else (lambda: model(x))
    times = []
    with torch.no_grad(), bf16(run.dev):
        model.eval()
        run.reset_peak()
        fn()  # warm-up
        for _ in range(max(1, min(a.iters, 3))):
            run.sync()
            t = time.perf_counter()
            fn()
            run.sync()
            times.append(time.perf_counter() - t)
    return {"lr_hw": [h, w], "ms": round(1000 * statistics.median(times), 2), "peak_mib": run.peak_mib()}


def measure(run: Run, where: dict, kind: str, fn, *, est: float) -> None:
    """One throughput/latency row; skipped (and listed) when it would not fit the budget."""
    row, label = dict(where), " ".join(f"{k}={v}" for k, v in where.items())
    if not run.fits(est):
        row["note"] = "skipped: time budget"
        # compile rows are best effort (about a minute each): they do not make the run incomplete
        run.data["compile_skipped" if where.get("compile") else "skipped"].append(f"{kind} {label}")
    else:
        try:
            row.update(fn())
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
            if where.get("compile") and not isinstance(err, torch.cuda.OutOfMemoryError):
                row["note"] = f"compile failed: {short(err)}"  # a finding, not a crash
            else:
                row["note"] = "OOM" if isinstance(err, torch.cuda.OutOfMemoryError) else f"error: {short(err)}"
                run.data["errors"].append(f"{kind} {label}: {short(err)}")
        run.free()
    run.data[kind].append(row)
    log(f"  {kind} {label}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in where))


def speed(run: Run, arch: str, variant: str, compile_pass: bool) -> None:
    a = run.args
    for s in [max(a.scales)] if compile_pass else a.scales:
        torch.manual_seed(0)
        model = build_model(arch, variant=variant, flavor=a.flavor, scale=s).to(run.dev)
        base = dict(arch=arch, variant=variant, scale=s)
        if compile_pass:  # one compile per model: bf16 at the largest batch (docs/GPU.md: budget)
            where = dict(base, batch=max(a.batches), precision="bf16", compile=True, channels_last=False)
            measure(run, where, "throughput", lambda: train_speed(
                run, model, batch=where["batch"], s=s, use_bf16=True, cl=False, compiled=True), est=75)
            continue
        configs = [(b, p, False) for b in a.batches for p in ("fp32", "bf16")]
        if run.cuda:  # NHWC convolutions matter on tensor cores; on a CPU the rows would repeat
            configs += [(b, "bf16", True) for b in a.batches]
        for b, p, cl in configs:
            where = dict(base, batch=b, precision=p, compile=False, channels_last=cl)
            measure(run, where, "throughput", lambda: train_speed(
                run, model, batch=b, s=s, use_bf16=p == "bf16", cl=cl, compiled=False), est=5)
        for mode in ("whole", "tiled"):
            measure(run, dict(base, mode=mode), "latency", lambda: latency(run, model, s, mode == "tiled"), est=5)
        del model
        run.free()


def latency_ratios(run: Run) -> None:
    """hit/plain and c2d/plain latency per arch, scale and mode (same run, same device)."""
    ms = {(r["arch"], r["variant"], r["scale"], r["mode"]): r["ms"] for r in run.data["latency"] if "ms" in r}
    for arch, s, mode in sorted({(k[0], k[2], k[3]) for k in ms}):
        plain = ms.get((arch, "plain", s, mode))
        row = {"arch": arch, "scale": s, "mode": mode}
        for v in ("hit", "c2d"):
            row[f"{v}/plain"] = round(ms[arch, v, s, mode] / plain, 3) if plain and (arch, v, s, mode) in ms else None
        run.data["latency_ratios"].append(row)


# ----------------------------------------------------------------------------- 4. short training


def crops(images: list[torch.Tensor], size: int, batch: int) -> torch.Tensor:
    """`(batch, 3, size, size)` random HR crops, flipped / transposed at random, taken from the
    images that are big enough."""
    pool = [im for im in images if min(im.shape[-2:]) >= size]
    out = []
    for _ in range(batch):
        im = random.choice(pool)
        y, x = random.randrange(im.shape[1] - size + 1), random.randrange(im.shape[2] - size + 1)
        c = im[:, y:y + size, x:x + size]
        c = c.flip(-1) if random.random() < 0.5 else c
        out.append(c.transpose(-2, -1) if random.random() < 0.5 else c)
    return torch.stack(out)


def set5_psnr(fn, images: list[torch.Tensor], s: int, crop: int | None) -> float:
    """Mean Set5 PSNR-Y (border = s, output clamped and rounded to 8 bits) of `fn(lr)`."""
    vals = []
    for hr in images:
        if crop:  # --quick: centre crops keep the CPU run short
            y, x = (hr.shape[1] - crop) // 2, (hr.shape[2] - crop) // 2
            hr = hr[:, y:y + crop, x:x + crop]
        lr, hr_c = make_pair(hr, s)  # MATLAB bicubic LR rounded to 8 bits, as the published sets
        with torch.no_grad(), exact_fp32():
            sr = fn(lr[None]).float()
        vals.append(psnr(quantize(sr), hr_c[None], crop_border=s).item())
    return round(statistics.fmean(vals), 3)


def train_for(seconds: float, params, base_lr: float, loss_fn, label: str) -> int:
    """Adam steps on `loss_fn(step)` for `seconds` of wall time, linear warm-up over 20 steps."""
    opt = torch.optim.Adam(params, lr=base_lr)
    step, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for g in opt.param_groups:
            g["lr"] = base_lr * min(1.0, (step + 1) / 20)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 250 == 0:
            log(f"  {label} step {step} loss {loss.item():.4f}")
    return step


def train_short(run: Run) -> dict:
    a, dev = run.args, run.dev
    data = Path(a.data)
    if not ((data / "T91").is_dir() and (data / "Set5").is_dir()):
        return {"skipped": f"no T91/ and Set5/ under {data}: run benchmarks/gpu_prepare.sh or pass --data"}
    seconds = a.train_seconds
    if math.isfinite(run.deadline):  # never run past the budget: shorten ("seconds" says by how much)
        seconds = max(1.0, min(seconds, run.deadline - time.perf_counter() - 30))
    random.seed(0)
    torch.manual_seed(0)
    use_bf16 = run.cuda  # CPU bf16 is slower than fp32
    p, batch, crop = (16, 4, 96) if a.quick else (48, 16, None)
    t91, set5 = ([read_image(f)[0].to(dev) for f in list_images(data / name)] for name in ("T91", "Set5"))
    res = {"model": f"swinir_l c2d {a.flavor}", "patch_lr": p, "batch": batch, "seconds": round(seconds, 1),
           "precision": "bf16" if use_bf16 else "fp32", "set5_crop": crop, "psnr": {}, "steps": {}}
    for s in (2, 4):
        res["psnr"][f"bicubic x{s}"] = set5_psnr(lambda x, s=s: imresize(x, s), set5, s, crop)

    # Stage 1: continuous head; one scale s ~ U(1, 4) per batch and p*p sampled queries per image
    # (HIIF's recipe: a batch costs the same at every scale, rendering whole crops grows with s^2).
    model = build_model("swinir_l", variant="c2d", flavor=a.flavor, head="continuous").to(dev).train()

    def stage1_loss(step: int) -> torch.Tensor:
        hs = round(p * random.uniform(1.0, 4.0))
        hr = crops(t91, hs, batch)  # (B, 3, hs, hs)
        lr = quantize(imresize(hr, size=(p, p)))  # (B, 3, p, p), 8-bit like the evaluation's LR
        idx = torch.rand(batch, hs * hs, device=dev).argsort(dim=1)[:, :p * p]  # without replacement
        coords = make_coords(hs, hs, device=dev)[idx]  # (B, Q, 2), pixel centres (y, x) in [-1, 1]
        target = hr.flatten(2).transpose(1, 2).gather(1, idx[..., None].expand(-1, -1, 3))  # (B, Q, 3)
        with bf16(dev, use_bf16):
            pred = model.query(lr, coords, torch.full_like(coords, 2.0 / hs)).float()
        # L2 first: from the zero-initialised residual, L1's constant-size gradients leave the
        # model on its bilinear base (the platform's pretrain.l2_steps); then L1.
        return F.mse_loss(pred, target) if step < 100 else F.l1_loss(pred, target)

    res["steps"]["stage 1"] = train_for(0.6 * seconds, model.parameters(), 4e-4, stage1_loss, "stage 1")
    model.eval()
    for s in (2, 4):
        res["psnr"][f"continuous x{s}"] = set5_psnr(
            lambda x, s=s: model(x, out_size=(x.shape[-2] * s, x.shape[-1] * s)), set5, s, crop)

    # Stage 2 per scale: the backbone with a bilinear-base pixel-shuffle head, least-squares
    # start (a random head first spends its steps undoing its own noise), then L1 fine-tuning.
    for s in (2, 4):
        disc = to_discrete(model, s).to(dev)

        def pair(s=s):
            hr = crops(t91, p * s, batch)
            return quantize(imresize(hr, 1.0 / s)), hr

        gram = xty = 0
        for _ in range(2 if a.quick else 16):
            g, t = head_fit_stats(disc, *pair())
            gram, xty = gram + g, xty + t
        solve_head(disc, gram, xty)
        res["psnr"][f"fitted head x{s}"] = set5_psnr(disc.eval(), set5, s, crop)

        def stage2_loss(step: int, disc=disc) -> torch.Tensor:
            lr, hr = pair()
            with bf16(dev, use_bf16):
                return F.l1_loss(disc(lr).float(), hr)

        disc.train()
        res["steps"][f"stage 2 x{s}"] = train_for(0.2 * seconds, disc.parameters(), 2e-4, stage2_loss, f"x{s}")
        res["psnr"][f"fine-tuned x{s}"] = ft = set5_psnr(disc.eval(), set5, s, crop)
        res["psnr"][f"gain x{s}"] = gain = round(ft - res["psnr"][f"bicubic x{s}"], 3)
        log(f"  stage 2 x{s}: {res['steps'][f'stage 2 x{s}']} steps, Set5 {ft} dB ({gain:+.2f} over bicubic)")
        del disc
        run.free()
    log(f"  steps {res['steps']}")
    return res


# ----------------------------------------------------------------------------- report


def table(head: list[str], rows: list) -> str:
    """Markdown table; a row is a list of cells or a dict read by the header names."""
    rows = [[r.get(k) for k in head] if isinstance(r, dict) else r for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows])


def markdown(d: dict) -> str:
    m, f, t = d["meta"], d["meta"]["flags"], d["training"] or {}
    out = [f"# GPU readiness check ({'quick' if f['quick'] else 'full'})", "",
           f"{m['device_name']} ({m['device']}), torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}; "
           f"{m['started']}, {m.get('elapsed_s')} s; flavour {f['flavor']}; mamba-ssm kernel: {m['mamba_ssm_kernel']}.",
           "", "## Correctness", "", f"bf16 vs fp32: PSNR >= {BF16_PSNR_TOL:g} dB; the other comparisons: "
           f"max |diff| <= {SAME_MATH_TOL:g} (RGB in [0, 1], fp32, TF32 off). '-': not run for this row.", ""]
    cells: dict = {}
    for r in d["correctness"]:
        v = "n/a" if r["passed"] is None else ("pass" if r["passed"] else "**FAIL**")
        v += "" if r["value"] is None else f" {r['value']:.3g}"
        v += f" ({r['note'][:80]})" if r["passed"] is False and r["note"] else ""
        cells.setdefault((r["arch"], r["variant"], r["scale"]), {})[r["check"]] = v
    out += [table(["arch", "variant", "scale", *CHECKS], [[*k, *(c.get(n, "-") for n in CHECKS)]
                                                         for k, c in cells.items()]), "",
            "## Training throughput", "", f"L1 + AdamW on LR {f['lr_size']}x{f['lr_size']} batches, "
            f"{f['warmup']} warm-up + {f['iters']} timed steps; images/s, step time, peak allocated memory.", "",
            table(["arch", "variant", "scale", "batch", "precision", "compile", "channels_last", "images_per_s",
                   "step_ms", "warmup_s", "peak_mib", "note"], d["throughput"]),
            "", "## Inference latency", "", f"Batch 1, bf16 autocast, {f['out_hw'][1]}x{f['out_hw'][0]} output; "
            f"tiled: {f['tile']}-px LR tiles overlapping by >= {f['overlap']}, averaged; median ms.", "",
            table(["arch", "variant", "scale", "lr_hw", "mode", "ms", "peak_mib", "note"], d["latency"]), "",
            table(["arch", "scale", "mode", "hit/plain", "c2d/plain"], d["latency_ratios"]), "",
            "## Short C2D training", ""]
    if "psnr" not in t:
        out += [f"Not run: {t.get('skipped') or t.get('error') or 'not reached'}", ""]
    else:
        steps = ", ".join(f"{k}: {v}" for k, v in t["steps"].items())
        crop = f" ({t['set5_crop']}-px centre crops)" if t["set5_crop"] else ""
        kinds = ("bicubic", "continuous", "fitted head", "fine-tuned", "gain")
        out += [f"{t['model']}, {t['seconds']} s in all ({t['precision']}), LR patches {t['patch_lr']}, "
                f"batch {t['batch']}; steps: {steps}. Set5 PSNR-Y in dB{crop}:", "",
                table(["scale", "bicubic", "continuous (stage 1)", "fitted head", "fine-tuned", "fine-tuned - bicubic"],
                      [[f"x{s}", *(t["psnr"].get(f"{k} x{s}") for k in kinds)] for s in (2, 4)]), ""]
    for title, key in (("Skipped (time budget)", "skipped"), ("Errors", "errors"),
                       ("torch.compile rows skipped (time budget)", "compile_skipped")):
        out += [f"## {title}", "", *(f"- {x}" for x in d[key]), ""] if d[key] else []
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or (args.quick and args.device == "cpu"):
        torch.set_num_threads(args.threads or 1)  # a small shared CPU: extra threads only spin
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    run = Run(args, dev)
    log(f"device {run.data['meta']['device_name']}, torch {torch.__version__}, flavour {args.flavor}, "
        f"budget {args.budget or 'none'} s, data {args.data}, out {args.out}")
    models = [(a, v) for a in args.archs for v in args.variants]
    log("1. correctness")
    for arch, variant in models:
        correctness(run, arch, variant)
    run.save()
    log("2+3. training throughput and inference latency")
    for arch, variant in models:
        speed(run, arch, variant, compile_pass=False)
        run.save()
    latency_ratios(run)
    if args.compile:  # plain variants first, so the budget covers every arch before the others
        log("2b. torch.compile throughput (one compile per model)")
        for arch, variant in sorted(models, key=lambda m: (args.variants.index(m[1]), args.archs.index(m[0]))):
            speed(run, arch, variant, compile_pass=True)
            run.save()
    log("4. short C2D training")
    try:
        run.data["training"] = train_short(run)
    except Exception as err:  # noqa: BLE001 - keep the measurements already taken
        run.data["training"] = {"error": short(err)}
        run.data["errors"].append(f"training: {short(err)}")
    if "psnr" not in run.data["training"]:
        log(f"  training not run: {run.data['training']}")
    run.save()
    log(f"wrote {Path(args.out) / 'gpu.json'} and gpu.md")
    failed = [r for r in run.data["correctness"] if r["passed"] is False]
    for r in failed:
        print(f"FAILED: {r['arch']}/{r['variant']} x{r['scale']} {r['check']}: {r['value']} "
              f"(needs {r['op']} {r['tol']}) {r['note']}", flush=True)
    if failed:
        return 1
    if run.data["skipped"] or run.data["errors"]:
        print(f"INCOMPLETE: {len(run.data['skipped'])} rows skipped, {len(run.data['errors'])} errors "
              "(see gpu.md); every correctness check passed", flush=True)
        return 2
    print(f"all {len(run.data['correctness'])} correctness checks passed or were n/a", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
