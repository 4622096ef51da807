"""`c2d upscale`: upscale an image or a folder with a registered model or a model file."""

from __future__ import annotations

import sys

HELP = "Upscale an image or a folder (any size, tiled) with a registered model or a model file"
DESCRIPTION = """\
Upscale IN (an image file, or a folder walked recursively) into OUT with an SR model:
  --model models:/NAME@champion | models:/NAME/VERSION | runs:/RUN_ID/model | a model file
          (.pt written by c2disr.evaluate.save_model) | a local MLflow model directory

Discrete models upscale by their own scale; continuous (arbitrary-scale) models need --scale S
(any S > 0, fractional allowed; output size round(h*S) x round(w*S)); a scale outside the range
the model was trained on (recorded in its model file) gives a warning.

Images larger than --tile LR pixels on a side are processed in overlapping tiles (--overlap LR
pixels) that are blended, so any size fits in memory without seams; --tile 0 runs whole images.

Outputs are PNG. A file IN goes to OUT (a .png path, or an existing folder); a folder IN goes
to the folder OUT keeping relative paths and names (suffix .png); hidden files and OUT itself
are not read; files without an image suffix are ignored and listed.
Input kinds are handled explicitly:
  RGB 8-bit              -> RGB PNG
  gray (L, 1)            -> upscaled as RGB, written as gray L (BT.601 luma)
  gray 16-bit            -> processed as float, written as 16-bit gray PNG
  RGB(A) 16-bit PNG      -> processed as float, written as 16-bit PNG
  RGBA / LA / palette with transparency
                         -> colour through the model, alpha upscaled with bicubic; RGBA / LA PNG
  palette (P)            -> converted to RGB; RGB PNG
  CMYK, YCbCr, ...       -> converted to RGB; RGB PNG

Corrupt or undecodable image files are skipped, counted and listed at the end.
Exit status: 0 all images written; 1 some inputs were skipped as corrupt (the rest are written);
2 usage errors (bad model, path, scale or tile; an OUT that is IN itself,
lies below a file or is not writable), reported before any image is read.

Tracking server (for models:/ and runs:/): --tracking-uri, else $MLFLOW_TRACKING_URI, else the
running local stack (`c2d stack up`).

Examples:
  c2d upscale --model models:/c2disr-swinir_l-c2d-x4@champion photo.jpg photo_x4.png
  c2d upscale --model runs:/0a1b2c/model --tile 128 ./in ./out
  c2d upscale --model pretrain.pt --scale 2.5 ./in ./out
"""


def configure(parser) -> None:
    from srplatform.upscale import DEFAULT_OVERLAP, DEFAULT_TILE

    parser.add_argument("--model", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model or a model file")
    parser.add_argument("input", metavar="IN", help="image file or folder")
    parser.add_argument("output", metavar="OUT", help="output .png file or folder")
    parser.add_argument("--scale", type=float, default=None, help="scale for continuous models")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="LR tile size (0 = whole image)")
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="LR pixels shared by neighbouring tiles")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--skip-existing", action="store_true", help="leave outputs that already exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--tracking-uri", default="", help="MLflow server for models:/ and runs:/ URIs")


def _device(name: str):
    import torch

    from srplatform.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return dev


def run(args) -> int:
    from pathlib import Path

    from srplatform.errors import UserError
    from srplatform.mlmodel import load_sr_model
    from srplatform.upscale import list_inputs, scale_range_warning, upscale_path

    src = Path(args.input)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    list_inputs(src, args.output)  # inputs and OUT are checked before the model is loaded
    device = _device(args.device)
    uri = args.model
    if uri.startswith(("models:/", "runs:/")):
        from srplatform.evaluation import model_tracking_uri
        from srplatform.registry import http_defaults
        from srplatform.tracking import redact_uri, server_reachable

        http_defaults()
        tracking = model_tracking_uri(args.tracking_uri)
        if not server_reachable(tracking):
            raise UserError(f"MLflow server {redact_uri(tracking)} is not reachable (needed for {uri})")
    else:
        tracking = args.tracking_uri or None
    model = load_sr_model(uri, tracking_uri=tracking).to(device)
    warning = scale_range_warning(model, [args.scale])
    if warning:
        print(warning, file=sys.stderr)
    kind = "continuous" if model.continuous else f"x{model.scale}"
    spec = model.spec
    if not args.quiet:
        print(f"model {uri}: {spec.get('arch')} ({spec.get('variant')}, {spec.get('flavor')}), {kind}, "
              f"on {device}", file=sys.stderr)
    report = upscale_path(model, src, args.output, scale=args.scale, tile=args.tile or None,
                          overlap=args.overlap, device=device, skip_existing=args.skip_existing,
                          progress=not args.quiet)
    for inp, out, mode in report.written:
        print(f"{inp} -> {out} ({mode})")
    print(f"written {len(report.written)}, skipped (corrupt) {len(report.skipped)}, "
          f"ignored (not images) {len(report.ignored)}"
          + (f", existing {len(report.existing)}" if args.skip_existing else ""), file=sys.stderr)
    for path in report.ignored:
        print(f"  ignored: {path}", file=sys.stderr)
    for path, why in report.skipped:  # the reasons from the decoder already name the file
        print(f"  skipped: {why if why.startswith(path) else f'{path}: {why}'}", file=sys.stderr)
    return 0 if report.ok else 1
