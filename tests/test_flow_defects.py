"""Unit tests (no servers) for the README-flow defects of issue 12: model overrides checked when
the config is read, missing data found before anything starts, promotion against bicubic and its
messages, and MLflow's process-wide URIs put back after a registry download."""

from __future__ import annotations

import os
import time

import pytest

from srplatform.config import ConfigError, load_config
from srplatform.errors import UserError


# ----------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("override, named", [
    ("model.overrides.foo=7", "model.overrides.foo=7"),
    ("model.overrides.window=7", "model.overrides.window=7"),
    ("model.overrides.embed_dim=wide", "model.overrides.embed_dim='wide'"),
    ("model.head_overrides.bar=1", "model.head_overrides.bar=1"),
])
def test_bad_model_overrides_fail_when_the_config_is_read(override, named):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert time.perf_counter() - t0 < 30  # seconds, not a Ray worker's traceback minutes later
    assert named in str(err.value)


def test_good_model_overrides_pass():
    cfg = load_config(None, ["model.overrides.embed_dim=24", "model.head_overrides.width=32"])
    assert cfg.model.overrides == {"embed_dim": 24}


def test_missing_validation_data_is_found_before_anything_starts(tmp_path, monkeypatch):
    from srplatform.train.api import check_local_inputs, shared_candidates

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.val=NoSuchSet", "data.source=T91"])
    with pytest.raises(UserError, match="data.val='NoSuchSet'"):
        check_local_inputs(cfg)
    cfg = load_config(None, [f"data.val={tmp_path}", f"data.source={tmp_path / 'none'}",
                             "data.train="])
    with pytest.raises(UserError, match="data.source="):
        check_local_inputs(cfg)
    # Already packed shards need no source folder.
    check_local_inputs(load_config(None, [f"data.val={tmp_path}", "data.source=gone",
                                          "data.train=file:///somewhere/shards"]))
    # Each place is listed once, also when the working directory is the repository.
    import srplatform

    monkeypatch.chdir(os.path.dirname(os.path.dirname(srplatform.__file__)))
    found = shared_candidates("X")
    assert len(found) == len(set(found))


# ----------------------------------------------------------------------------- item 9, 12


def _ev(version, psnr, error=None):
    from srplatform.registry import Evaluation

    return Evaluation(version, "run" + version, psnr=psnr, ssim=0.9 if psnr else None, images=3,
                      error=error)


def test_a_model_that_does_not_beat_bicubic_is_not_promoted():
    from srplatform.registry import decide

    bic = _ev("bicubic", 30.0)
    ok, why = decide(_ev("1", 29.5), None, 0.0, bic)
    assert not ok and "does not beat bicubic" in why
    ok, why = decide(_ev("2", 31.0), _ev("1", 29.5), 0.0, bic)
    assert ok and "+1.00 dB over bicubic" in why
    ok, why = decide(_ev("3", 29.9), _ev("1", 29.0), 0.0, bic)  # better than the champion, not bicubic
    assert not ok and "bicubic" in why
    assert decide(_ev("4", 30.5), None, 0.0, bic)[0]
    assert decide(_ev("5", 29.0), None, 0.0)[0]  # without a baseline the old rule holds


def test_promotion_messages_name_real_versions():
    from srplatform.registry import PromotionResult, format_result

    base = dict(name="c2disr-swinir_l-c2d-x2", data="Set5", scale=2, margin=0.0, reason="", by="me",
                at="now")
    refused = PromotionResult(decision="refused", candidate=_ev("1", 20.0), champion=None,
                              champion_before=None, champion_after=None,
                              message="refused v1 on Set5 x2 (still no champion): ...",
                              bicubic=_ev("bicubic", 30.0), **base)
    text = format_result(refused)
    assert "vNone" not in text and "bicubic" in text and "-10.00" in text  # gain over bicubic
    same = PromotionResult(decision="unchanged", candidate=_ev("3", None), champion=_ev("3", None),
                           champion_before="3", champion_after="3", message="v3 is already the champion",
                           **base)
    text = format_result(same)
    assert "none yet" not in text and "already the champion" in text


# ----------------------------------------------------------------------------- item 1


def test_mlflow_server_points_the_globals_and_puts_them_back(monkeypatch):
    import mlflow

    from srplatform.tracking import mlflow_server

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = tracking_utils._tracking_uri
    with mlflow_server("http://127.0.0.1:9"):
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:9"
        assert mlflow.get_registry_uri() == "http://127.0.0.1:9"
    assert tracking_utils._tracking_uri == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
