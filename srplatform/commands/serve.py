"""`c2d serve`: serve a registered model (following its alias) over HTTP on Ray Serve."""

from __future__ import annotations

import json
import os
import sys

HELP = "Serve a model over HTTP on Ray Serve (POST /upscale), following the registry's alias"
DESCRIPTION = """\
c2d serve MODEL_URI [options]     start serving (in the background; --foreground to stay)
c2d serve status [--json]         what is served, where, replica states, health
c2d serve stop                    stop it: the app, Serve and the Ray it started; no process left

MODEL_URI: models:/NAME@ALIAS (followed: see below), models:/NAME/VERSION, runs:/RUN/model,
a model file (.pt from c2disr.evaluate.save_model) or a local MLflow model directory.

HTTP (bound to 127.0.0.1 unless --host says otherwise; anything else is reachable from other
machines and has no authentication):
  POST /upscale[?scale=S]  body: the image bytes (Content-Type image/* or
                           application/octet-stream); answer: PNG, the same bytes `c2d upscale`
                           writes for that model and image (see "Batching"). scale= only for
                           continuous models (any S > 0); a discrete model accepts only its own.
  GET  /healthz            {"status": "ok", "version": ...}
  GET  /model              name, version, alias, run, scale, params, MACs (1280x720 output), ...
Bad input gets 4xx and one line saying why, and the server keeps serving: empty body (400),
not an image or truncated (400), a format other than PNG/JPEG/BMP/GIF/TIFF/WEBP/PPM (415), a
wrong Content-Type (415), a body over --max-bytes (413), an image whose header declares more than
--max-pixels (413, refused before decoding), an output over --max-output-pixels (413), a scale
the model does not have (400). Large images are tiled (--tile/--overlap, as `c2d upscale`).

Batching: tiles and whole images of the same size from concurrent requests run through the model
together (Ray Serve @serve.batch, up to --max-batch-size, waiting up to --batch-wait-ms).
--max-batch-size 1 turns it off; then every output is byte-identical to `c2d upscale` (same
--tile/--overlap). With batching on, a tile or image that runs alone is too; in a batch of
several, PyTorch's CPU convolutions may take another code path and an 8-bit value can differ by
one (measured: 14 of 306,000 values).

Following the alias: for models:/NAME@ALIAS every replica asks the registry every --poll seconds
where the alias points. When `c2d promote` moved it, the replica loads the new version while it
keeps serving the old one, then switches; requests already running finish on the old model, none
is dropped; /model shows the new version. --poll 0 pins the version found at start.

Replicas: --replicas N, or autoscaling with --min-replicas/--max-replicas/
--target-ongoing-requests (or --autoscaling JSON, passed to Serve's autoscaling_config as is);
--cpus/--gpus per replica.

Ray: a private local Ray is started for the server (its own temp dir, so other programs' ray.init
does not join it) unless --address (default $RAY_ADDRESS) names a cluster's GCS address; on a
cluster only this app is deleted on stop. To deploy to a remote cluster through its Jobs API use
`c2d submit serve -- MODEL_URI --host 0.0.0.0 ...` (the job keeps running while it serves;
`c2d jobs stop ID` takes the app down).

State: $C2D_HOME/serve.json (pid, URL, replica states), log $C2D_HOME/serve.log. One server per
$C2D_HOME. Tracking server (models:/, runs:/): --tracking-uri, else $MLFLOW_TRACKING_URI, else the
running local stack (`c2d stack up`).

Exit status: 0 started / stopped / healthy; 1 status: not running or unhealthy; 2 usage errors.

Examples:
  c2d serve models:/c2disr-swinir_l-c2d-x4@champion
  curl -sf --data-binary @photo.jpg -H 'Content-Type: image/jpeg' \\
       http://127.0.0.1:8000/upscale -o photo_x4.png
  c2d serve models:/c2disr-swinir_l-c2d-x4@champion --replicas 2 --cpus 2 --poll 10
  c2d serve pretrain.pt --min-replicas 1 --max-replicas 4 --target-ongoing-requests 4
  c2d serve status; c2d serve stop
"""


def configure(parser) -> None:
    from srplatform.serve import ServeOptions

    d = ServeOptions(model="")
    parser.add_argument("target", metavar="MODEL_URI|status|stop",
                        help="the model to serve, or `status` / `stop`")
    g = parser.add_argument_group("HTTP")
    g.add_argument("--host", default=d.host, help="address to bind (loopback by default)")
    g.add_argument("--port", type=int, default=d.port, help="HTTP port")
    g.add_argument("--route-prefix", default=d.route_prefix, help="URL prefix of the routes")
    g = parser.add_argument_group("replicas")
    g.add_argument("--replicas", type=int, default=d.num_replicas, help="fixed number of replicas")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: lower bound")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: upper bound")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling: requests per replica to aim for")
    g.add_argument("--autoscaling", default=None, metavar="JSON",
                   help="Serve autoscaling_config as JSON (merged under the three flags above)")
    g.add_argument("--cpus", type=float, default=d.num_cpus, help="CPUs per replica")
    g.add_argument("--gpus", type=float, default=d.num_gpus, help="GPUs per replica")
    g.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests,
                   help="requests one replica takes at once (more wait in Serve's queue)")
    g = parser.add_argument_group("inference")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="tiles/images per model call (1 = batching off)")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a batch waits to fill")
    g.add_argument("--tile", type=int, default=d.tile, help="LR tile size (0 = whole images)")
    g.add_argument("--overlap", type=int, default=d.overlap, help="LR pixels shared by neighbouring tiles")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    g = parser.add_argument_group("limits")
    g.add_argument("--max-bytes", type=int, default=d.max_bytes, help="largest request body")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest input image (w*h)")
    g.add_argument("--max-output-pixels", type=int, default=d.max_output_pixels,
                   help="largest output image (W*H)")
    g = parser.add_argument_group("registry and Ray")
    g.add_argument("--poll", type=float, default=d.poll_s,
                   help="seconds between registry checks of the alias (0 = pin the version)")
    g.add_argument("--tracking-uri", default="", help="MLflow server for models:/ and runs:/ URIs")
    g.add_argument("--address", default=None,
                   help="Ray cluster (GCS address) to join (default: $RAY_ADDRESS, else a private local Ray)")
    g.add_argument("--ray-cpus", type=float, default=None, help="CPUs of the private local Ray (default: all)")
    g = parser.add_argument_group("lifecycle")
    g.add_argument("--foreground", action="store_true", help="serve in this process until Ctrl-C/SIGTERM")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to be ready")
    g.add_argument("--json", action="store_true", help="status: machine-readable output")


def _options(args):
    from srplatform.errors import UserError
    from srplatform.serve import ServeOptions

    autoscaling = None
    if args.autoscaling:
        try:
            autoscaling = json.loads(args.autoscaling)
        except json.JSONDecodeError as exc:
            raise UserError(f"--autoscaling is not JSON: {exc}") from None
        if not isinstance(autoscaling, dict):
            raise UserError("--autoscaling must be a JSON object (Serve's autoscaling_config)")
    flags = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
             "target_ongoing_requests": args.target_ongoing_requests}
    flags = {k: v for k, v in flags.items() if v is not None}
    if flags:
        autoscaling = {**(autoscaling or {}), **flags}
    address = args.address if args.address is not None else os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise UserError(f"Ray address {address} is a Jobs API (dashboard) address: deploy there with "
                        "`c2d submit serve -- MODEL_URI ...`, or give the cluster's GCS address "
                        "(HOST:6379) with --address")
    return ServeOptions(
        model=args.target, host=args.host, port=args.port, route_prefix=args.route_prefix,
        address=address, ray_cpus=args.ray_cpus, num_replicas=args.replicas, autoscaling=autoscaling,
        num_cpus=args.cpus, num_gpus=args.gpus, max_ongoing_requests=args.max_ongoing_requests,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, tile=args.tile,
        overlap=args.overlap, device=args.device, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
        max_output_pixels=args.max_output_pixels, poll_s=args.poll,
    ).check()


def _check_model(opts, tracking_uri: str) -> str:
    """Resolve the tracking server and load the model once here, so a bad URI, a missing alias or
    an unreachable server fails now with a clear message, not later inside a replica."""
    from srplatform.errors import UserError
    from srplatform.mlmodel import load_sr_model

    uri = opts.model
    tracking = tracking_uri or None
    if uri.startswith(("models:/", "runs:/")):
        from srplatform.evaluation import model_tracking_uri
        from srplatform.registry import http_defaults
        from srplatform.tracking import redact_uri, server_reachable

        http_defaults()
        tracking = model_tracking_uri(tracking_uri)
        if not server_reachable(tracking):
            raise UserError(f"MLflow server {redact_uri(tracking)} is not reachable (needed for {uri})")
    elif not os.path.exists(os.path.expanduser(uri)):
        raise UserError(f"model {uri!r} not found: give models:/NAME@ALIAS, models:/NAME/VERSION, "
                        "runs:/RUN/model or a model file (or `status` / `stop`)")
    else:
        uri = os.path.abspath(os.path.expanduser(uri))  # replicas run in other directories
    model = load_sr_model(uri, tracking_uri=tracking)
    kind = "continuous" if model.continuous else f"x{model.scale}"
    spec = model.spec
    print(f"model {opts.model}: {spec.get('arch')} ({spec.get('variant')}, {spec.get('flavor')}), {kind}",
          file=sys.stderr)
    opts.model, opts.tracking_uri = uri, tracking
    return uri


def _status(args) -> int:
    from srplatform import serve

    st = serve.status()
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0 if st and st.get("healthy") else 1
    if not st:
        print("not serving (no $C2D_HOME/serve.json)")
        return 1
    state = "healthy" if st["healthy"] else ("running, not answering" if st["running"] else "not running")
    print(f"{state}: {st['model']} at {st['url']} (pid {st['pid']}, "
          f"{'private Ray' if st.get('started_ray') else 'Ray ' + str(st.get('ray_address'))})")
    info = st.get("model_info") or {}
    if info:
        print(f"  model: {info.get('name') or info.get('loaded_uri')} version {info.get('version')} "
              f"alias {info.get('alias')} scale {info.get('scale') or 'continuous'} "
              f"params {info.get('params'):,} MACs {info.get('macs') or 0:,}")
    for app, a in (st.get("serve") or {}).items():
        for dep, dd in a["deployments"].items():
            reps = ", ".join(f"{k.lower()} {v}" for k, v in dd["replicas"].items())
            print(f"  {app}/{dep}: {dd['status'].lower()}, replicas: {reps or 'none'}")
    if st.get("log"):
        print(f"  log: {st['log']}")
    return 0 if st["healthy"] else 1


def run(args) -> int:
    from srplatform import serve
    from srplatform.errors import UserError

    if args.target == "status":
        return _status(args)
    if args.target == "stop":
        res = serve.stop()
        if not res["stopped"]:
            print("not serving (nothing to stop)", file=sys.stderr)
            return 0
        if res["left"]:
            raise UserError(f"processes still running after stop: {res['left']}")
        extra = f" (killed {len(res['killed'])} that did not exit in time)" if res["killed"] else ""
        print(f"stopped the server (pid {res['pid']}) and everything it started{extra}")
        return 0
    opts = _options(args)
    _check_model(opts, args.tracking_uri)
    if args.foreground:
        return serve.run_foreground(opts, ready_timeout=args.timeout)
    st = serve.start_background(opts, timeout=args.timeout)
    print(f"serving {args.target} at {st['url']} (pid {st['pid']})")
    print(f"  try:    curl -sf --data-binary @photo.png -H 'Content-Type: image/png' "
          f"{st['url']}/upscale -o photo_sr.png")
    print("  status: c2d serve status")
    print("  stop:   c2d serve stop")
    print(f"  log:    {st['log']}")
    return 0
