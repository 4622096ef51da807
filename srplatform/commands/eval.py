"""`c2d eval`: PSNR/SSIM of a model (or the bicubic baseline) on benchmark folders."""

from __future__ import annotations

import sys

HELP = "PSNR/SSIM on benchmark folders with the published convention (bicubic or a model)"
DESCRIPTION = HELP + """

Makes LR inputs from each HR image the way published tables do (crop to a multiple of the scale,
MATLAB bicubic downscale, rounded to uint8), upscales them with --model, and measures PSNR and
SSIM on the BT.601 Y channel of the uint8-rounded output with `scale` border pixels removed.
Prints a set x scale table on stdout and per-image progress on stderr. An image that cannot be
measured (unreadable, or smaller than the scale) is skipped and named; the table then says how
many images each mean is over, and the exit status is 1 (0 when every image was measured,
2 for usage errors).

--model:
  bicubic                      MATLAB bicubic upscaling (the published baseline)
  PATH or file://PATH          a model file saved by c2disr.evaluate.save_model
  DIR                          a local MLflow model directory
  models:/NAME@ALIAS           a registered model (also models:/NAME/VERSION, runs:/RUN/model),
                               resolved on the tracking server (--tracking-uri, else
                               $MLFLOW_TRACKING_URI, else a running local stack)

--data: comma-separated benchmark names (Set5, Set14: looked up in $C2D_SHARED/data or
../shared/data beside the repository) or folders of HR images.

Results are logged to MLflow (one run in --experiment) on the same server: --tracking-uri, else
$MLFLOW_TRACKING_URI, else the running local stack (none is started for an eval); an unreachable
server is a warning, not a failure. --no-mlflow logs nothing.

Examples:
  c2d eval --model bicubic --data Set5,Set14 --scales 2,3,4
  c2d eval --model runs/x4/model.pt --data Set5 --tile 128 --json set5.json
  c2d eval --model models:/c2disr-swinir_l-c2d-x4@champion --data Set5,Set14
"""


def configure(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="bicubic | model file | MLflow model dir | models:/NAME@ALIAS | runs:/RUN/model")
    parser.add_argument("--data", default="Set5,Set14",
                        help="comma-separated benchmark names or folders of HR images")
    parser.add_argument("--scales", default=None,
                        help="comma-separated integer scales (default: 2,3,4; a discrete model: its own)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                        help="also write the full report (per-image rows) as JSON here")
    parser.add_argument("--tile", type=int, default=0, metavar="N",
                        help="run in overlapping LR tiles of N pixels (0: whole images)")
    parser.add_argument("--tile-overlap", type=int, default=32, metavar="N",
                        help="LR pixels shared by neighbouring tiles")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--lr-float", action="store_true",
                        help="keep LR inputs in float instead of rounding them to uint8")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, then the running local stack)")
    parser.add_argument("--experiment", default="c2d-eval", help="MLflow experiment for the run")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not log to MLflow even when a tracking URI is configured")
    parser.add_argument("--quiet", action="store_true", help="no per-image progress on stderr")


def run(args) -> int:
    from srplatform import evaluation as ev

    datasets = ev.resolve_data(args.data)
    scales = ev.parse_scales(args.scales)
    upscaler = ev.resolve_model(
        args.model, device=args.device, tracking_uri=args.tracking_uri,
        tile=args.tile, overlap=args.tile_overlap,
    )
    from srplatform.upscale import range_warning

    warning = range_warning(upscaler.scale_range, scales or upscaler.default_scales)
    if warning:
        print(warning, file=sys.stderr)
    report = ev.run_evaluation(
        upscaler, datasets, scales, quantize_lr=not args.lr_float,
        progress=None if args.quiet else ev.progress_printer(),
    )
    print(ev.format_table(report), flush=True)
    skipped = [(r["set"], r["scale"], s) for r in report["results"] for s in r.get("skipped", [])]
    for set_name, scale, s in skipped:
        print(f"skipped [{set_name} x{scale}] {s['reason']}", file=sys.stderr)
    if args.json_path:
        path = ev.write_json(report, args.json_path)
        print(f"wrote {path}", file=sys.stderr)
    uri = "" if args.no_mlflow else ev.optional_tracking_uri(args.tracking_uri)
    if uri:
        run_id = ev.log_report(report, uri, experiment=args.experiment)
        if run_id:
            print(f"logged to MLflow run {run_id} (experiment {args.experiment})", file=sys.stderr)
    return 1 if skipped else 0
