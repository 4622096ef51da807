"""Search-space files of `c2d tune`: parsing, the checks against the typed Config, and how
sampled values become trial configs. No Ray, no servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from srplatform.config import Config, load_config
from srplatform.errors import UserError
from srplatform.tune_space import (
    SpaceError,
    load_space,
    metric_names,
    trial_config_dict,
    validate_space,
)
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
SPACES = sorted((REPO / "jobs" / "spaces").glob("*.yaml"))
CONFIG_FOR = {"tiny.yaml": ["tiny.yaml"], "light.yaml": ["swinir_l.yaml", "srformer_l.yaml"]}

HEAD = """
trial: {stage: pretrain, scale: 2, steps: 8, report_every: 2}
search: {algo: random, trials: 4}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
"""


def space_file(tmp_path: Path, params: str, head: str = HEAD) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(head + "params:\n" + params)
    return p


def tiny() -> Config:
    return load_config(TINY)


def check(tmp_path: Path, params: str, head: str = HEAD, **kwargs) -> list[str]:
    space = load_space(space_file(tmp_path, params, head), **kwargs)
    return validate_space(space, tiny())


# --------------------------------------------------------------------------------------
# The sample spaces
# --------------------------------------------------------------------------------------


def test_sample_spaces_exist():
    assert {p.name for p in SPACES} >= {"tiny.yaml", "light.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_sample_spaces_validate_against_their_configs(path):
    for cfg_name in CONFIG_FOR[path.name]:
        space = load_space(path)
        assert validate_space(space, load_config(REPO / "jobs" / "configs" / cfg_name)) == []
        assert space.planned_trials() == space.search.trials
        # Every category handed to the search algorithm is a scalar (Optuna accepts no lists).
        for p in space.params:
            if p.finite:
                assert all(isinstance(v, (bool, int, float, str)) for v in p.labels())


def test_tiny_space_searches_the_hierarchical_encoding():
    space = load_space(REPO / "jobs" / "spaces" / "tiny.yaml")
    keys = {k for p in space.params for k in p.keys}
    assert {"pretrain.lr", "model.overrides.c2d_schedule", "model.overrides.depths",
            "model.overrides.embed_dim", "model.overrides.hier_base_window"} <= keys
    assert space.scheduler.type == "asha"


# --------------------------------------------------------------------------------------
# Parsing and decoding
# --------------------------------------------------------------------------------------


def test_distributions_parse_and_decode(tmp_path):
    path = space_file(tmp_path, """
  pretrain.lr: {loguniform: [1e-4, 1.0e-3]}
  pretrain.ema_decay: {uniform: [0.9, 0.99]}
  model.overrides.embed_dim: {choice: [16, 32]}
  model.overrides.window: {randint: [3, 5]}
  shape:
    joint:
      - {model.overrides.c2d_schedule: [2, 1, 2], model.overrides.depths: [3, 3]}
      - {model.overrides.c2d_schedule: [1, 1, 1, 1], model.overrides.depths: [4, 4]}
""")
    space = load_space(path)
    by = {p.name: p for p in space.params}
    assert by["pretrain.lr"].low == pytest.approx(1e-4)  # YAML reads 1e-4 as text: accepted
    assert by["model.overrides.embed_dim"].labels() == [16, 32]  # scalars pass through
    labels = by["shape"].labels()
    assert labels == ["c2d_schedule=[2,1,2] depths=[3,3]", "c2d_schedule=[1,1,1,1] depths=[4,4]"]
    assert space.decode({"shape": labels[1], "model.overrides.window": 5, "pretrain.lr": 3e-4}) == {
        "model.overrides.c2d_schedule": [1, 1, 1, 1], "model.overrides.depths": [4, 4],
        "model.overrides.window": 5, "pretrain.lr": 3e-4}
    with pytest.raises(SpaceError, match="not one of its options"):
        by["shape"].decode("c2d_schedule=[9]")
    assert by["model.overrides.window"].representatives() == [3, 5]


def test_list_valued_choice_is_labelled_and_decoded(tmp_path):
    space = load_space(space_file(tmp_path, """
  model.overrides.c2d_schedule: {choice: [[2, 1, 2], [1, 1, 1]]}
"""))
    (p,) = space.params
    assert p.encoded and p.labels() == ["[2,1,2]", "[1,1,1]"]
    assert space.decode({p.name: "[1,1,1]"}) == {"model.overrides.c2d_schedule": [1, 1, 1]}


def test_tune_domains_match_the_file(tmp_path):
    pytest.importorskip("ray.tune")
    from ray.tune.search.sample import Categorical, Float, Integer

    space = load_space(space_file(tmp_path, """
  pretrain.lr: {loguniform: [1.0e-4, 1.0e-3]}
  model.overrides.window: {randint: [3, 5]}
  model.overrides.embed_dim: {grid: [16, 32]}
  data.batch_size: {choice: [2, 4]}
"""))
    ps = space.param_space()
    assert isinstance(ps["pretrain.lr"], Float)
    assert isinstance(ps["model.overrides.window"], Integer)
    assert (ps["model.overrides.window"].lower, ps["model.overrides.window"].upper) == (3, 6)  # inclusive high
    assert ps["model.overrides.embed_dim"] == {"grid_search": [16, 32]}
    assert isinstance(ps["data.batch_size"], Categorical)
    # random search repeats the 2-point grid: 4 trials = 2 samples x 2 grid points
    assert space.grid_size() == 2 and space.num_samples() == 2 and space.planned_trials() == 4


def test_cli_style_overrides_replace_the_file_values(tmp_path):
    path = space_file(tmp_path, "  model.overrides.embed_dim: {choice: [16, 32]}\n")
    space = load_space(path, algo="grid", trials=2, time_budget_s=60, metric="val_ssim", max_macs=20)
    s = space.search
    assert (s.algo, s.trials, s.time_budget_s, s.metric, s.max_macs) == ("grid", 2, 60.0, "val_ssim", 20.0)
    assert space.num_samples() == 1 and space.planned_trials() == 2


# --------------------------------------------------------------------------------------
# Bad spaces fail before any trial, naming the file and the key
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    ("  pretrain.lr: {uniform: [1.0e-3, 1.0e-4]}\n", r"params.pretrain.lr: low 0.001 must be less than high 0.0001"),
    ("  pretrain.lr: {loguniform: [0, 1.0e-4]}\n", r"loguniform needs low > 0"),
    ("  model.overrides.embed_dim: {choice: []}\n", r"params.model.overrides.embed_dim: choice has an empty list"),
    ("  model.overrides.embed_dim: {randint: [8, 4]}\n", r"low 8 is greater than high 4"),
    ("  model.overrides.embed_dim: {randint: [8.5, 16]}\n", r"randint bounds must be integers"),
    ("  model.overrides.embed_dim: {normal: [8, 16]}\n", r"unknown distribution 'normal'"),
    ("  model.overrides.embed_dim: [16, 32]\n", r"exactly one distribution"),
    ("  model.overrides.embed_dim: {choice: [16, 16]}\n", r"the value 16 is listed twice"),
    ("  shape: {joint: [{model.overrides.depths: [3, 3]}, [1]]}\n", r"joint option 1 must be a non-empty mapping"),
    ("  a.b: {joint: [{model.overrides.depths: [3, 3]}]}\n", r"joint choice is named by a group name"),
    ("  model.overrides.depths: {choice: [[3, 3]]}\n  shape: {joint: [{model.overrides.depths: [3, 3]}]}\n",
     r"model.overrides.depths is set by both"),
])
def test_malformed_params_are_refused(tmp_path, params, message):
    with pytest.raises(SpaceError, match=message) as err:
        load_space(space_file(tmp_path, params))
    assert str(tmp_path / "space.yaml") in str(err.value)


@pytest.mark.parametrize("head, kwargs, message", [
    (HEAD, {"trials": 0}, r"trial budget .* must be at least 1, got 0"),
    (HEAD, {"time_budget_s": 0}, r"time budget .* must be positive"),
    (HEAD, {"max_macs": 0}, r"max_macs .* must be positive"),
    (HEAD, {"algo": "bayes"}, r"search.algo \(--algo\) must be one of random, grid, optuna, optuna-mo"),
    (HEAD.replace("grace_period: 1", "grace_period: 4"), {}, r"grace_period \(4 reports\) leaves ASHA no point"),
    (HEAD.replace("reduction_factor: 2", "reduction_factor: 1"), {}, r"reduction_factor must be greater than 1"),
    (HEAD.replace("stage: pretrain", "stage: finetune"), {}, r"finetune needs trial.init_from"),
    (HEAD.replace("scale: 2", "scale: 5"), {}, r"trial.scale must be 2, 3 or 4"),
    (HEAD.replace("report_every: 2", "report_every: 9"), {}, r"trial.report_every must be in \[1, trial.steps=8\]"),
    (HEAD.replace("trials: 4", "trialz: 4"), {}, r"unknown key search.trialz \(did you mean search.trials\?\)"),
])
def test_bad_settings_are_refused(tmp_path, head, kwargs, message):
    with pytest.raises(SpaceError, match=message):
        load_space(space_file(tmp_path, "  pretrain.lr: {loguniform: [1.0e-4, 1.0e-3]}\n", head), **kwargs)


def test_empty_or_missing_spaces_are_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpaceError, match="empty search space"):
        load_space(empty)
    with pytest.raises(SpaceError, match="params is empty"):
        load_space(space_file(tmp_path, "  {}\n"))
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [1, 2\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(bad)
    other = tmp_path / "other.yaml"
    other.write_text("parms: {}\n")
    with pytest.raises(SpaceError, match="unknown section parms"):
        load_space(other)


def test_grid_and_algorithm_contradictions(tmp_path):
    with pytest.raises(SpaceError, match="use grid, which Optuna cannot sample"):
        load_space(space_file(tmp_path, "  pretrain.lr: {grid: [1.0e-4, 2.0e-4]}\n"), algo="optuna")
    with pytest.raises(SpaceError, match="--algo grid enumerates every value, but params pretrain.lr"):
        load_space(space_file(tmp_path, "  pretrain.lr: {uniform: [1.0e-4, 2.0e-4]}\n"), algo="grid")
    with pytest.raises(SpaceError, match="the grid has 6 points but the trial budget is 4"):
        load_space(space_file(tmp_path, "  pretrain.lr: {choice: [1.0e-4, 2.0e-4, 3.0e-4]}\n"
                                        "  model.overrides.embed_dim: {grid: [16, 32]}\n"), algo="grid")
    with pytest.raises(SpaceError, match="span 8 points, more than the trial budget of 4"):
        load_space(space_file(tmp_path, "  model.overrides.window: {grid: [2, 4]}\n"
                                        "  model.overrides.embed_dim: {grid: [16, 32, 64, 128]}\n"))


@pytest.mark.parametrize("params, message", [
    ("  pretrain.lrr: {loguniform: [1.0e-4, 1.0e-3]}\n", r"pretrain.lrr is not a config key \(did you mean pretrain.lr\?\)"),
    ("  modle.arch: {choice: [swinir_l]}\n", r"modle.arch is not a config key \(did you mean model.arch\?\)"),
    ("  model.overrides.embed_dims: {choice: [16, 32]}\n", r"'embed_dims' is not a field of the swinir_l backbone config"),
    ("  model.head_overrides.widthh: {choice: [16, 32]}\n", r"'widthh' is not a field of the continuous head config"),
    ("  pretrain: {choice: [1, 2]}\n", r"pretrain is a section; name a key inside it"),
    ("  pretrain.lr.x: {choice: [1, 2]}\n", r"pretrain.lr is a value, not a section"),
    ("  model.overrides: {choice: [1, 2]}\n", r"name one field, as in model.overrides.<field>"),
    ("  pretrain.steps: {choice: [10, 20]}\n", r"pretrain.steps cannot be searched \(set by trial.steps\)"),
    ("  resources.num_workers: {choice: [1, 2]}\n", r"resources.num_workers cannot be searched"),
    ("  model.overrides.variant: {choice: [plain]}\n", r"'variant' is not a field"),
])
def test_keys_are_checked_against_the_typed_config(tmp_path, params, message):
    with pytest.raises(SpaceError, match=message) as err:
        check(tmp_path, params)
    assert "space.yaml" in str(err.value)


def test_wrong_values_fail_naming_the_key(tmp_path):
    with pytest.raises(UserError, match=r"pretrain.lr must be a number, got 'fast'"):
        check(tmp_path, "  pretrain.lr: {choice: [1.0e-4, fast]}\n")
    with pytest.raises(SpaceError, match=r"params.model.overrides.embed_dim = 30 gives an invalid trial"):
        # SCC needs 2 * heads (4) to divide the width: 30 never builds, whatever else is chosen
        check(tmp_path, "  model.overrides.embed_dim: {choice: [16, 30]}\n")
    with pytest.raises(SpaceError, match=r"no combination of the params gives a valid trial config"):
        # four windows per group but three layers per group (tiny depths are (3, 3))
        check(tmp_path, "  model.overrides.c2d_schedule: {choice: [[2, 1, 1, 2]]}\n")


def test_partly_invalid_combinations_warn(tmp_path):
    warnings = check(tmp_path, """
  model.overrides.embed_dim: {choice: [16, 20]}
  model.overrides.num_heads: {choice: [[2, 2], [4, 4]]}
""")
    # 20 is fine with 2 heads (2*2 divides 20) but not with 4 (2*4 does not)
    assert len(warnings) == 1 and "1 of 4 checked combinations" in warnings[0]
    assert "rejected without training" in warnings[0]


def test_metric_must_be_one_a_trial_reports(tmp_path):
    params = "  pretrain.lr: {loguniform: [1.0e-4, 1.0e-3]}\n"
    with pytest.raises(SpaceError, match=r"metric 'val_loss' .* is not reported by a pretrain trial; choose one of val_psnr"):
        check(tmp_path, params, metric="val_loss")
    assert check(tmp_path, params, metric="val_x4_psnr_ema") == []  # pretrain validates x2, x3, x4
    # without EMA the _ema metrics do not exist
    with pytest.raises(SpaceError, match=r"EMA metrics need <stage>.ema_decay > 0"):
        check(tmp_path, params + "  pretrain.ema_decay: {choice: [0.0, 0.9]}\n", metric="val_psnr_ema")
    finetune = HEAD.replace("stage: pretrain", "stage: finetune, init_from: /x/model.pt")
    space = load_space(space_file(tmp_path, "  finetune.lr: {loguniform: [1.0e-5, 1.0e-4]}\n", finetune))
    assert "val_x3_psnr" not in metric_names(space, ema=True)  # a x2 fine-tune reports x2 only
    with pytest.raises(SpaceError, match="takes its architecture from trial.init_from"):
        validate_space(load_space(space_file(tmp_path, "  model.overrides.embed_dim: {choice: [16]}\n",
                                             finetune)), tiny())


def test_trial_config_applies_trial_settings_and_values(tmp_path):
    space = load_space(space_file(tmp_path, "  model.overrides.embed_dim: {choice: [16, 32]}\n"))
    base = tiny().to_dict()
    data = trial_config_dict(base, space, {"model.overrides.embed_dim": 16, "pretrain.lr": 1e-3})
    cfg = Config.from_dict(data)
    assert cfg.pretrain.steps == 8 and cfg.pretrain.warmup_steps == 5  # tiny: warm-up 5 <= 8
    assert cfg.run.val_every == cfg.run.checkpoint_every == 2 and cfg.run.keep_checkpoints == 1
    assert cfg.model.overrides == {"embed_dim": 16} and cfg.pretrain.lr == 1e-3
    assert base["model"]["overrides"] == {}  # the base config is not modified
    short = load_space(space_file(tmp_path, "  pretrain.lr: {choice: [1.0e-3]}\n",
                                  HEAD.replace("steps: 8, report_every: 2", "steps: 3, report_every: 1")))
    assert Config.from_dict(trial_config_dict(base, short, {})).pretrain.warmup_steps == 3
