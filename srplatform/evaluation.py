"""Platform side of evaluation: what `c2d eval` resolves, runs, prints, writes and logs.

    up = resolve_model("bicubic")                     # or a model file, models:/NAME@alias, ...
    report = run_evaluation(up, resolve_data("Set5,Set14"), scales=[2, 3, 4])
    print(format_table(report)); log_report(report, tracking_uri)

The measurement itself (LR making, metrics, the published convention) is c2disr.evaluate; this
module adds the things the method package must not know about: where benchmark sets live, MLflow
model URIs, devices, JSON and MLflow logging.

Model specs:
* `bicubic`: MATLAB bicubic upscaling of the LR input (the published baseline);
* a local model file (`c2disr.evaluate.save_model` format) or `file://` URI;
* an MLflow model: `models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/RUN/model`, or a local
  MLflow model directory. URIs are resolved through `srplatform.mlmodel.load_sr_model` (the one
  place that resolves them) against the tracking server given by `--tracking-uri`, else
  `$MLFLOW_TRACKING_URI`, else the local stack if it is running; with none of these it is a
  `UserError` saying how to configure one (evaluation never starts a server itself).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srplatform.errors import UserError

__all__ = [
    "DEFAULT_SCALES",
    "Upscaler",
    "shared_dir",
    "resolve_data",
    "parse_scales",
    "model_tracking_uri",
    "resolve_model",
    "progress_printer",
    "run_evaluation",
    "format_table",
    "write_json",
    "log_report",
]

DEFAULT_SCALES = (2, 3, 4)
EXPERIMENT = "c2d-eval"
_MLFLOW_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:")


# ----------------------------------------------------------------------------- data


def shared_dir() -> Path:
    """The shared folder with benchmark data and weights: `$C2D_SHARED`, else `../shared`
    beside the repository root."""
    env = os.environ.get("C2D_SHARED")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared"


def resolve_data(spec: str) -> list[tuple[str, Path]]:
    """`"Set5,Set14,/path/to/dir"` -> `[(display name, folder), ...]`.

    An existing directory path is used as is; otherwise a bare name is looked up
    (case-insensitively) under `<shared>/data`. Raises UserError naming what was not found.
    """
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise UserError("--data is empty: give benchmark names (Set5, Set14) or folders")
    data_root = shared_dir() / "data"
    out: list[tuple[str, Path]] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            out.append((path.name or str(path), path))
            continue
        if os.sep not in item and "/" not in item and data_root.is_dir():
            match = [p for p in data_root.iterdir() if p.is_dir() and p.name.lower() == item.lower()]
            if match:
                out.append((match[0].name, match[0]))
                continue
        known = (
            sorted(p.name for p in data_root.iterdir() if p.is_dir()) if data_root.is_dir() else []
        )
        where = (
            f"known names under {data_root}: {', '.join(known)}"
            if known
            else f"no benchmark data found at {data_root} (set C2D_SHARED to the shared folder)"
        )
        raise UserError(f"--data {item!r}: no such folder or benchmark name; {where}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"--data names the same set twice: {', '.join(names)}")
    return out


def parse_scales(text: str | None) -> list[int] | None:
    """`"2,3,4"` -> `[2, 3, 4]`; None/"" -> None (the model's default)."""
    if text is None or not str(text).strip():
        return None
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"--scales: {part!r} is not an integer (e.g. --scales 2,3,4)") from None
        if value < 1:
            raise UserError(f"--scales: {value} must be >= 1")
        if value not in out:
            out.append(value)
    return out


# ----------------------------------------------------------------------------- models


@dataclass(kw_only=True)
class Upscaler:
    """Something to evaluate.

    name: the spec the user gave (shown in tables, logged to MLflow).
    kind: "bicubic" or "model".
    scales: the integer scales it can produce; None = any.
    info: JSON-able description (model spec, parameters, device).
    make_fn: `scale -> upscale_fn` with `upscale_fn(lr (1,3,h,w) [0,1] RGB) -> (1,3,h*s,w*s)`.
    device: where LR inputs are placed.
    """

    name: str
    kind: str
    scales: tuple[int, ...] | None
    info: dict[str, Any]
    make_fn: Callable[[int], Callable]
    device: str = "cpu"
    default_scales: tuple[int, ...] = field(default=DEFAULT_SCALES)
    scale_range: tuple[float, float] | None = None  # a continuous model's training scales


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    return device


def _healthy_local_stack_uri() -> str:
    """The running local stack's tracking URI, or "" (never starts anything)."""
    from srplatform.stack import read_state
    from srplatform.tracking import server_reachable

    state = read_state() or {}
    uri = (state.get("mlflow") or {}).get("tracking_uri") or ""
    return uri if uri and server_reachable(uri, timeout=2.0) else ""


def optional_tracking_uri(explicit: str | None = None) -> str:
    """explicit > $MLFLOW_TRACKING_URI > the running local stack > "" (nothing to log to)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI", "") or _healthy_local_stack_uri()


def model_tracking_uri(explicit: str | None = None) -> str:
    """Tracking server for resolving MLflow model URIs: explicit > $MLFLOW_TRACKING_URI > the
    running local stack. UserError when none is configured."""
    uri = optional_tracking_uri(explicit)
    if not uri:
        raise UserError(
            "MLflow model URIs (models:/..., runs:/...) need a tracking server: pass "
            "--tracking-uri URI, set MLFLOW_TRACKING_URI, or start the local one with "
            "`c2d stack up`"
        )
    return uri


def _load_model(spec: str, tracking_uri: str | None):
    """An SRModel (CPU, eval) from a file, file:// URI, MLflow model dir or MLflow URI."""
    from c2disr.evaluate import load_model

    text = spec
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse

        text = unquote(urlparse(text).path)
    is_uri = text.startswith(_MLFLOW_URI_PREFIXES) or re.match(r"^[a-z][a-z0-9+.-]*://", text)
    path = Path(text).expanduser()
    if not is_uri and path.is_file():
        try:
            return load_model(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from exc
    if not is_uri and not path.is_dir():
        if "/" in text or os.sep in text or path.suffix.lower() in (".pt", ".pth", ".ckpt"):
            raise UserError(f"--model {spec!r}: no such model file or directory")
        raise UserError(
            f"--model {spec!r}: unknown model; give 'bicubic', a model file (saved by "
            "c2disr.evaluate.save_model), an MLflow model directory, models:/NAME@ALIAS, "
            "models:/NAME/VERSION or runs:/RUN_ID/model"
        )
    try:
        from srplatform.mlmodel import load_sr_model
    except ImportError as exc:  # pragma: no cover - the module ships with the platform
        raise UserError(f"--model {spec!r}: MLflow model support is unavailable ({exc})") from exc
    uri = model_tracking_uri(tracking_uri) if is_uri else None
    return load_sr_model(text, tracking_uri=uri)


def _model_fn(model, scale: int, *, tile: int, overlap: int) -> Callable:
    from c2disr.tiling import tiled_forward

    if model.continuous:
        def forward(x):
            return model(x, out_size=(x.shape[-2] * scale, x.shape[-1] * scale))
    else:
        if model.scale != scale:
            raise UserError(f"this is a x{model.scale} model; it cannot be evaluated at x{scale}")
        forward = model
    if tile:
        return lambda x: tiled_forward(forward, x, scale, tile=tile, overlap=overlap)
    return forward


def resolve_model(
    spec: str,
    *,
    device: str = "auto",
    tracking_uri: str | None = None,
    tile: int = 0,
    overlap: int = 32,
) -> Upscaler:
    """Turn a `--model` spec into an `Upscaler` (see the module docstring for the specs).

    `tile` > 0 runs models (and bicubic) in overlapping LR tiles of that size (`overlap` LR
    pixels shared). Raises UserError for unknown specs and unreadable models.
    """
    if tile < 0 or overlap < 0 or (tile and overlap >= tile):
        raise UserError(f"--tile {tile} / --tile-overlap {overlap}: need 0 <= overlap < tile")
    spec = str(spec).strip()
    if spec.lower() == "bicubic":
        from c2disr.ops.resize import imresize
        from c2disr.tiling import tiled_forward

        def make(scale: int) -> Callable:
            fn = lambda x: imresize(x, scale)  # noqa: E731 - a one-line closure over scale
            if tile:
                return lambda x: tiled_forward(fn, x, scale, tile=tile, overlap=overlap)
            return fn

        return Upscaler(
            name="bicubic", kind="bicubic", scales=None, make_fn=make, device="cpu",
            info={"kind": "bicubic", "method": "MATLAB-compatible bicubic (a=-0.5)",
                  "tile": tile, "tile_overlap": overlap if tile else 0},
        )
    dev = _pick_device(device)
    model = _load_model(spec, tracking_uri).to(dev).eval()
    scales = None if model.continuous else (int(model.scale),)
    import torch

    params = sum(p.numel() for p in model.parameters())
    return Upscaler(
        name=spec, kind="model", scales=scales, device=dev,
        default_scales=scales or DEFAULT_SCALES,
        scale_range=model.scale_range if model.continuous else None,
        make_fn=lambda s: _model_fn(model, s, tile=tile, overlap=overlap),
        info={"kind": "model", "source": spec, "spec": dict(model.spec), "params": int(params),
              "device": dev, "torch": torch.__version__, "tile": tile,
              "tile_overlap": overlap if tile else 0},
    )


# ----------------------------------------------------------------------------- running


def progress_printer(stream=None) -> Callable[[str, int, int, int, dict], None]:
    stream = stream or sys.stderr

    def show(set_name: str, scale: int, i: int, n: int, row: dict) -> None:
        print(
            f"[{set_name} x{scale}] {i + 1}/{n} {row['name']}: PSNR {row['psnr']:.2f} dB, "
            f"SSIM {row['ssim']:.4f} ({row['seconds']:.2f} s)",
            file=stream, flush=True,
        )

    return show


def run_evaluation(
    upscaler: Upscaler,
    datasets: Sequence[tuple[str, Path]],
    scales: Sequence[int] | None = None,
    *,
    quantize_lr: bool = True,
    progress: Callable[[str, int, int, int, dict], None] | None = None,
) -> dict:
    """Evaluate on every (set, scale); returns the JSON-able report.

    `scales` None: the upscaler's default (bicubic and continuous models 2, 3, 4; a discrete
    model its own scale). A discrete model asked for another scale is a UserError.
    `progress(set_name, scale, index, count, row)` is called after each image.
    """
    from c2disr.evaluate import evaluate_folder

    scales = list(scales) if scales else list(upscaler.default_scales)
    if upscaler.scales is not None:
        bad = [s for s in scales if s not in upscaler.scales]
        if bad:
            have = ",".join(str(s) for s in upscaler.scales)
            raise UserError(
                f"--model {upscaler.name} is a x{have} model and cannot be evaluated at "
                f"x{','.join(str(s) for s in bad)}; pass --scales {have}"
            )
    results = []
    for set_name, folder in datasets:
        for scale in scales:
            fn = upscaler.make_fn(scale)
            cb = None
            if progress is not None:
                cb = lambda i, n, row, _s=set_name, _k=scale: progress(_s, _k, i, n, row)  # noqa: E731
            try:
                res = evaluate_folder(
                    fn, folder, scale, quantize_lr=quantize_lr, device=upscaler.device, progress=cb
                )
            except (FileNotFoundError, ValueError, TypeError) as exc:
                raise UserError(f"{set_name} x{scale}: {exc}") from exc
            res["set"] = set_name
            results.append(res)
    from c2disr import __version__ as c2disr_version

    return {
        "model": upscaler.name,
        "model_info": upscaler.info,
        "scales": scales,
        "sets": [name for name, _ in datasets],
        "convention": {
            "lr": "MATLAB bicubic imresize(hr, 1/scale) of HR cropped to a multiple of scale"
            + (", rounded to uint8" if quantize_lr else ", not rounded"),
            "output": "clamped to [0, 1] and rounded to uint8",
            "metric_channel": "BT.601 Y (grayscale originals: their gray values)",
            "crop_border": "scale",
            "ssim": "11x11 Gaussian window, sigma 1.5, valid positions",
        },
        "c2disr_version": c2disr_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }


def format_table(report: dict) -> str:
    """The set x scale table of `PSNR / SSIM`."""
    scales = report["scales"]
    by = {(r["set"], r["scale"]): r for r in report["results"]}
    width = max([len("set")] + [len(s) for s in report["sets"]])
    head = f"{'set':<{width}}  " + "  ".join(f"{'x' + str(s):<16}" for s in scales)
    lines = [f"model: {report['model']}", head.rstrip()]
    for name in report["sets"]:
        cells = []
        for s in scales:
            r = by.get((name, s))
            cells.append(f"{r['psnr']:.2f} / {r['ssim']:.4f}" if r else "-")
        lines.append((f"{name:<{width}}  " + "  ".join(f"{c:<16}" for c in cells)).rstrip())
    for r in report["results"]:
        if r.get("skipped"):
            lines.append(f"  {r['set']} x{r['scale']}: measured {r['count']} of {r['total']} images; "
                         f"skipped {', '.join(s['name'] for s in r['skipped'])}")
    lines.append("(PSNR dB / SSIM on Y, border = scale, LR = MATLAB bicubic of HR)")
    return "\n".join(lines)


def _json_safe(v: Any) -> Any:
    """The report with non-finite floats as strings ("inf" PSNR of a perfect image), so the JSON
    is standard (no Infinity / NaN tokens)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json(report: dict, path: str | Path) -> Path:
    """Write the report as standard JSON (non-finite floats as strings, see `_json_safe`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    return path


def _metric_key(text: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and spaces; keep it to the safe subset.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def log_report(
    report: dict,
    tracking_uri: str,
    *,
    experiment: str = EXPERIMENT,
    run_name: str | None = None,
    say: Callable[[str], None] | None = None,
) -> str | None:
    """Log the report to MLflow as one run; returns its id, or None when the server is down.

    Metrics `<set>_x<scale>_psnr` / `_ssim` (e.g. `Set5_x4_psnr`), params describing the model
    and data, the full report as `eval.json`. An unreachable server gives one warning (via
    srplatform.tracking.Tracker) and None, never an exception.
    """
    from srplatform.tracking import Tracker

    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tracker = Tracker(tracking_uri, say=say)
    if not tracker.available:
        return None
    run_id = tracker.create_run(
        experiment, run_name or f"eval {report['model']}",
        tags={"c2d.kind": "eval", "c2d.model": report["model"]},
    )
    if not run_id:
        return None
    info = report.get("model_info", {})
    params = {
        "model": report["model"],
        "sets": ",".join(report["sets"]),
        "scales": ",".join(str(s) for s in report["scales"]),
        "lr_convention": report["convention"]["lr"],
        "tile": info.get("tile", 0),
    }
    if "spec" in info:
        params.update({f"spec.{k}": v for k, v in info["spec"].items()})
    tracker.log_params(run_id, params)
    metrics = {}
    for r in report["results"]:
        base = _metric_key(f"{r['set']}_x{r['scale']}")
        for key in ("psnr", "ssim"):
            if math.isfinite(r[key]):  # a perfect reconstruction (inf dB) is in eval.json only
                metrics[f"{base}_{key}"] = r[key]
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.log_dict(run_id, _json_safe(report), "eval.json")
    tracker.end_run(run_id, "FINISHED")
    if tracker.summary():
        say(tracker.summary())
    return run_id
