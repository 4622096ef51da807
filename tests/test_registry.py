"""MLflow models, the registry and promotion, against the real MLflow server of the test stack.

Two tiny discrete x2 models: one trained for a few dozen steps on T91 patches (clearly better)
and one untrained. They are logged with `log_sr_model`, registered with deliberately misleading
logged metrics (promotion must re-evaluate, not trust them), promoted, refused, forced and rolled
back with `c2d promote`, and the champion is then used by `c2d upscale`.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from c2disr.evaluate import evaluate_folder, load_image
from c2disr.models import build_model, fit_discrete_head
from c2disr.ops.resize import imresize
from srplatform import registry
from srplatform.cli import main
from srplatform.errors import UserError
from srplatform.registry import Evaluation, decide, model_name, parse_model_name

REPO = Path(__file__).resolve().parents[1]
NAME = "c2disr-swinir_l-c2d-x2"


# ----------------------------------------------------------------------------- no server


def test_names():
    assert model_name("swinir_l", "c2d", 4) == "c2disr-swinir_l-c2d-x4"
    assert parse_model_name("c2disr-mambairv2_l-hit-x3") == {"arch": "mambairv2_l", "variant": "hit", "scale": 3}
    assert parse_model_name("something-else") is None
    for bad in (("Swin", "c2d", 2), ("swinir_l", "c-2d", 2), ("swinir_l", "c2d", 0), ("swinir_l", "c2d", 2.5)):
        with pytest.raises(ValueError):
            model_name(*bad)


def test_decision_rule():
    def ev(psnr, error=None):
        return Evaluation("1", psnr=psnr, ssim=0.5, error=error)

    assert decide(ev(20.0), None, 0.0)[0]
    assert not decide(ev(None, error="boom"), None, 0.0)[0]
    assert decide(ev(30.2), ev(30.0), 0.1)[0]
    assert not decide(ev(30.05), ev(30.0), 0.1)[0], "better, but by less than the margin"
    assert not decide(ev(30.0), ev(30.0), 0.0)[0], "equal is not better"
    assert not decide(ev(29.0), ev(30.0), 0.0)[0]
    assert not decide(ev(float("nan")), ev(30.0), 0.0)[0]


def test_description_history_stays_within_mlflow_limit():
    text = "registered line"
    for i in range(300):
        text = registry._append_line(text, f"decision {i} " + "x" * 40)
    lines = text.splitlines()
    assert len(text) <= 5000 and lines[0] == "registered line" and lines[-1].startswith("decision 299")


# ----------------------------------------------------------------------------- fixtures


def _train_tiny(shared_data: Path):
    """A tiny x2 model that beats bicubic: the published-style head on a bilinear base, fitted by
    least squares on 64 HR patches (48x48) of 12 T91 images (~0.9 dB over bicubic on the bench
    crops below; promotion refuses models that do not beat bicubic)."""
    torch.manual_seed(0)
    rnd = random.Random(0)
    hrs = [load_image(p) for p in sorted((shared_data / "T91").glob("*.png"))[:12]]
    model = build_model("swinir_l", variant="c2d", flavor="tiny", scale=2,
                        head_overrides={"residual": "bilinear"}).eval()
    patches = []
    for _ in range(64):
        hr = rnd.choice(hrs)
        y, x = rnd.randrange(hr.shape[1] - 48), rnd.randrange(hr.shape[2] - 48)
        patches.append(hr[:, y:y + 48, x:x + 48])
    hr = torch.stack(patches)
    fit_discrete_head(model, imresize(hr, 0.5).clamp(0, 1), hr)
    return model


@pytest.fixture(scope="module")
def models(shared_data):
    trained = _train_tiny(shared_data)
    torch.manual_seed(123)
    untrained = build_model("swinir_l", variant="c2d", flavor="tiny", scale=2).eval()
    return trained, untrained


@pytest.fixture(scope="module")
def bench(tmp_path_factory, shared_data) -> Path:
    """Three real 96x96 crops of Set5 (a small benchmark folder)."""
    d = tmp_path_factory.mktemp("bench")
    for name in ("baby.png", "bird.png", "butterfly.png"):
        with Image.open(shared_data / "Set5" / name) as im:
            im.convert("RGB").crop((64, 64, 160, 160)).save(d / name)
    return d


@pytest.fixture(scope="module")
def tracking(mlflow_uri):
    """The stack's server, with generous HTTP limits: on a loaded shared machine single requests
    can take many seconds, and another test may already have set short ones."""
    import os

    import mlflow

    keys = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"MLFLOW_HTTP_REQUEST_TIMEOUT": "120", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"})
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("test-registry")
    yield mlflow_uri
    mlflow.set_tracking_uri(before)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _log(model, **kw):
    import mlflow

    from srplatform.mlmodel import log_sr_model

    with mlflow.start_run() as run:
        info = log_sr_model(model, **kw)
    return run.info.run_id, info


def _register(model, metrics, uri):
    run_id, info = _log(model)
    mv = registry.register(info.model_uri, arch="swinir_l", variant="c2d", scale=2, metrics=metrics,
                           config_hash="cfg-0123", manifest_hash="man-4567", parent_run_id="parent-89",
                           tracking_uri=uri)
    return run_id, mv


def _promote(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["promote", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_log_and_load_sr_model(tracking, models, tmp_path):
    import mlflow

    from srplatform.mlmodel import load_sr_model

    trained, _ = models
    example = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    run_id, info = _log(trained, input_example=example, metadata={"note": "unit"})
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "dl")))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "MLmodel" in files and "artifacts/model.pt" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    doc = yaml.safe_load((local / "MLmodel").read_text())
    assert doc["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert doc["metadata"]["c2disr_spec"] == trained.spec and doc["metadata"]["note"] == "unit"
    ckpt = torch.load(local / "artifacts" / "model.pt", weights_only=True)
    assert set(ckpt) == {"spec", "state_dict"}

    want = trained.state_dict()
    for uri in (f"runs:/{run_id}/model", info.model_uri, str(local)):
        got = load_sr_model(uri, tracking_uri=tracking).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), uri
    with pytest.raises(UserError, match="nope"):
        load_sr_model("models:/nope@champion", tracking_uri=tracking)

    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    x = np.random.default_rng(1).random((2, 3, 12, 10), dtype=np.float32)
    y = pyfunc.predict(x)
    with torch.no_grad():
        ref = trained(torch.from_numpy(x)).clamp(0, 1).numpy()
    assert y.dtype == np.float32 and y.shape == (2, 3, 24, 20)
    assert np.abs(y - ref).max() < 1e-5
    tiled = pyfunc.predict(x, params={"tile": 8, "overlap": 4})
    assert tiled.shape == y.shape and np.abs(tiled - y).mean() < 0.05
    with pytest.raises(Exception, match="x2 model"):
        pyfunc.predict(x, params={"scale": 3.0})


@pytest.mark.integration
def test_register_promote_refuse_force_rollback(tracking, models, bench, capsys):
    from mlflow import MlflowClient

    trained, untrained = models
    client = MlflowClient(tracking)
    uri = ["--tracking-uri", tracking, "--data", str(bench)]

    # What promotion must find by itself (logged metrics below are deliberately wrong).
    def psnr_of(model):
        return evaluate_folder(lambda lr: model(lr), bench, 2)["psnr"]

    good, bad = psnr_of(trained), psnr_of(untrained)
    assert good > bad + 3, (good, bad)
    assert good > evaluate_folder(lambda lr: imresize(lr, 2), bench, 2)["psnr"]

    # 1. an untrained model registered with a flattering logged PSNR; no champion yet, but it
    #    does not beat bicubic: refused (and says so, with bicubic beside it); forced it serves
    run1, v1 = _register(untrained, {"psnr": 99.0, "ssim": 1.0}, tracking)
    assert (v1.name, v1.version) == (NAME, "1")
    tags = client.get_model_version(NAME, "1").tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["val.psnr"] == "99.0" and tags["config_hash"] == "cfg-0123"
    assert tags["manifest_hash"] == "man-4567" and tags["parent_run_id"] == "parent-89"
    assert tags["source_commit"] == (head or "unknown") and tags["scale"] == "2"
    assert client.get_model_version_by_alias(NAME, "candidate").version == "1"
    rc, out, _ = _promote(capsys, NAME, *uri)
    assert rc == 1 and "REFUSED" in out and "does not beat bicubic" in out, out
    assert "still no champion" in out and "vNone" not in out
    bicubic = evaluate_folder(lambda lr: imresize(lr, 2), bench, 2)["psnr"]
    assert f"{bicubic:.2f}" in out
    assert "champion" not in client.get_registered_model(NAME).aliases
    rc, out, _ = _promote(capsys, NAME, "--force", "--reason", "a first champion", *uri)
    assert rc == 0 and "FORCED" in out, out
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"

    # 2. the trained model, logged with a poor PSNR, beats it on the re-run evaluation
    _, v2 = _register(trained, {"psnr": 1.0}, tracking)
    assert client.get_model_version_by_alias(NAME, "candidate").version == "2"
    rc, out, _ = _promote(capsys, NAME, *uri)
    assert rc == 0 and "PROMOTED" in out, out
    rm = client.get_registered_model(NAME)
    assert rm.aliases["champion"] == "2" and rm.aliases["previous-champion"] == "1"
    assert rm.tags["champion_history"] == "1,2"
    t2 = client.get_model_version(NAME, "2").tags
    assert t2["promotion.decision"] == "promoted" and t2["promotion.role"] == "candidate"
    assert abs(float(t2["promotion.psnr"]) - good) < 1e-3
    assert abs(float(t2["promotion.other_psnr"]) - bad) < 1e-3
    assert t2["promotion.other_version"] == "1" and t2["promotion.by"] and t2["promotion.at"].endswith("+00:00")

    # 3. a worse candidate is refused (exit 1) and the champion stays
    _register(untrained, {"psnr": 50.0}, tracking)
    rc, out, _ = _promote(capsys, NAME, *uri)
    assert rc == 1 and "REFUSED" in out, out
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags["promotion.decision"] == "refused" and "refused v3" in v3.description
    assert "refused v3" in client.get_model_version(NAME, "2").description  # on both versions
    last = json.loads(client.get_registered_model(NAME).tags["last_decision"])
    assert last["decision"] == "refused" and last["candidate"] == "3" and last["delta_db"] < 0

    # 4. --force needs a reason; with one it promotes and records it
    rc, _, err = _promote(capsys, NAME, "--force", *uri)
    assert rc == 2 and "--reason" in err
    rc, out, _ = _promote(capsys, NAME, "--version", "3", "--force", "--reason", "demo override", *uri)
    assert rc == 0 and "FORCED" in out, out
    v3 = client.get_model_version(NAME, "3")
    assert "champion" in v3.aliases and v3.tags["promotion.decision"] == "forced"
    assert v3.tags["promotion.reason"] == "demo override" and "demo override" in v3.description

    # 5. rollback restores v2 and keeps the history; twice goes back to v1; then nothing left
    rc, out, _ = _promote(capsys, NAME, "--rollback", *uri)
    assert rc == 0 and "ROLLED-BACK" in out, out
    rm = client.get_registered_model(NAME)
    assert rm.aliases["champion"] == "2" and rm.aliases["previous-champion"] == "1"
    assert rm.tags["champion_history"] == "1,2"
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags["promotion.decision"] == "rolled-back" and v3.tags["promotion.role"] == "demoted"
    assert client.get_model_version(NAME, "2").tags["promotion.role"] == "restored"
    rc, out, _ = _promote(capsys, NAME, "--rollback", "--reason", "drill", *uri)
    assert rc == 0 and client.get_model_version_by_alias(NAME, "champion").version == "1"
    assert "previous-champion" not in client.get_registered_model(NAME).aliases
    rc, _, err = _promote(capsys, NAME, "--rollback", *uri)
    assert rc == 2 and "no previous" in err

    # 6. promote v2 again (JSON output); re-promoting the champion is a no-op
    rc, out, _ = _promote(capsys, NAME, "--version", "2", "--json", *uri)
    doc = json.loads(out)
    assert rc == 0 and doc["decision"] == "promoted" and doc["champion_after"] == "2"
    assert abs(doc["candidate"]["psnr"] - good) < 1e-6 and abs(doc["champion"]["psnr"] - bad) < 1e-6
    rc, out, _ = _promote(capsys, NAME, "--version", "2", *uri)
    assert rc == 0 and "UNCHANGED" in out

    # errors are exit 2 with one line
    assert _promote(capsys, "c2disr-nope-plain-x2", *uri)[0] == 2
    assert _promote(capsys, NAME, "--tracking-uri", tracking, "--data", str(bench / "missing"))[0] == 2
    assert _promote(capsys, NAME, "--version", "99", *uri)[0] == 2


@pytest.mark.integration
def test_upscale_folder_with_the_champion(tracking, models, shared_data, tmp_path, capsys):
    """`models:/NAME@champion` (v2, the trained model, after the lifecycle above) upscales a
    folder of real crops and odd kinds; tiled and whole-image outputs agree."""
    from srplatform.mlmodel import load_sr_model
    from srplatform.upscale import sr_forward

    trained, _ = models
    champion = load_sr_model(f"models:/{NAME}@champion", tracking_uri=tracking)
    want = trained.state_dict()
    assert all(torch.equal(champion.state_dict()[k], want[k]) for k in want)

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    with Image.open(shared_data / "Set5" / "bird.png") as im:
        rgb = np.array(im.convert("RGB"))[100:140, 90:136]
    with Image.open(shared_data / "Set5" / "head.png") as im:
        Image.fromarray(np.asarray(im.convert("RGB"))[60:100, 60:100]).save(src / "head.png")
    Image.fromarray(rgb).save(src / "bird.png")
    Image.fromarray(rgb).convert("L").save(src / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(src / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(src / "deep16.png")
    (src / "broken.png").write_bytes((src / "bird.png").read_bytes()[:200])
    capsys.readouterr()
    rc = main(["upscale", "--model", f"models:/{NAME}@champion", "--tracking-uri", tracking,
               str(src), str(out), "--tile", "24", "--overlap", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.png" in err and "written 5" in err
    sizes = {p.name: (Image.open(p).mode, Image.open(p).size) for p in out.iterdir()}
    assert sizes == {"bird.png": ("RGB", (92, 80)), "head.png": ("RGB", (80, 80)),
                     "gray.png": ("L", (92, 80)), "rgba.png": ("RGBA", (92, 80)),
                     "deep16.png": ("I;16", (92, 80))}

    lr = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)[None]
    whole = sr_forward(champion, lr).clamp(0, 1)
    tiled = sr_forward(champion, lr, tile=24, overlap=8).clamp(0, 1)
    psnr = 10 * torch.log10(1 / ((whole - tiled) ** 2).mean())
    assert psnr > 45, f"tiled vs whole-image output: {psnr:.1f} dB"
    got = torch.from_numpy(np.array(Image.open(out / "bird.png"))).permute(2, 0, 1).float()
    assert (got - (tiled[0] * 255).round()).abs().max() <= 1
