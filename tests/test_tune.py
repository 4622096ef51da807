"""`c2d tune` / `srplatform.tune.run_tune`.

Unit part (no servers): concurrency from cluster resources, the Pareto front, the table, the plot,
the exported best config, Optuna over our labelled categories, bad input through the CLI (it
must fail before Ray starts).

Integration part (real Ray, real MLflow from the `stack` fixture, tiny models on CPU): one small
grid search, interrupted after its first trial finished and then resumed under the same name.
Together the two sessions show: a finished trial is kept and not run again; ASHA stops a trial
early; a sampled model over the MACs budget is rejected before training; MLflow gets a parent
run with one child per trial and its status; best.yaml loads with `load_config` and a very
short `run_pipeline` trains it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from srplatform.config import Config, load_config
from srplatform.errors import UserError
from srplatform.tune import (
    TrialRecord,
    concurrency,
    export_best,
    pareto_front,
    plot_front,
    trial_resources,
    trials_table,
)
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"


# --------------------------------------------------------------------------------------
# Unit
# --------------------------------------------------------------------------------------


def test_concurrency_follows_the_cluster_and_the_trial_size():
    cfg = load_config(TINY)  # 2 workers x 0.25 CPU + one 0.25-CPU data task (+ the trial actor)
    need = trial_resources(cfg)
    assert need["CPU"] == pytest.approx(0.76) and need["GPU"] == 0
    assert concurrency({"CPU": 2.0}, need, planned=4) == 2
    assert concurrency({"CPU": 8.0}, need, planned=4) == 4  # never more than the trials
    assert concurrency({"CPU": 8.0}, need, planned=10, cap=3) == 3
    assert concurrency({"CPU": 0.8}, need, planned=4) == 1
    gpu = cfg.replace(["resources.gpus_per_worker=1", "resources.num_workers=2"])
    assert concurrency({"CPU": 64.0, "GPU": 4.0}, trial_resources(gpu), planned=8) == 2
    with pytest.raises(UserError, match=r"one trial needs 0.76 CPU .* the Ray cluster has 0.5"):
        concurrency({"CPU": 0.5}, need, planned=4)
    with pytest.raises(UserError, match=r"one trial needs 2 GPU"):
        concurrency({"CPU": 64.0}, trial_resources(gpu), planned=4)


def records() -> list[TrialRecord]:
    def rec(i, psnr, macs, status="finished"):
        return TrialRecord(trial_id=f"abc_0000{i}", labels={"pretrain.lr": 1e-4 * (i + 1)},
                           values={"pretrain.lr": 1e-4 * (i + 1), "model.overrides.embed_dim": 16 * (i + 1)},
                           status=status, metric=psnr, macs_g=macs, params=1000 * (i + 1),
                           iterations=4, step=24)

    return [rec(0, 30.0, 5.0), rec(1, 31.0, 10.0), rec(2, 30.5, 12.0), rec(3, 29.0, 4.0),
            rec(4, 28.0, 2.0, status="early-stopped")]


def test_pareto_front_keeps_the_non_dominated_trials():
    pts = [(r.trial_id, r.metric, r.macs_g) for r in records()]
    # 2 (30.5 dB at 12 G) is dominated by 1 (31 dB at 10 G); the rest trade quality for MACs
    assert pareto_front(pts) == {"abc_00000", "abc_00001", "abc_00003", "abc_00004"}
    assert pareto_front([("a", 1.0, 1.0), ("b", 1.0, 1.0)]) == {"a", "b"}  # ties dominate neither


def test_table_plot_and_best_config(tmp_path):
    recs = records()
    recs[1].pareto = True
    recs.append(TrialRecord(trial_id="abc_00005", labels={}, values={"model.overrides.embed_dim": 99},
                            status="rejected", error="99.00 G MACs exceeds the budget of 20 G"))
    table = trials_table(recs, "val_psnr")
    lines = table.splitlines()
    assert lines[0].split() == ["trial", "params", "MACs", "(G)", "val_psnr", "iter", "steps", "status"]
    assert len(lines) == 7
    assert "lr=0.0002 embed_dim=32" in lines[2] and "31.000" in lines[2] and "finished *pareto" in lines[2]
    assert "rejected: 99.00 G MACs exceeds the budget" in lines[6]

    png = plot_front(recs, "val_psnr", tmp_path / "front.png", "test")
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert plot_front(recs[-1:], "val_psnr", tmp_path / "none.png", "x") is None  # nothing to plot

    cfg = load_config(TINY)
    path = export_best(cfg, recs[1], tmp_path / "best.yaml", "search-best")
    best = load_config(path)
    assert best.name == "search-best"
    assert best.pretrain.lr == pytest.approx(2e-4) and best.model.overrides == {"embed_dim": 32}
    assert best.data == cfg.data and best.finetune == cfg.finetune  # the rest is the job config
    assert "c2d pipeline --config" in path.read_text()


def test_error_summary_picks_the_informative_line():
    from srplatform.tune import error_summary

    ray_text = ("Failure # 1\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                "ray.train.ControllerError: Training failed due to controller error:\n"
                "2 worker(s) were killed due to the node running low on memory.\nObject store: ...\n")
    assert error_summary(ray_text) == ("ray.train.ControllerError: Training failed due to controller "
                                       "error: 2 worker(s) were killed due to the node running low on memory.")
    rejected = "Traceback ...\nsrplatform.tune.TrialRejected: 75.00 G MACs exceeds the budget of 30 G\n"
    assert error_summary(rejected) == "TrialRejected: 75.00 G MACs exceeds the budget of 30 G"
    assert error_summary("TuneError: Traceback (most recent call last):\nRuntimeError: boom") == "RuntimeError: boom"
    assert error_summary("", "KeyError") == "KeyError"


def test_optuna_samples_our_labels_and_finds_the_pareto_front(tmp_path):
    """OptunaSearch (TPE) over the encoded categories, driven without a cluster: suggest,
    decode into config values, report two objectives, read back the non-dominated trials."""
    pytest.importorskip("optuna")
    from srplatform.tune import _make_searcher
    from srplatform.tune_space import load_space

    space_path = tmp_path / "s.yaml"
    space_path.write_text("""
search: {algo: optuna-mo, trials: 6, seed: 3}
params:
  pretrain.lr: {loguniform: [1.0e-4, 1.0e-3]}
  shape:
    joint:
      - {model.overrides.c2d_schedule: [2, 1, 2], model.overrides.depths: [3, 3]}
      - {model.overrides.c2d_schedule: [1, 1, 1], model.overrides.depths: [3, 3]}
""")
    space = load_space(space_path)
    searcher, limited = _make_searcher(space, 1)
    assert limited and searcher.metric == ["val_psnr", "macs_g"] and searcher.mode == ["max", "min"]
    searcher.set_search_properties(None, None, space.param_space())
    for i in range(6):
        sampled = searcher.suggest(f"t{i}")
        values = space.decode(sampled)
        assert set(values) == {"pretrain.lr", "model.overrides.c2d_schedule", "model.overrides.depths"}
        macs = 10.0 if values["model.overrides.c2d_schedule"] == [2, 1, 2] else 8.0
        searcher.on_trial_complete(f"t{i}", result={"val_psnr": 30 + 1000 * values["pretrain.lr"],
                                                    "macs_g": macs})
    study = searcher._ot_study
    assert len(study.trials) == 6 and len(study.directions) == 2
    assert 1 <= len(study.best_trials) <= 2  # at most one best per MACs level


@pytest.mark.parametrize("space_text, flags, message", [
    ("params:\n  pretrain.lrr: {loguniform: [1.0e-4, 1.0e-3]}\n", [],
     "pretrain.lrr is not a config key (did you mean pretrain.lr?)"),
    ("params:\n  pretrain.lr: {uniform: [1.0e-3, 1.0e-4]}\n", [], "low 0.001 must be less than high 0.0001"),
    ("params:\n  pretrain.lr: {grid: [1.0e-3, 1.0e-4]}\n", ["--algo", "optuna"], "Optuna cannot sample"),
    ("params:\n  pretrain.lr: {choice: [1.0e-3]}\n", ["--trials", "0"], "must be at least 1, got 0"),
    ("params:\n  pretrain.lr: {choice: [1.0e-3]}\n", ["--metric", "val_loss"], "metric 'val_loss'"),
    ("params:\n  pretrain.lr: {choice: [1.0e-3]}\n", ["--time-budget-s", "0"], "time budget"),
    ("", [], "empty search space"),
])
def test_cli_refuses_bad_input_before_anything_starts(tmp_path, monkeypatch, capsys, space_text, flags, message):
    from srplatform.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("C2D_HOME", str(home))
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    rc = main(["tune", "--config", str(TINY), "--space", str(space), *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "c2d tune: error:" in err
    assert str(space) in err  # the message names the space file
    assert not (home / "tune").exists()  # nothing was created, no trial started
    import sys

    if "ray" in sys.modules:
        import ray

        assert not ray.is_initialized()


# --------------------------------------------------------------------------------------
# Integration: a real search, interrupted and resumed
# --------------------------------------------------------------------------------------

SPACE = """
trial: {stage: pretrain, scale: 2, steps: 4, report_every: 2}
search: {algo: grid, trials: 4, metric: val_psnr, max_macs: 30}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
params:
  # One joint option per trial, in this order (grid). A learning rate of 0.03 moves every weight
  # by about 0.03 per Adam step, so after 2 steps its PSNR at the first rung is well below the
  # others' whatever crops it drew, and ASHA stops it (2e-3 was stopped only most of the time;
  # 0.5 makes the loss NaN, which the training loop stops as diverged); embed_dim 64 is about
  # 75 G MACs at 1280x720, over the 30 G budget, so that trial is rejected without training.
  setting:
    joint:
      - {pretrain.lr: 1.0e-6}
      - {pretrain.lr: 1.0e-4}
      - {pretrain.lr: 0.03}
      - {pretrain.lr: 1.0e-4, model.overrides.embed_dim: 64}
"""


class _Starts:
    """Records the trials started in one session (a Ray Tune callback, duck-typed)."""

    def __init__(self):
        self.ids: list[str] = []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.ids.append(trial.trial_id)


class _InterruptAfterFirst(_Starts):
    """Sends this process one SIGINT (Ctrl-C) when the first trial completes."""

    def __init__(self):
        super().__init__()
        self.sent = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def search(stack, mlflow_uri, shared_data, tmp_path_factory):
    from PIL import Image

    from srplatform.tune import run_tune

    root = tmp_path_factory.mktemp("tune")
    val = root / "val"
    val.mkdir()
    # One 96x96 validation image keeps each validation (x2, x3, x4) to a fraction of a second.
    with Image.open(shared_data / "Set5" / "butterfly.png") as im:
        im.convert("RGB").crop((64, 64, 160, 160)).save(val / "butterfly_crop.png")
    space = root / "space.yaml"
    space.write_text(SPACE)
    cfg = load_config(TINY, [f"data.val={val}", "data.val_max_images=0", "resources.num_workers=1",
                             "resources.cpus_per_worker=0.5", f"tracking.uri={mlflow_uri}",
                             "tracking.experiment=test-tune"])
    first = _InterruptAfterFirst()
    r1 = run_tune(cfg, space, name="itest", max_concurrent=1, callbacks=[first])
    second = _Starts()
    r2 = run_tune(cfg, space, name="itest", max_concurrent=1, callbacks=[second])
    return SimpleNamespace(cfg=cfg, space=space, r1=r1, r2=r2, started1=first.ids,
                           started2=second.ids, uri=mlflow_uri)


@pytest.mark.integration
@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(search):
    r1, r2 = search.r1, search.r2
    assert r1.interrupted and not r1.resumed
    done1 = {t.trial_id for t in r1.trials if t.status == "finished"}
    assert len(done1) == 1 and done1 <= set(search.started1)
    assert not r2.interrupted and r2.resumed
    ids1, ids2 = [t.trial_id for t in r1.trials], [t.trial_id for t in r2.trials]
    assert set(ids1) <= set(ids2) and len(ids2) == 4  # the same trial ids, then the rest
    assert not done1 & set(search.started2)  # the finished trial was not started again
    (kept,) = [t for t in r2.trials if t.trial_id in done1]
    (before,) = [t for t in r1.trials if t.trial_id in done1]
    assert kept.status == "finished" and kept.metric == before.metric and kept.step == 4


@pytest.mark.integration
@pytest.mark.slow
def test_asha_stops_a_trial_early_and_the_budget_rejects_one(search):
    by_status = {}
    for t in search.r2.trials:
        by_status.setdefault(t.status, []).append(t)
    # lr 0.03 is stopped at the first rung every time. Which of lr 1e-6 and 1e-4 is ahead after
    # 2 steps is noise (both start at the bilinear base and learn little in 2 steps), so ASHA
    # may stop the second of them too; the first (finished before the interruption) is kept.
    stopped_lrs = sorted(t.values["pretrain.lr"] for t in by_status.get("early-stopped", []))
    finished_lrs = sorted(t.values["pretrain.lr"] for t in by_status.get("finished", []))
    assert 0.03 in stopped_lrs and 0.03 not in finished_lrs
    assert 1e-6 in finished_lrs and sorted(stopped_lrs + finished_lrs) == [1e-6, 1e-4, 0.03]
    for stopped in by_status["early-stopped"]:
        assert stopped.step == 2 and stopped.iterations == 1 and stopped.metric is not None
    assert all(t.step == 4 and t.iterations == 2 for t in by_status["finished"])
    (rejected,) = by_status["rejected"]
    assert rejected.values["model.overrides.embed_dim"] == 64
    assert rejected.macs_g > 30 and "exceeds the budget of 30 G" in rejected.error
    assert rejected.metric is None and rejected.step == 0
    best = search.r2.best
    assert best.status == "finished" and best.metric == max(t.metric for t in by_status["finished"])
    table = search.r2.table()
    for t in search.r2.trials:
        assert t.trial_id in table
    assert "early-stopped" in table and "rejected" in table


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_parent_with_one_child_per_trial(search):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=search.uri)
    parent = c.get_run(search.r2.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["c2d.kind"] == "tune"
    assert search.r1.mlflow_run_id == search.r2.mlflow_run_id  # the resumed search continued it
    assert parent.data.metrics["trials_done"] == 4
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "psnr_vs_macs.png", "trials.txt"} <= arts
    exp = c.get_experiment_by_name("test-tune")
    children = c.search_runs([exp.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {r.data.tags["c2d.trial_id"]: r for r in children}
    assert sorted(by_trial) == sorted(t.trial_id for t in search.r2.trials)
    assert len(children) == 4  # one child per trial, none duplicated by the resume
    expect = {"finished": "FINISHED", "early-stopped": "KILLED", "rejected": "FAILED"}
    for t in search.r2.trials:
        run = by_trial[t.trial_id]
        assert run.data.tags["c2d.trial_status"] == t.status
        assert run.info.status == expect[t.status]
        assert run.data.metrics["macs_g"] == pytest.approx(t.macs_g)
        assert run.data.metrics["params"] == t.params
        assert "tune.setting" in run.data.params
        if t.status != "rejected":  # trained: the training run logged its config and curves
            assert run.data.params["pretrain.lr"] == str(t.values["pretrain.lr"])
            # The trial record holds a value MLflow logged for this trial (which report it is
            # depends on where the interruption fell; the child's latest may be a later one).
            hist = c.get_metric_history(run.info.run_id, "val_x2_psnr")
            logged = {m.step: m.value for m in hist}
            assert any(v == pytest.approx(t.metric) for v in logged.values()), (t.metric, logged)
            if t.status == "early-stopped":
                # ASHA's stop reaches the trial asynchronously: it may have trained (and
                # logged) on to its next report before it was stopped.
                assert 2 in logged and set(logged) <= {2, 4}, logged
            else:
                assert sorted(logged) == [2, 4]


@pytest.mark.integration
@pytest.mark.slow
def test_best_config_is_accepted_by_the_pipeline(search):
    from srplatform.train.api import run_pipeline

    path = Path(search.r2.best_config_path)
    assert path == Path(search.r2.path) / "best.yaml" and path.is_file()
    best = load_config(path)
    assert isinstance(best, Config) and best.name == "itest-best"
    assert best.pretrain.lr == pytest.approx(search.r2.best.values["pretrain.lr"])
    assert best.pretrain.steps == search.cfg.pretrain.steps  # the job's own budget, not a trial's
    # A very short pipeline from the exported file: both stages, one fine-tuning scale.
    short = load_config(path, ["pretrain.steps=2", "pretrain.warmup_steps=0", "finetune.steps=1",
                               "finetune.scales=[2]", "run.val_every=2", "run.checkpoint_every=2"])
    result = run_pipeline(short)
    assert result.ok, result.to_dict()
    assert result.pretrain.steps == 2 and result.finetune[2].steps == 1
