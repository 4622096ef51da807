"""The one config path: YAML -> typed Config -> overrides -> flat params -> dict -> Config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from srplatform.config import Config, ConfigError, flatten, load_config
from tests.conftest import REPO

SAMPLES = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_configs_load(path):
    cfg = load_config(path)
    assert cfg.name
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_samples_exist():
    names = {p.name for p in SAMPLES}
    assert {"tiny.yaml", "swinir_l.yaml", "srformer_l.yaml", "mambairv2_l.yaml"} <= names
    for arch in ("swinir_l", "srformer_l", "mambairv2_l"):
        cfg = load_config(REPO / "jobs" / "configs" / f"{arch}.yaml")
        assert cfg.model.arch == arch and cfg.model.flavor == "light"


def test_good_file_and_overrides(tmp_path):
    p = write(tmp_path, "name: x\nmodel:\n  arch: srformer_l\npretrain:\n  steps: 7\n  lr: 2e-4\n")
    cfg = load_config(p, ["pretrain.steps=9", "finetune.scales=[2,4]", "model.overrides.embed_dim=32"])
    assert cfg.model.arch == "srformer_l"
    assert cfg.pretrain.steps == 9 and cfg.pretrain.lr == pytest.approx(2e-4)
    assert cfg.finetune.scales == [2, 4]
    assert cfg.model.overrides == {"embed_dim": 32}


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "pretrain:\n  stpes: 7\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "pretrain.stpes" in msg and str(p) in msg and "did you mean pretrain.steps" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key modle"):
        load_config(write(tmp_path, "modle:\n  arch: x\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("pretrain:\n  steps: many\n", "pretrain.steps must be an integer"),
        ("pretrain:\n  steps: 1.5\n", "pretrain.steps must be an integer"),
        ("data:\n  patch: true\n", "data.patch must be an integer"),
        ("run:\n  bf16: 1\n", "run.bf16 must be true or false"),
        ("finetune:\n  scales: 2\n", "finetune.scales must be a list"),
        ("model: swinir\n", "model must be a mapping"),
        ("model:\n  arch: vgg\n", "model.arch must be one of"),
        ("finetune:\n  scales: [5]\n", "finetune.scales must be a non-empty subset"),
        ("data:\n  scale_min: 3\n  scale_max: 2\n", "data.scale_min"),
    ],
)
def test_wrong_types_and_values(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert key in str(exc.value) and str(p) in str(exc.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["pretrain.steps"])
    with pytest.raises(ConfigError, match="unknown key pretrain.nope"):
        load_config(None, ["pretrain.nope=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_flatten_round_trip_and_json_safe():
    cfg = load_config(None, ["model.overrides.depths=[3,3]"])
    flat = flatten(cfg)
    assert flat["pretrain.steps"] == cfg.pretrain.steps
    assert json.loads(flat["finetune.scales"]) == [2, 3, 4]
    assert json.loads(flat["model.overrides"]) == {"depths": [3, 3]}
    json.dumps(flat)
    # The dict that travels to Ray workers rebuilds the same config.
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.digest() == cfg.digest()
