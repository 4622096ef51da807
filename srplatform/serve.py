"""Serve an SR model over HTTP on Ray Serve (what `c2d serve` runs).

One Serve application (`APP_NAME`) with one deployment, `SRService`; each replica holds one
model and answers:

- `POST /upscale[?scale=S]`: image bytes in (Content-Type `image/*` or
  `application/octet-stream`), PNG out, exactly as `c2d upscale` writes it (same decoding,
  tiling, blending and PNG writer: `srplatform.upscale.read_input`, `sr_forward`,
  `write_output`). Bad input is answered 4xx with a one-line reason; the replica keeps serving.
- `GET /healthz`: `{"status": "ok", "version": ...}` once a model is loaded.
- `GET /model`: name, version, alias, run, scale, parameters and MACs of the model now serving.

Batching: with `max_batch_size > 1`, whole images and tiles of the same size (and scale, and
model version) from concurrent requests are run through the model together (`@serve.batch`).
The tiles of a large image are cut and blended exactly as `c2d upscale` does; only the grouping of
the model calls differs. A batch of one is the very call `c2d upscale` makes, so outputs are
byte-identical to `c2d upscale` whenever a tile or image runs alone, and always with
`max_batch_size = 1` (batching off: each request runs `srplatform.upscale.upscale_image`). In a
batch of several, PyTorch's CPU convolution may pick another algorithm for the first 3-channel
convolution, which changes results by ~1e-6 and can flip the rounding of an 8-bit value by one.
Continuous models batch whole images; their tiled path (`tiled_query`) runs per request.

Following an alias: for `models:/NAME@ALIAS` each replica asks the registry every `poll_s`
seconds which version the alias points to; when it moved, the replica loads
`models:/NAME/<new version>` in a background thread while it keeps serving the old one, then
swaps one reference. A request reads that reference once when it starts, so requests in flight
finish on the model they started with and none is dropped. Replicas poll independently, so for
up to `poll_s` seconds two replicas may serve different versions; `/model` says which.

Hostile input: the body size is checked from Content-Length and again while reading
(`max_bytes`); the image header is parsed before any pixel is decoded, so a file declaring a huge
size is refused by its dimensions (`max_pixels`; Pillow's own `MAX_IMAGE_PIXELS` guard is set to
the same limit); only raster formats Pillow decodes itself are accepted (no EPS, which would run
Ghostscript); continuous scales are bounded by the output size (`max_output_pixels`).

The local lifecycle (`run_foreground`, `start_background`, `stop`, `status`): a supervisor
process starts a private Ray (or joins `address`), deploys the app, records itself in
`$C2D_HOME/serve.json` and waits for SIGTERM; stopping it deletes the app, shuts Serve and the
Ray it started down, and `stop` then checks that no process of its session is left.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from srplatform.errors import UserError
from srplatform.stack import _alive  # a zombie counts as dead

__all__ = ["ServeOptions", "SRService", "HttpError", "probe_image", "parse_model_uri",
           "build_app", "deploy", "run_foreground", "start_background", "stop", "status", "APP_NAME"]

APP_NAME = "c2d-serve"
STATE_FILE = "serve.json"
# Raster formats whose decoders are Pillow's own; anything else (EPS runs Ghostscript, PSD,
# ICO, ...) is refused before decoding.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
           "WEBP": ".webp", "PPM": ".ppm"}
# Environment passed to replicas when joining a cluster (names only; values never printed).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "C2D_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


# ----------------------------------------------------------------------------- options


@dataclass(kw_only=True)
class ServeOptions:
    """Everything `c2d serve` configures; travels to the supervisor and the replicas as JSON."""

    model: str
    tracking_uri: str | None = None  # resolved by the CLI for models:/ and runs:/ URIs
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # Ray cluster to join; None = start a private local Ray
    ray_cpus: float | None = None  # CPUs of the private Ray (None = all)
    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None  # Serve's autoscaling_config, passed through
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    max_ongoing_requests: int = 16
    max_batch_size: int = 4  # 1 = batching off
    batch_wait_ms: float = 10.0
    tile: int = 256
    overlap: int = 16
    device: str = "auto"
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 4_000_000  # input pixels
    max_output_pixels: int = 64_000_000
    poll_s: float = 30.0  # 0 = do not follow the alias
    app_name: str = APP_NAME
    route_prefix: str = "/"

    def check(self) -> ServeOptions:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UserError(what)

        need(0 <= self.port <= 65535, f"--port must be 0..65535, got {self.port}")
        need(self.num_replicas >= 1, f"--replicas must be >= 1, got {self.num_replicas}")
        need(self.num_cpus >= 0 and self.num_gpus >= 0, "--cpus/--gpus per replica must be >= 0")
        need(self.max_ongoing_requests >= 1, "--max-ongoing-requests must be >= 1")
        need(self.max_batch_size >= 1, "--max-batch-size must be >= 1 (1 = batching off)")
        need(self.batch_wait_ms >= 0, "--batch-wait-ms must be >= 0")
        need(self.tile >= 0, f"--tile must be >= 0 (0 = whole images), got {self.tile}")
        need(not self.tile or 0 <= self.overlap < self.tile,
             f"need 0 <= --overlap < --tile, got tile={self.tile}, overlap={self.overlap}")
        need(self.max_bytes >= 1 and self.max_pixels >= 1 and self.max_output_pixels >= 1,
             "--max-bytes/--max-pixels/--max-output-pixels must be >= 1")
        need(self.poll_s >= 0, "--poll must be >= 0 (0 = do not follow the alias)")
        need(self.route_prefix.startswith("/"), "--route-prefix must start with /")
        if self.autoscaling is not None:
            from ray.serve.config import AutoscalingConfig

            unknown = sorted(set(self.autoscaling) - set(AutoscalingConfig.model_fields))
            need(not unknown, f"unknown autoscaling settings {unknown}; Serve's are "
                              f"{', '.join(sorted(AutoscalingConfig.model_fields))}")
            try:
                AutoscalingConfig(**self.autoscaling)
            except Exception as exc:  # pydantic's ValidationError names the bad key
                raise UserError(f"autoscaling settings rejected by Ray Serve: {exc}") from None
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeOptions:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown serve options: {sorted(unknown)}")
        return cls(**data)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"


def parse_model_uri(uri: str) -> dict[str, str | None]:
    """`{"name", "alias", "version"}` of a `models:/NAME@ALIAS` / `models:/NAME/VERSION` URI
    (all None for other model URIs and files)."""
    out: dict[str, str | None] = {"name": None, "alias": None, "version": None}
    if not uri.startswith("models:/"):
        return out
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        out["name"], out["alias"] = rest.split("@", 1)
    elif "/" in rest:
        out["name"], out["version"] = rest.split("/", 1)
    return out


# ----------------------------------------------------------------------------- request checks


class HttpError(Exception):
    """A request the service refuses: HTTP `status` with a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_content_type(value: str | None) -> None:
    """Accept `image/*`, `application/octet-stream` or none; 415 otherwise."""
    kind = (value or "").split(";", 1)[0].strip().lower()
    if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise HttpError(415, f"Content-Type {kind!r} is not accepted: send the image bytes as "
                             "image/* or application/octet-stream (curl: --data-binary @FILE "
                             "-H 'Content-Type: image/png')")


def probe_image(body: bytes, max_pixels: int) -> tuple[str, int, int]:
    """`(format, width, height)` from the image header, before any pixel is decoded.

    400 for an empty body or bytes Pillow cannot identify, 415 for a format outside
    `ALLOWED_FORMATS`, 413 for more than `max_pixels` pixels (also when Pillow's own
    decompression-bomb guard trips first).
    """
    from PIL import Image, UnidentifiedImageError

    if not body:
        raise HttpError(400, "empty body: POST the image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as im:  # reads the header only
                fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as exc:
        raise HttpError(413, f"image too large: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise HttpError(400, "the body is not an image: no image format matches its first "
                                 "bytes") from None
        raise HttpError(400, f"the body is not a readable image ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    if fmt not in ALLOWED_FORMATS:
        raise HttpError(415, f"image format {fmt} is not accepted; send one of "
                             f"{', '.join(ALLOWED_FORMATS)}")
    if w < 1 or h < 1:
        raise HttpError(400, f"image declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise HttpError(413, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                             "(--max-pixels); split it or downscale it")
    return fmt, w, h


def parse_query(params, continuous: bool) -> float | None:
    """The `scale` query parameter (the only one); 400 for anything else."""
    unknown = sorted(set(params.keys()) - {"scale"})
    if unknown:
        raise HttpError(400, f"unknown query parameter(s) {', '.join(unknown)}; the only one is scale")
    values = params.getlist("scale") if hasattr(params, "getlist") else [params.get("scale")]
    values = [v for v in values if v is not None]
    if len(values) > 1:
        raise HttpError(400, "give scale at most once")
    if not values:
        return None
    try:
        s = float(values[0])
    except ValueError:
        raise HttpError(400, f"scale must be a number, got {values[0][:40]!r}") from None
    if not math.isfinite(s) or s <= 0:
        raise HttpError(400, f"scale must be a positive number, got {values[0][:40]!r}")
    return s


# ----------------------------------------------------------------------------- the deployment


@dataclass
class Loaded:
    """One loaded model and what `/model` says about it (immutable once built)."""

    model: Any
    info: dict[str, Any]
    device: Any
    loaded_at: float = field(default_factory=time.time)


def _macs(model) -> int | None:
    """MACs at the papers' convention (1280x720 output) for the model's own scale (x4 for a
    continuous model), None when they cannot be counted."""
    try:
        from c2disr.complexity import OUTPUT_HW, count_macs, lr_size_for_output

        scale = 4 if model.continuous else int(model.scale)
        out = OUTPUT_HW if model.continuous else None
        return int(count_macs(model, lr_size_for_output(scale), out_size=out))
    except Exception:  # noqa: BLE001 - a count is informative only
        return None


def load_model(opts: ServeOptions, uri: str, *, name: str | None, alias: str | None,
               version: str | None, run_id: str | None, device) -> Loaded:
    """Load `uri` (a fixed model: a version, run or file) and describe it."""
    from srplatform.mlmodel import load_sr_model

    model = load_sr_model(uri, tracking_uri=opts.tracking_uri).to(device).eval()
    spec = dict(getattr(model, "spec", {}) or {})
    info = {
        "uri": opts.model, "loaded_uri": uri, "name": name, "alias": alias, "version": version,
        "run_id": run_id, "continuous": bool(model.continuous),
        "scale": None if model.continuous else int(model.scale),
        "arch": spec.get("arch"), "variant": spec.get("variant"), "flavor": spec.get("flavor"),
        "params": sum(p.numel() for p in model.parameters()),
        "macs": _macs(model), "macs_at": "1280x720 output" + (", x4" if model.continuous else ""),
        "device": str(device),
    }
    return Loaded(model=model, info=info, device=device)


class _Registry:
    """Resolves `models:/NAME@ALIAS` to a version through the MLflow client."""

    def __init__(self, tracking_uri: str | None):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def version_of(self, name: str, alias: str) -> tuple[str, str | None]:
        mv = self.client.get_model_version_by_alias(name, alias)
        return str(mv.version), mv.run_id


class SRService:
    """The Serve deployment (see the module docstring). One model per replica, swapped whole."""

    def __init__(self, options_json: str):
        import torch

        from srplatform.tracking import configure_http

        self.opts = ServeOptions.from_json(options_json)
        configure_http()
        from PIL import Image

        # Pillow's guard at our limit too (it raises at twice MAX_IMAGE_PIXELS), so no decode path
        # ever allocates for a bigger image than the header check allowed.
        Image.MAX_IMAGE_PIXELS = self.opts.max_pixels
        if self.opts.num_cpus >= 1:
            torch.set_num_threads(max(1, int(self.opts.num_cpus)))
        self.device = self._device()
        self.tmp = Path(tempfile.mkdtemp(prefix="c2d-serve-"))
        ref = parse_model_uri(self.opts.model)
        self.name, self.alias = ref["name"], ref["alias"]
        self.registry = _Registry(self.opts.tracking_uri) if self.alias else None
        self.poll_error: str | None = None
        self.swaps = 0
        self._active = self._load_current()
        self._compute = asyncio.Semaphore(1)  # batching off: one model call at a time
        self._stop = threading.Event()
        self._poller = None
        if self.registry is not None and self.opts.poll_s > 0:
            self._poller = threading.Thread(target=self._poll_loop, name="c2d-alias-poll", daemon=True)
            self._poller.start()
        if self.opts.max_batch_size > 1:
            from ray import serve

            self._batched = serve.batch(max_batch_size=self.opts.max_batch_size,
                                        batch_wait_timeout_s=self.opts.batch_wait_ms / 1000.0)(self._run_batch)

    def _device(self):
        import torch

        name = self.opts.device
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    # ---- the model and the alias

    def _load_current(self, known: tuple[str, str | None] | None = None) -> Loaded:
        ref = parse_model_uri(self.opts.model)
        if self.alias:
            version, run_id = known or self.registry.version_of(self.name, self.alias)
            uri = f"models:/{self.name}/{version}"
            return load_model(self.opts, uri, name=self.name, alias=self.alias, version=version,
                              run_id=run_id, device=self.device)
        return load_model(self.opts, self.opts.model, name=ref["name"], alias=None,
                          version=ref["version"], run_id=None, device=self.device)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.opts.poll_s):
            self.poll_once()

    def poll_once(self) -> bool:
        """Ask the registry where the alias points; load and swap when it moved. True if swapped."""
        try:
            version, run_id = self.registry.version_of(self.name, self.alias)
            if version == self._active.info["version"]:
                self.poll_error = None
                return False
            new = self._load_current((version, run_id))  # fully loaded before anyone sees it
        except Exception as exc:  # noqa: BLE001 - keep serving the current model, say why
            self.poll_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"[c2d serve] alias poll failed, still serving version "
                  f"{self._active.info['version']}: {self.poll_error}", file=sys.stderr, flush=True)
            return False
        old = self._active.info["version"]
        self._active = new  # one reference assignment: requests already running keep `old`
        self.swaps += 1
        self.poll_error = None
        print(f"[c2d serve] {self.name}@{self.alias}: version {old} -> {version}", file=sys.stderr, flush=True)
        return True

    def check_health(self) -> None:
        if self._active is None:
            raise RuntimeError("no model loaded")

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def describe(self) -> dict[str, Any]:
        info = dict(self._active.info)
        info.update(poll_s=self.opts.poll_s if self.alias else None, poll_error=self.poll_error,
                    swaps=self.swaps, loaded_at=self._active.loaded_at,
                    max_batch_size=self.opts.max_batch_size, tile=self.opts.tile,
                    overlap=self.opts.overlap, max_pixels=self.opts.max_pixels,
                    max_bytes=self.opts.max_bytes, replica_pid=os.getpid())
        return info

    # ---- HTTP

    async def __call__(self, request):
        from starlette.responses import JSONResponse, PlainTextResponse

        root = request.scope.get("root_path", "") or ""
        path = request.url.path
        if root and path.startswith(root):
            path = path[len(root):]
        path = "/" + path.strip("/")
        routes = {"/upscale": "POST", "/healthz": "GET", "/model": "GET"}
        if path not in routes:
            return PlainTextResponse(f"not found: {path} (routes: POST /upscale, GET /healthz, "
                                     "GET /model)\n", status_code=404)
        if request.method != routes[path] and not (request.method == "HEAD" and routes[path] == "GET"):
            return PlainTextResponse(f"{path} takes {routes[path]}\n", status_code=405,
                                     headers={"Allow": routes[path]})
        if path == "/healthz":
            return JSONResponse({"status": "ok", "version": self._active.info["version"]})
        if path == "/model":
            return JSONResponse(self.describe())
        try:
            return await self._upscale(request)
        except HttpError as exc:
            return PlainTextResponse(exc.message + "\n", status_code=exc.status)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the replica down
            import traceback

            traceback.print_exc()
            return PlainTextResponse(f"internal error ({type(exc).__name__}); see the replica log\n",
                                     status_code=500)

    async def _read_body(self, request) -> bytes:
        limit = self.opts.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise HttpError(400, "Content-Length is not a number") from None
            if n > limit:
                raise HttpError(413, f"body of {n} bytes is over the limit of {limit} (--max-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"body is over the limit of {limit} bytes (--max-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _upscale(self, request):
        from starlette.responses import Response

        from srplatform.upscale import output_size, resolve_scale

        check_content_type(request.headers.get("content-type"))
        loaded = self._active  # pinned for the whole request
        model = loaded.model
        scale = parse_query(request.query_params, model.continuous)
        body = await self._read_body(request)
        fmt, w, h = probe_image(body, self.opts.max_pixels)
        try:
            s = resolve_scale(model, scale)
        except UserError as exc:
            raise HttpError(400, str(exc).replace("--scale", "?scale=")) from None
        big_h, big_w = output_size(h, w, s)
        if big_h * big_w > self.opts.max_output_pixels:
            raise HttpError(413, f"output would be {big_w}x{big_h} pixels, over the limit of "
                                 f"{self.opts.max_output_pixels} (--max-output-pixels)")
        png = await self._run(loaded, body, fmt, s)
        headers = {"X-Model-Version": str(loaded.info["version"] or ""),
                   "X-Model-Name": str(loaded.info["name"] or "")}
        return Response(content=png, media_type="image/png", headers=headers)

    async def _run(self, loaded: Loaded, body: bytes, fmt: str, scale) -> bytes:
        from srplatform.upscale import read_input, upscale_image, write_output

        work = Path(tempfile.mkdtemp(dir=self.tmp))
        try:
            src, dst = work / ("in" + _SUFFIX[fmt]), work / "out.png"
            src.write_bytes(body)
            try:
                img = await asyncio.to_thread(read_input, src)
            except (ValueError, OSError) as exc:
                msg = str(exc).replace(str(src) + ": ", "").replace(str(src), "image")
                raise HttpError(400, f"cannot decode the image: {msg[:300]}") from None
            tile = self.opts.tile or None
            if self.opts.max_batch_size == 1:
                async with self._compute:
                    sr, alpha = await asyncio.to_thread(
                        upscale_image, loaded.model, img, scale=scale, tile=tile,
                        overlap=self.opts.overlap, device=loaded.device)
            else:
                sr = await self._batched_forward(loaded, img.rgb[None], scale)
                alpha = None
                if img.alpha is not None:
                    from c2disr.ops.resize import imresize

                    alpha = imresize(img.alpha[None].double(), size=tuple(sr.shape[-2:]))[0].clamp(0, 1).float()
            await asyncio.to_thread(write_output, dst, sr, alpha, gray=img.gray, bits=img.bits, icc=img.icc)
            return dst.read_bytes()
        finally:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    # ---- batching

    async def _batched_forward(self, loaded: Loaded, lr, scale):
        """`sr (3, H, W)` (CPU float) for `lr (1, 3, h, w)`, tiles and images through the batch
        queue; tiled exactly as `sr_forward` does (same tiles, same blending)."""
        from c2disr.tiling import tile_starts, tiled_forward
        from srplatform.upscale import count_tiles, output_size, sr_forward

        model = loaded.model
        tile, overlap = self.opts.tile or None, self.opts.overlap
        h, w = lr.shape[-2:]
        tiled = count_tiles(h, w, tile, overlap) > 1
        if model.continuous:
            if tiled:  # per request: tiled_query has its own per-tile coordinates
                async with self._compute:
                    sr = await asyncio.to_thread(sr_forward, model, lr.to(loaded.device), scale=scale,
                                                 tile=tile, overlap=overlap)
                return sr[0].float().cpu()
            size = output_size(h, w, scale)
            return (await self._batched((loaded, lr, size)))[0].float().cpu()
        if not tiled:
            return (await self._batched((loaded, lr, None)))[0].float().cpu()
        th, tw = min(tile, h), min(tile, w)
        boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
        outs = await asyncio.gather(*(self._batched((loaded, lr[..., y:y + th, x:x + tw], None))
                                      for y, x in boxes))
        it = iter(outs)  # tiled_forward asks for the tiles in `boxes` order, one at a time

        def blend():
            import torch

            with torch.inference_mode():
                return tiled_forward(lambda t: next(it), lr, scale, tile=tile, overlap=overlap)

        sr = await asyncio.to_thread(blend)
        return sr[0].float().cpu()

    async def _run_batch(self, items: list[tuple]) -> list:
        """Serve's batch: `[(loaded, x (1, 3, h, w), out_size | None)]` -> outputs, grouped by
        model, size and out_size so that each group is one model call."""
        return await asyncio.to_thread(self._forward_groups, items)

    @staticmethod
    def _forward_groups(items: list[tuple]) -> list:
        import torch

        groups: dict[tuple, list[int]] = {}
        for i, (loaded, x, size) in enumerate(items):
            groups.setdefault((id(loaded), tuple(x.shape[-2:]), size), []).append(i)
        out: list = [None] * len(items)
        with torch.inference_mode():
            for idx in groups.values():
                loaded, _, size = items[idx[0]]
                x = torch.cat([items[i][1] for i in idx]).to(loaded.device)
                y = loaded.model(x) if size is None else loaded.model(x, out_size=size)
                for j, i in enumerate(idx):
                    out[i] = y[j:j + 1]
        return out


def build_app(opts: ServeOptions):
    """The Serve application for `opts` (a bound deployment)."""
    from ray import serve

    actor: dict[str, Any] = {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus}
    if opts.address:
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        if env:
            actor["runtime_env"] = {"env_vars": env}
    settings: dict[str, Any] = {
        "name": "SRService",
        "ray_actor_options": actor,
        "max_ongoing_requests": opts.max_ongoing_requests,
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 30,
    }
    if opts.autoscaling:
        settings["autoscaling_config"] = dict(opts.autoscaling)
        settings["num_replicas"] = "auto"
    else:
        settings["num_replicas"] = opts.num_replicas
    return serve.deployment(SRService).options(**settings).bind(opts.to_json())


# ----------------------------------------------------------------------------- local lifecycle


def state_path() -> Path:
    from srplatform.stack import data_dir

    return data_dir() / STATE_FILE


def read_state() -> dict[str, Any] | None:
    try:
        return json.loads(state_path().read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_state(state: dict[str, Any]) -> None:
    path = state_path()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, path)


def _http_json(url: str, timeout: float = 5.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _serve_summary() -> dict[str, Any]:
    """Application and replica states from `serve.status()` (the driver must be connected)."""
    from ray import serve

    out: dict[str, Any] = {}
    for app_name, app in serve.status().applications.items():
        deps = {}
        for dep_name, dep in app.deployments.items():
            deps[dep_name] = {"status": str(getattr(dep.status, "value", dep.status)),
                              "replicas": {str(getattr(k, "value", k)): v
                                           for k, v in (dep.replica_states or {}).items()}}
        out[app_name] = {"status": str(getattr(app.status, "value", app.status)), "deployments": deps}
    return out


def deploy(opts: ServeOptions, *, timeout: float = 600.0, cancel: threading.Event | None = None) -> None:
    """Start Serve's HTTP proxy (`opts.host:port`; kept as is when Serve already runs), deploy
    the app at `opts.route_prefix` and wait until it answers `/healthz`. Ray must be connected."""
    from ray import serve

    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(build_app(opts), name=opts.app_name, route_prefix=opts.route_prefix, blocking=False)
    deadline = time.monotonic() + timeout
    while _http_json(opts.url + "/healthz") is None:
        if (cancel is not None and cancel.is_set()) or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not answer {opts.url}/healthz within {timeout:.0f}s")
        time.sleep(0.5)


def run_foreground(opts: ServeOptions, *, ready_timeout: float = 600.0) -> int:
    """Start (or join) Ray, deploy, serve until SIGTERM/SIGINT, then take everything down.

    Records `$C2D_HOME/serve.json` while up. A private Ray (no `address`) is started in this
    process and shut down with it; on a joined cluster only this app is deleted (and Serve shut
    down when no other application is left).
    """
    import ray
    from ray import serve

    stopping = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stopping.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    started_ray = False
    ray_tmp = None
    state: dict[str, Any] = {"pid": os.getpid(), "model": opts.model, "url": opts.url,
                             "host": opts.host, "port": opts.port, "app": opts.app_name,
                             "started": time.time(), "ready": False}
    try:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if opts.address:
            ray.init(address=opts.address, logging_level="WARNING", log_to_driver=False)
        else:
            # A private Ray with its own temp dir: another project's `ray.init()` on this machine
            # must not find and join it (Ray looks for the newest cluster under /tmp/ray).
            ray_tmp = tempfile.mkdtemp(prefix="c2dray-", dir="/tmp")  # short: Ray's socket paths
            ray.init(num_cpus=opts.ray_cpus, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False, _temp_dir=ray_tmp)
            started_ray = True
        # Ray's core installs its own SIGTERM handler (it logs a stack trace and exits at once);
        # ours must win, so that a stop takes the app, Serve and Ray down in order.
        for s in old:
            signal.signal(s, on_signal)
        state.update(started_ray=started_ray, ray_address=ray.get_runtime_context().gcs_address)
        _write_state(state)
        deploy(opts, timeout=ready_timeout, cancel=stopping)
        state.update(ready=True, ready_at=time.time(), serve=_serve_summary())
        _write_state(state)
        print(f"[c2d serve] serving {opts.model} at {opts.url} (POST /upscale, GET /model, GET /healthz)",
              flush=True)
        last = time.monotonic()
        while not stopping.wait(1.0):
            if time.monotonic() - last >= 5:  # replica states for `c2d serve status`
                last = time.monotonic()
                try:
                    state.update(serve=_serve_summary(), checked_at=time.time())
                    _write_state(state)
                except Exception:  # noqa: BLE001 - status is best effort
                    pass
        return 0
    finally:
        print("[c2d serve] stopping", flush=True)
        try:
            if ray.is_initialized():
                if started_ray:
                    serve.shutdown()
                else:
                    serve.delete(opts.app_name)
                    if not serve.status().applications:
                        serve.shutdown()
        finally:
            ray.shutdown()
            if ray_tmp:
                import shutil

                shutil.rmtree(ray_tmp, ignore_errors=True)
            cur = read_state()
            if cur and cur.get("pid") == os.getpid():
                state_path().unlink(missing_ok=True)
            for s, h in old.items():
                signal.signal(s, h)
        print("[c2d serve] stopped", flush=True)


def start_background(opts: ServeOptions, *, timeout: float = 600.0) -> dict[str, Any]:
    """Run `run_foreground` in a new session (log in `$C2D_HOME/serve.log`); return its state
    once the app answers. Raises UserError when it exits or does not get ready in time."""
    from srplatform.stack import data_dir

    cur = read_state()
    if cur and _alive(int(cur.get("pid", 0))):
        raise UserError(f"already serving {cur.get('model')} at {cur.get('url')} (pid {cur['pid']}): "
                        "run `c2d serve stop` first")
    state_path().unlink(missing_ok=True)
    root = data_dir()
    opts_file = root / "serve-options.json"
    fd = os.open(opts_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(opts.to_json())
    log = root / "serve.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "srplatform.serve", str(opts_file)],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited with code {proc.returncode} while starting; "
                            f"log {log}:\n{_tail(log)}")
        st = read_state()
        if st and st.get("pid") == proc.pid and st.get("ready"):
            st["log"] = str(log)
            _write_state(st)
            return st
        time.sleep(0.5)
    _stop_pid(proc.pid)
    raise UserError(f"the server did not get ready within {timeout:.0f}s; log {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (the supervisor starts its own session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) == sid and _alive(pid):
                pids.append(pid)
        except OSError:
            continue
    return pids


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid`, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return [p for p in out if _alive(p)]


def _stop_pid(pid: int, timeout: float = 60.0) -> list[int]:
    """SIGTERM the supervisor, wait for it and every process it started to exit (SIGKILL what is
    left after `timeout`). Returns the pids that had to be killed."""
    family = set(_descendants(pid)) | set(_session_pids(pid))
    family.discard(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid) and not any(_alive(p) for p in family) and not _session_pids(pid):
            return []
        time.sleep(0.2)
    killed = [p for p in ({pid} | family | set(_session_pids(pid))) if _alive(p)]
    for p in killed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


def stop(timeout: float = 60.0) -> dict[str, Any]:
    """Stop the server `start_background` started; `{"stopped", "pid", "killed", "left"}`."""
    st = read_state()
    if not st:
        return {"stopped": False, "pid": None, "killed": [], "left": []}
    pid = int(st["pid"])
    cmd = ""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        pass
    killed: list[int] = []
    if _alive(pid) and "srplatform" in cmd:
        killed = _stop_pid(pid, timeout)
    elif _session_pids(pid):  # the supervisor died; its Ray processes may still be around
        killed = _stop_pid(pid, 5.0)
    time.sleep(0.2)
    left = _session_pids(pid)
    state_path().unlink(missing_ok=True)
    return {"stopped": True, "pid": pid, "killed": killed, "left": left}


def status() -> dict[str, Any] | None:
    """The recorded state plus live checks (`running`, `healthy`, `model`), or None."""
    st = read_state()
    if not st:
        return None
    st["running"] = _alive(int(st.get("pid", 0)))
    health = _http_json(st["url"] + "/healthz") if st["running"] else None
    st["healthy"] = bool(health and health.get("status") == "ok")
    st["model_info"] = _http_json(st["url"] + "/model") if st["healthy"] else None
    return st


if __name__ == "__main__":  # the supervisor `start_background` spawns
    # Through the package module, so that Ray pickles SRService by reference, not as __main__'s.
    from srplatform import serve as _mod

    sys.exit(_mod.run_foreground(_mod.ServeOptions.from_json(Path(sys.argv[1]).read_text())))
