"""`c2d serve` on a real Ray Serve, with tiny models registered in the test stack's MLflow.

One private Ray + Serve for the module carries two apps: `/` follows
`models:/c2disr-swinir_l-hit-x2@champion` (batching on, polling the registry every second) and
`/exact` serves version 1's model file with batching off. Outputs are compared with `c2d upscale`
run in this process; every kind of bad input gets its 4xx while the server keeps serving; a
`c2d promote` under load moves the alias without a failed request. The CLI lifecycle
(`c2d serve`, `status`, `stop`) runs on its own private Ray and must leave no process behind.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2disr.evaluate import save_model
from c2disr.models import build_model
from srplatform import serve as srv
from srplatform.cli import main
from srplatform.errors import UserError
from srplatform.serve import HttpError, ServeOptions, parse_query, probe_image

NAME = "c2disr-swinir_l-hit-x2"
TILE, OVERLAP = 32, 8


# ----------------------------------------------------------------------------- helpers


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h RGB pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _post(url: str, body: bytes, ctype: str | None = "image/png", timeout: float = 120):
    """(status, headers, body) of a POST; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method="POST")
    if ctype is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im).astype(np.int32)


def _reference(model_file: Path, src: bytes, tmp: Path, name: str) -> bytes:
    """What `c2d upscale` writes for `src` (same tile and overlap as the server)."""
    inp, out = tmp / f"{name}.png", tmp / f"{name}_sr.png"
    inp.write_bytes(src)
    assert main(["upscale", "--model", str(model_file), "--tile", str(TILE), "--overlap", str(OVERLAP),
                 "--device", "cpu", "--quiet", str(inp), str(out)]) == 0
    return out.read_bytes()


# ----------------------------------------------------------------------------- no servers


def test_probe_and_query_checks():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert probe_image(_png(rgb), 1000) == ("PNG", 30, 20)
    cases = [(b"", 400), (b"not an image", 400), (_bomb_png(100_000, 100_000), 413),
             (_png(rgb), 413)]
    for body, code in cases:
        with pytest.raises(HttpError) as exc:
            probe_image(body, 500)
        assert exc.value.status == code, exc.value.message
    ico = io.BytesIO()
    Image.fromarray(rgb[:16, :16]).save(ico, format="ICO")
    with pytest.raises(HttpError, match="format ICO") as exc:
        probe_image(ico.getvalue(), 10_000)
    assert exc.value.status == 415

    from starlette.datastructures import QueryParams

    assert parse_query(QueryParams("scale=2.5"), True) == 2.5
    assert parse_query(QueryParams(""), False) is None
    for bad in ("scale=abc", "scale=-1", "scale=nan", "scale=2&scale=3", "tile=4"):
        with pytest.raises(HttpError):
            parse_query(QueryParams(bad), True)


def test_options_are_checked():
    opts = ServeOptions(model="m.pt", autoscaling={"min_replicas": 1, "max_replicas": 2})
    assert ServeOptions.from_json(opts.check().to_json()) == opts
    for bad in (dict(num_replicas=0), dict(tile=8, overlap=8), dict(max_batch_size=0),
                dict(autoscaling={"min_replica": 1}), dict(route_prefix="x")):
        with pytest.raises(UserError):
            ServeOptions(model="m.pt", **bad).check()


def test_cli_refuses_before_starting_anything(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["serve", "m.pt", "--address", "http://127.0.0.1:8265"]) == 2
    assert "c2d submit serve" in capsys.readouterr().err
    assert main(["submit", "serve", "--dry-run", "--", "models:/x@champion", "--host", "0.0.0.0"]) == 0
    assert "jobs.serve models:/x@champion --host 0.0.0.0" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-models")
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(save_model(d / f"v{seed + 1}.pt",
                                build_model("swinir_l", variant="hit", flavor="tiny", scale=2).eval()))
    return files


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve-bench")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def registered(mlflow_uri, model_files, bench):
    """Both models registered as versions 1 and 2 of NAME; version 1 is the champion."""
    import mlflow

    from c2disr.evaluate import load_model
    from srplatform import registry
    from srplatform.mlmodel import log_sr_model

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("test-serve")
    for f in model_files:
        with mlflow.start_run():
            info = log_sr_model(load_model(f))
        registry.register(info.model_uri, arch="swinir_l", variant="hit", scale=2, metrics={},
                          config_hash="-", manifest_hash="-", parent_run_id=None, tracking_uri=mlflow_uri)
    # Untrained models do not beat bicubic: promotion is forced (and recorded as such).
    assert main(["promote", NAME, "--version", "1", "--force", "--reason", "serve test",
                 "--data", str(bench), "--tracking-uri", mlflow_uri]) == 0
    return mlflow_uri


@pytest.fixture(scope="module")
def server(registered, model_files):
    """A private Ray with Serve on a free loopback port and the two apps; torn down at the end."""
    import tempfile

    import ray
    from ray import serve

    from srplatform.stack import free_port

    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="c2dray-", dir="/tmp")  # private: no other ray.init joins it
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _temp_dir=ray_tmp)
    common = dict(port=port, num_cpus=0.25, tile=TILE, overlap=OVERLAP, max_pixels=20_000,
                  max_bytes=200_000, max_output_pixels=200_000)
    main_app = ServeOptions(model=f"models:/{NAME}@champion", tracking_uri=registered, poll_s=1.0,
                            max_batch_size=4, app_name="main", **common).check()
    exact = ServeOptions(model=str(model_files[0]), max_batch_size=1, poll_s=0, app_name="exact",
                         route_prefix="/exact", **common).check()
    try:
        srv.deploy(main_app, timeout=300)
        srv.deploy(exact, timeout=300)
        yield {"main": main_app.url, "exact": exact.url}
    finally:
        serve.shutdown()
        ray.shutdown()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    rgb_small = rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)
    rgb_tiled = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)  # 3 x 3 tiles of 32
    rgba = np.concatenate([rgb_small, rng.integers(0, 256, (20, 26, 1), dtype=np.uint8)], axis=-1)
    gray = rng.integers(0, 256, (44, 36), dtype=np.uint8)  # 2 x 2 tiles
    return {"rgb": _png(rgb_small), "tiled": _png(rgb_tiled), "rgba": _png(rgba, "RGBA"),
            "gray": _png(gray, "L")}


# ----------------------------------------------------------------------------- the CLI lifecycle


@pytest.mark.integration
@pytest.mark.slow
def test_cli_serve_status_stop_leaves_no_process(model_files, images, tmp_path, monkeypatch, capsys):
    from srplatform.stack import free_port

    monkeypatch.setenv("C2D_HOME", str(tmp_path / "home"))
    port = free_port()
    rc = main(["serve", str(model_files[0]), "--port", str(port), "--cpus", "0.25", "--ray-cpus", "1",
               "--poll", "0", "--tile", str(TILE), "--overlap", str(OVERLAP), "--timeout", "300"])
    assert rc == 0, capsys.readouterr().err
    state = srv.read_state()
    pid, url = state["pid"], state["url"]
    try:
        _check_running_server(model_files, images, pid, url, port, capsys)
    finally:
        stopped = main(["serve", "stop"])
    assert stopped == 0
    assert "stopped" in capsys.readouterr().out
    alive = [p for p in _FAMILY | {pid} if srv._alive(p)]
    assert not alive, f"left behind: {alive}"
    assert not srv._session_pids(pid) and srv.read_state() is None
    assert main(["serve", "status"]) == 1
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=5)


_FAMILY: set[int] = set()


def _check_running_server(model_files, images, pid, url, port, capsys):
    from srplatform.stack import free_port

    assert url == f"http://127.0.0.1:{port}"
    assert main(["serve", str(model_files[0]), "--port", str(free_port())]) == 2, "one server per C2D_HOME"
    capsys.readouterr()
    assert main(["serve", "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["healthy"] and st["model_info"]["scale"] == 2 and st["started_ray"]
    code, headers, png = _post(url + "/upscale", images["rgb"])
    assert code == 200 and headers["content-type"] == "image/png"
    _FAMILY.update(srv._session_pids(pid), srv._descendants(pid))
    assert len(_FAMILY) > 3, "Ray's processes run in the server's session"


# ----------------------------------------------------------------------------- one Serve, two apps


@pytest.mark.integration
def test_model_info_and_health(server, model_files):
    info = _get_json(server["main"] + "/model")
    params = sum(p.numel() for p in torch.load(model_files[0], weights_only=True)["state_dict"].values())
    assert (info["name"], info["version"], info["alias"], info["scale"]) == (NAME, "1", "champion", 2)
    assert info["params"] == params and info["macs"] > 0 and info["continuous"] is False
    assert _get_json(server["main"] + "/healthz") == {"status": "ok", "version": "1"}
    assert _get_json(server["exact"] + "/model")["version"] is None


@pytest.mark.integration
def test_outputs_equal_c2d_upscale(server, model_files, images, tmp_path):
    for kind, src in images.items():
        ref = _reference(model_files[0], src, tmp_path, kind)
        code, _, exact = _post(server["exact"] + "/upscale", src)
        assert code == 200 and exact == ref, f"{kind}: batching off must give c2d upscale's bytes"
        code, headers, batched = _post(server["main"] + "/upscale", src, ctype="application/octet-stream")
        assert code == 200 and headers["x-model-version"] == "1"
        if kind in ("rgb", "rgba"):  # one image, one model call: the same call as c2d upscale
            assert batched == ref, kind
        else:  # tiles batched together: equal up to the rounding of one 8-bit step
            diff = np.abs(_pixels(batched) - _pixels(ref))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (kind, diff.max(), (diff > 0).mean())
    with Image.open(io.BytesIO(exact)) as im:
        assert im.mode == "L" and im.size == (72, 88)


@pytest.mark.integration
def test_bad_input_gets_4xx_and_the_server_keeps_serving(server, images):
    url = server["main"] + "/upscale"
    rgb = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    ico = io.BytesIO()
    Image.fromarray(rgb[:16, :16]).save(ico, format="ICO")
    cases = {
        "empty body": (url, b"", "image/png", 400, "empty"),
        "not an image": (url, b"hello, I am text" * 10, "image/png", 400, "not an image"),
        "truncated": (url, images["tiled"][: len(images["tiled"]) // 2], "image/png", 400, "cannot decode"),
        "bomb header": (url, _bomb_png(100_000, 100_000), "image/png", 413, "too large"),
        "over --max-pixels": (url, _png(np.zeros((150, 150, 3), np.uint8)), "image/png", 413, "max-pixels"),
        "over --max-bytes": (url, os.urandom(250_000), "image/png", 413, "max-bytes"),
        "content type": (url, images["rgb"], "text/plain", 415, "Content-Type"),
        "form encoded": (url, images["rgb"], "application/x-www-form-urlencoded", 415, "Content-Type"),
        "format": (url, ico.getvalue(), "image/x-icon", 415, "format ICO"),
        "scale of discrete": (url + "?scale=3", images["rgb"], "image/png", 400, "x2 model"),
        "scale not a number": (url + "?scale=big", images["rgb"], "image/png", 400, "number"),
        "unknown parameter": (url + "?tile=8", images["rgb"], "image/png", 400, "unknown"),
    }
    for what, (u, body, ctype, code, text) in cases.items():
        got, _, msg = _post(u, body, ctype)
        assert (got, text in msg.decode()) == (code, True), (what, got, msg[:200])
    # A chunked body (no Content-Length) over the limit is cut off while reading.
    conn = http.client.HTTPConnection("127.0.0.1", int(url.split(":")[2].split("/")[0]), timeout=60)
    conn.request("POST", "/upscale", body=iter([b"\0" * 65536] * 5), headers={"Content-Type": "image/png"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and b"max-bytes" in resp.read()
    conn.close()
    for path, method, code in (("/upscale", "GET", 405), ("/nope", "GET", 404)):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(server["main"] + path, method=method), timeout=30)
        assert exc.value.code == code
    got, _, png = _post(url, images["rgb"])
    assert got == 200 and png.startswith(b"\x89PNG")
    assert _get_json(server["main"] + "/healthz")["status"] == "ok"


@pytest.mark.integration
@pytest.mark.slow
def test_promotion_under_load_loses_no_request(server, registered, bench, model_files, images, tmp_path):
    url = server["main"] + "/upscale"
    refs = {v: _pixels(_reference(model_files[int(v) - 1], images["rgb"], tmp_path, f"v{v}")) for v in "12"}
    results: list[tuple[int, str, bytes]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            code, headers, body = _post(url, images["rgb"])
            results.append((code, headers.get("x-model-version", ""), body))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        time.sleep(2)
        assert main(["promote", NAME, "--version", "2", "--force", "--reason", "serve test",
                     "--data", str(bench), "--tracking-uri", registered]) == 0
        deadline = time.monotonic() + 120
        while _get_json(server["main"] + "/model")["version"] != "2":
            assert time.monotonic() < deadline, "the server did not follow the alias"
            time.sleep(0.5)
        n = len(results)
        while len(results) < n + 6:  # a few more requests on the new model
            time.sleep(0.2)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=120)
    codes = [c for c, _, _ in results]
    versions = [v for _, v, _ in results]
    assert codes.count(200) == len(codes), f"failed requests: {[c for c in codes if c != 200]}"
    assert "1" in versions and versions[-1] == "2"
    for _, v, body in results[-3:]:  # outputs really come from version 2's weights
        assert np.abs(_pixels(body) - refs[v]).max() <= 1
    assert np.abs(refs["1"] - refs["2"]).max() > 5
    info = _get_json(server["main"] + "/model")
    assert info["swaps"] == 1 and info["poll_error"] is None
