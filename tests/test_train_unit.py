"""Unit tests of the training pieces that need no servers: parameter groups, schedules, EMA,
checkpoint files (weights_only), query sampling, validation metrics, progress lines, the
guarded MLflow client and the driver's bookkeeping helpers."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch
from torch import nn

from srplatform.config import Config, load_config
from srplatform.errors import UserError
from srplatform.train import loop, optim


@pytest.fixture(scope="module")
def tiny_model():
    from c2disr.models import build_model

    torch.manual_seed(0)
    return build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous")


# ----------------------------------------------------------------------------- param groups


def test_param_groups_split_by_kind(tiny_model):
    groups = {g["group"]: g for g in optim.param_groups(tiny_model, weight_decay=0.05)}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay, decay = set(groups["no_decay"]["names"]), set(groups["decay"]["names"])
    params = dict(tiny_model.named_parameters())
    assert no_decay.isdisjoint(decay) and no_decay | decay == set(params)
    for name in no_decay:
        p = params[name]
        assert p.ndim <= 1 or name.endswith("relative_position_bias_table"), name
    for name in decay:
        assert params[name].ndim >= 2 and not name.endswith("relative_position_bias_table"), name
    assert any(n.endswith(".bias") for n in no_decay)
    assert any("norm" in n and n.endswith(".weight") for n in no_decay)
    assert any(n.endswith("relative_position_bias_table") for n in no_decay)
    assert any(n.endswith(".weight") and params[n].ndim == 4 for n in decay)  # conv kernels
    # The tensors in the groups are the model's own (by identity), each exactly once.
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(params)


def test_param_groups_respect_model_hooks_and_frozen():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.table = nn.Parameter(torch.zeros(3, 3))
            self.A_logs = nn.Parameter(torch.zeros(2, 2))
            self.flagged = nn.Parameter(torch.zeros(2, 2))
            self.flagged._no_weight_decay = True
            self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)

        def no_weight_decay(self):
            return {"table"}

    groups = {g["group"]: g["names"] for g in optim.param_groups(Net(), 0.1)}
    assert groups["decay"] == ["proj.weight"]
    assert sorted(groups["no_decay"]) == ["A_logs", "flagged", "proj.bias", "table"]


def test_build_optimizer_choice_and_decay(tiny_model):
    cfg = load_config(None, ["pretrain.optimizer=adamw", "pretrain.weight_decay=0.01",
                             "pretrain.betas=[0.8, 0.95]"])
    opt = optim.build_optimizer(tiny_model, cfg.pretrain)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert isinstance(optim.build_optimizer(tiny_model, load_config(None).pretrain), torch.optim.Adam)


def test_head_lr_multiplier_groups(tiny_model):
    from c2disr.models import to_discrete

    model = to_discrete(tiny_model, 2)
    cfg = load_config(None, ["finetune.lr=1e-4"])
    opt = optim.build_optimizer(model, cfg.finetune, head_lr_mult=10.0)
    groups = {g["group"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay", "head_decay", "head_no_decay"}
    assert groups["head_decay"]["lr"] == pytest.approx(1e-3) and groups["decay"]["lr"] == 1e-4
    assert all(n.startswith("head.") for n in groups["head_decay"]["names"] + groups["head_no_decay"]["names"])
    assert not any(n.startswith("head.") for n in groups["decay"]["names"] + groups["no_decay"]["names"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # The schedule scales every group by the same factor, keeping the ratio.
    sched = optim.build_scheduler(opt, cfg.finetune)
    for _ in range(3):
        opt.step()
        sched.step()
    assert groups["head_decay"]["lr"] == pytest.approx(10 * groups["decay"]["lr"])
    # The default (finetune.head_lr_mult: 1) splits nothing; the config field does.
    assert len(optim.build_optimizer(model, cfg.finetune).param_groups) == 2
    cfg10 = load_config(None, ["finetune.lr=1e-4", "finetune.head_lr_mult=10"])
    by_name = {g["group"]: g for g in optim.build_optimizer(model, cfg10.finetune).param_groups}
    assert by_name["head_decay"]["lr"] == pytest.approx(1e-3)
    with pytest.raises(UserError, match="finetune.head_lr_mult"):
        load_config(None, ["finetune.head_lr_mult=0"])


# ----------------------------------------------------------------------------- schedules


def test_warmup_then_cosine():
    f = lambda s: optim.lr_factor(s, total=110, schedule="cosine", warmup=10)  # noqa: E731
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # half-way through the cosine span of 100 steps
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up


def test_multistep_and_constant():
    f = lambda s: optim.lr_factor(s, total=100, schedule="multistep", warmup=5,  # noqa: E731
                                  milestones=[40, 80], gamma=0.1)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert f(39) == 1.0 and f(40) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    assert optim.lr_factor(50, total=100, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.lr_factor(0, total=1, schedule="linear")


def test_scheduler_follows_the_step_count():
    cfg = load_config(None, ["pretrain.steps=20", "pretrain.warmup_steps=4", "pretrain.lr=0.1"])
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.pretrain.lr)
    sched = optim.build_scheduler(opt, cfg.pretrain)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.1 * optim.lr_factor(s, total=20, schedule="cosine", warmup=4) for s in range(20)]
    assert seen == pytest.approx(expect)


# ----------------------------------------------------------------------------- EMA


def test_ema_math_without_ramp():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = optim.EMA(net, decay=0.9, ramp=False)
    for value in (1.0, 2.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
    # 0.9 * (0.9 * 0 + 0.1 * 1) + 0.1 * 2 = 0.29
    assert float(ema.module.weight) == pytest.approx(0.29)
    assert not ema.module.weight.requires_grad and not ema.module.training


def test_ema_ramp_and_buffers_and_state():
    net = nn.BatchNorm1d(2)
    ema = optim.EMA(net, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.running_mean.fill_(5.0)
    ema.update(net)
    assert torch.allclose(ema.module.weight, torch.full((2,), 0.1 * 1.0 + 0.9 * 2.0))
    assert torch.equal(ema.module.running_mean, net.running_mean)  # copied, not averaged
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    clone = optim.EMA(nn.BatchNorm1d(2), decay=0.999)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 10_000 and torch.equal(clone.module.weight, ema.module.weight)
    with pytest.raises(ValueError):
        optim.EMA(net, decay=1.0)


# ----------------------------------------------------------------------------- checkpoints


def _train_steps(model, opt, sched, ema, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.rand(2, 3, 8, 8, generator=g)
        loss = model(x, out_size=(12, 12)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)


def test_checkpoint_round_trip_weights_only(tmp_path):
    from c2disr.evaluate import load_model
    from c2disr.models import build_model

    cfg = load_config(None, ["pretrain.steps=10", "pretrain.warmup_steps=2"])

    def fresh():
        torch.manual_seed(1)
        m = build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous")
        o = optim.build_optimizer(m, cfg.pretrain)
        return m, o, optim.build_scheduler(o, cfg.pretrain), optim.EMA(m, 0.9)

    model, opt, sched, ema = fresh()
    _train_steps(model, opt, sched, ema, 3, seed=0)
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(77)
    np.random.seed(5)
    random.seed(9)
    gen_next = torch.rand(3, generator=torch.Generator().set_state(gen.get_state()))
    rng = loop.rng_state(gen)
    expect_torch, expect_np, expect_py = torch.rand(2), np.random.rand(2), random.random()
    loop.save_checkpoint(tmp_path, model=model, ema=ema, optimizer=opt, scheduler=sched, step=3,
                         epoch=1, rng=[rng], config=cfg.to_dict(), stage={"kind": "pretrain"},
                         metrics={"val_x2_psnr": 30.0})
    assert {p.name for p in tmp_path.iterdir()} == {"state.pt", "model.pt", "model_ema.pt", "meta.json"}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["step"] == 3 and meta["ema"] and meta["metrics"]["val_x2_psnr"] == 30.0

    raw = torch.load(tmp_path / "state.pt", weights_only=True)  # no pickled objects inside
    assert isinstance(raw["config"], str) and raw["rng"][0]["torch"].dtype == torch.uint8
    state = loop.load_state(tmp_path)
    assert int(state["step"]) == 3 and state["config"] == cfg.to_dict()
    assert Config.from_dict(state["config"]) == cfg

    m2, o2, s2, e2 = fresh()
    m2.load_state_dict(state["model"])
    e2.load_state_dict(state["ema"])
    o2.load_state_dict(state["optimizer"])
    s2.load_state_dict(state["scheduler"])
    gen2 = torch.Generator()
    loop.set_rng_state(state["rng"][0], gen2)
    assert torch.equal(torch.rand(2), expect_torch)
    assert np.array_equal(np.random.rand(2), expect_np) and random.random() == expect_py
    assert torch.equal(torch.rand(3, generator=gen2), gen_next)
    assert s2.last_epoch == sched.last_epoch and o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # Continuing from the restored state matches continuing the original exactly.
    _train_steps(model, opt, sched, ema, 2, seed=1)
    _train_steps(m2, o2, s2, e2, 2, seed=1)
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(ema.module.parameters(), e2.module.parameters()):
        assert torch.equal(a, b)
    # The model files load through the project's loader (weights_only + spec).
    assert load_model(tmp_path / "model_ema.pt").continuous


def test_load_state_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="state.pt"):
        loop.load_state(tmp_path)


def test_resume_prefers_the_newest_stored_checkpoint_that_loads(tmp_path):
    """A restarted driver's Ray Train may not know the newest checkpoint on storage (killed
    between upload and commit); the loop takes the newest stored one that loads, skipping a
    torn one, and keeps Ray's own when that is as new."""
    from c2disr.models import build_model
    from srplatform.train.api import stored_checkpoints

    cfg = load_config(None, ["pretrain.steps=10"])
    m = build_model("swinir_l", variant="plain", flavor="tiny", head="continuous")
    o = optim.build_optimizer(m, cfg.pretrain)
    sch = optim.build_scheduler(o, cfg.pretrain)
    for step in (2, 4, 6):
        loop.save_checkpoint(tmp_path / f"checkpoint_{step:07d}", model=m, ema=None, optimizer=o,
                             scheduler=sch, step=step, epoch=0, rng=[loop.rng_state(torch.Generator())],
                             config=cfg.to_dict(), stage={"kind": "pretrain"})
    (tmp_path / "checkpoint_0000006" / "state.pt").write_bytes(b"torn upload")
    (tmp_path / "checkpoint_0000008").mkdir()  # no meta.json: not a checkpoint yet
    found = stored_checkpoints(tmp_path.as_uri())
    assert [int(meta["step"]) for _, meta in found] == [6, 4, 2]

    spec = loop.StageSpec(kind="pretrain", run_name="t", resume_from=[[u, int(mt["step"])] for u, mt in found])
    said: list[str] = []
    state = loop._newer_state_on_storage(spec, None, "cpu", said.append, 0, None)
    assert int(state["step"]) == 4
    assert any("does not load" in s for s in said) and any("checkpoint_0000004" in s for s in said)
    ray_state = {"step": torch.tensor(4)}
    assert loop._newer_state_on_storage(spec, ray_state, "cpu", said.append, 0, None) is ray_state
    assert loop._newer_state_on_storage(loop.StageSpec(kind="pretrain", run_name="t"), None, "cpu",
                                        said.append, 0, None) is None


# ----------------------------------------------------------------------------- query sampling


def test_sample_queries_coordinates_and_targets():
    b, big = 3, 20
    sizes = torch.tensor([20, 13, 7])
    hr = torch.zeros(b, 3, big, big)
    for i, s in enumerate(sizes.tolist()):
        ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        hr[i, 0, :s, :s] = ys.float()
        hr[i, 1, :s, :s] = xs.float()
        hr[i, 2, :s, :s] = 1.0  # marks the valid region
    q = 40
    coords, cells, targets = loop.sample_queries(hr, sizes, q, torch.Generator().manual_seed(0))
    assert coords.shape == cells.shape == (b, q, 2) and targets.shape == (b, q, 3)
    for i, s in enumerate(sizes.tolist()):
        iy = (coords[i, :, 0] + 1) * s / 2 - 0.5  # back from pixel centres to indices
        ix = (coords[i, :, 1] + 1) * s / 2 - 0.5
        assert torch.allclose(iy, iy.round(), atol=1e-4) and torch.allclose(ix, ix.round(), atol=1e-4)
        assert torch.equal(targets[i, :, 0], iy.round()) and torch.equal(targets[i, :, 1], ix.round())
        assert bool((targets[i, :, 2] == 1).all())  # never the zero padding
        assert torch.allclose(cells[i], torch.tensor([2.0 / s, 2.0 / s]).expand(q, 2))
        pairs = set(zip(iy.round().int().tolist(), ix.round().int().tolist()))
        assert len(pairs) == min(q, s * s)  # without replacement when the region is big enough


def test_sampled_coordinates_match_full_rendering(tiny_model):
    """The sampled (coords, cells) follow the model's own pixel-centre convention: querying
    every pixel of the valid region (q = S*S, so the draw is a permutation of the grid) gives
    the values of rendering the whole output at those pixels. (The head's linear attention
    mixes the queries of one call, so only the full set is comparable with a rendering.)"""
    torch.manual_seed(3)
    model = tiny_model.eval()
    big = 20
    for s in (20, 12):
        lr = torch.rand(1, 3, 8, 8)
        hr = torch.ones(1, 3, big, big)
        coords, cells, _ = loop.sample_queries(hr, torch.tensor([s]), s * s,
                                               torch.Generator().manual_seed(s))
        with torch.no_grad():
            queried = model.query(lr, coords, cells)[0]  # (s*s, 3) in the drawn order
            full = model(lr, out_size=(s, s))[0]  # (3, s, s)
        iy = ((coords[0, :, 0] + 1) * s / 2 - 0.5).round().long()
        ix = ((coords[0, :, 1] + 1) * s / 2 - 0.5).round().long()
        assert len(set(zip(iy.tolist(), ix.tolist()))) == s * s
        assert torch.allclose(queried, full[:, iy, ix].t(), atol=1e-4)


def test_train_forward_routes_both_modes(tiny_model):
    from c2disr.models import to_discrete

    fwd = loop.TrainForward(tiny_model)
    lr = torch.rand(1, 3, 8, 8)
    coords = torch.zeros(1, 5, 2)
    cells = torch.full((1, 5, 2), 0.1)
    assert fwd(lr, coords, cells).shape == (1, 5, 3)
    assert loop.TrainForward(to_discrete(tiny_model, 2))(lr).shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def small_val_folder(tmp_path_factory, shared_data):
    """Two small crops of Set5 images (fast to evaluate), one converted to gray."""
    from PIL import Image

    d = tmp_path_factory.mktemp("val")
    files = sorted((shared_data / "Set5").glob("*.png"))[:2]
    for i, f in enumerate(files):
        im = Image.open(f).convert("RGB").crop((40, 40, 40 + 50, 40 + 62))
        if i == 1:
            im = im.convert("L")
        im.save(d / f.name)
    return d


def test_validate_matches_evaluate_folder(tiny_model, small_val_folder):
    from c2disr.evaluate import evaluate_folder
    from srplatform.data.pipeline import val_pairs

    model = tiny_model.eval()
    pairs = {s: val_pairs(str(small_val_folder), s) for s in (2, 3)}
    metrics, samples = loop.validate({"": model}, pairs, rank=0, world=1,
                                     device=torch.device("cpu"), allreduce=lambda t: t)
    for s in (2, 3):
        ref = evaluate_folder(lambda x, s=s: model(x, out_size=(x.shape[-2] * s, x.shape[-1] * s)),
                              small_val_folder, s)
        assert metrics[f"val_x{s}_psnr"] == pytest.approx(ref["psnr"], abs=1e-6)
        assert metrics[f"val_x{s}_ssim"] == pytest.approx(ref["ssim"], abs=1e-6)
    # Ranks split the images (i % world == rank) and the sums add up.
    seen = []

    def capture(t):
        seen.append(t.clone())
        return t

    for rank in (0, 1):
        loop.validate({"": model}, {2: pairs[2]}, rank=rank, world=2, device=torch.device("cpu"),
                      allreduce=capture)
    assert [float(t[0, 2]) for t in seen] == [1.0, 1.0]
    total = (seen[0] + seen[1])[0]
    assert float(total[0] / total[2]) == pytest.approx(metrics["val_x2_psnr"], abs=1e-9)
    img = loop.comparison_image(*samples[("", 2)], 2)
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.shape[1] == 4 * img.shape[0] + 6


# ----------------------------------------------------------------------------- progress lines


def test_progress_lines():
    from srplatform.train.progress import fmt_duration, format_event

    line = format_event({"run": "t/x2", "kind": "train", "step": 5, "total": 40, "loss": 0.12345,
                         "lr": 2e-4, "images_per_s": 12.34, "data_wait_frac": 0.125, "eta_s": 75})
    assert line == "[t/x2] step 5/40  loss 0.1235  lr 2.0e-04  12.3 img/s  data-wait 12%  ETA 1:15"
    val = format_event({"run": "t/pretrain", "kind": "val", "step": 30, "metrics": {
        "val_x2_psnr": 30.0, "val_x2_ssim": 0.9, "val_x2_psnr_ema": 30.5,
        "val_x4_psnr": 25.0, "val_x4_ssim": 0.7}})
    assert val == "[t/pretrain] val @30: x2 30.00 dB / 0.9000 (ema 30.50 dB), x4 25.00 dB / 0.7000"
    assert fmt_duration(3725) == "1:02:05" and fmt_duration(float("nan")) == "?"
    assert "resuming at step 20/60" in format_event({"run": "r", "kind": "start", "step": 20,
                                                     "total": 60, "resumed_from": 20})


# ----------------------------------------------------------------------------- tracking


def test_tracker_survives_an_unreachable_server():
    from srplatform.stack import free_port
    from srplatform.tracking import Tracker

    import mlflow  # noqa: F401 - imported before timing: on a busy machine that alone takes seconds

    said = []
    t0 = time.monotonic()
    tr = Tracker(f"http://127.0.0.1:{free_port()}", say=said.append, cooldown=3600)
    assert tr.create_run("exp", "run") is None
    tr.log_metrics("abc", {"loss": 1.0}, step=1)
    tr.log_params("abc", {"a": 1})
    tr.end_run("abc")
    assert time.monotonic() - t0 < 20  # MLflow's default retries would take minutes
    assert len(said) == 1 and "unavailable" in said[0] and "continues" in said[0]
    assert tr.dropped >= 3 and "dropped" in tr.summary()


def test_tracker_background_sending_never_blocks_on_a_hung_server(monkeypatch):
    """A server that accepts connections but never answers: queued metrics return at once,
    `close` gives up at its deadline and counts what was not sent; the health probe fails fast."""
    import socket

    from srplatform.tracking import Tracker, server_reachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # never accepted: requests hang until their timeout
    try:
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        t0 = time.monotonic()
        assert not server_reachable(uri, timeout=1.0)
        assert time.monotonic() - t0 < 3
        said = []
        tr = Tracker(uri, say=said.append, probe=False, background=True, cooldown=3600)
        t0 = time.monotonic()
        for step in range(50):
            tr.log_metrics("run", {"loss": 1.0 / (step + 1)}, step=step)
            tr.log_image("run", np.zeros((4, 4, 3), np.uint8), f"img{step}.png")
        assert time.monotonic() - t0 < 1.0  # training never waited for the server
        assert not tr.close(timeout=1.0)
        assert tr.dropped >= 99 and len(said) <= 1
    finally:
        hung.close()


def test_tracker_hides_credentials_in_messages():
    from srplatform.tracking import redact_uri

    assert redact_uri("https://user:secret@host:5000") == "https://***@host:5000"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_tracker_off_is_a_no_op():
    from srplatform.tracking import Tracker

    tr = Tracker("", say=lambda m: pytest.fail(m))
    assert not tr.enabled and tr.create_run("e", "r") is None and tr.summary() == ""


# ----------------------------------------------------------------------------- driver helpers


def test_plan_epochs():
    from srplatform.train.api import MAX_EPOCHS_PER_RUN, plan_epochs

    # 80 images, 2 workers, batch 4: 10 steps per epoch -> 60 steps need 6 (+1 margin).
    assert plan_epochs(samples=80, batch_size=4, workers=2, steps_left=60) == (7, 1)
    assert plan_epochs(samples=80, batch_size=4, workers=2, steps_left=0) == (1, 1)
    assert plan_epochs(samples=80, batch_size=4, workers=2, steps_left=630) == (MAX_EPOCHS_PER_RUN, 1)
    # Longer runs take more crops per image instead of more chained epochs, never running short.
    for steps in (631, 5_000, 10**6):
        epochs, crops = plan_epochs(samples=80, batch_size=4, workers=2, steps_left=steps)
        assert crops > 1 and epochs <= MAX_EPOCHS_PER_RUN and (epochs - 1) * crops * 10 >= steps
    # DIV2K-like: 800 images, 4 workers x 16, 500k steps.
    epochs, crops = plan_epochs(samples=800, batch_size=16, workers=4, steps_left=500_000)
    assert epochs <= MAX_EPOCHS_PER_RUN and (epochs - 1) * crops * 12 >= 500_000
    with pytest.raises(UserError, match="too few"):
        plan_epochs(samples=7, batch_size=4, workers=2, steps_left=10)


def test_identity_mismatch_is_refused(tmp_path):
    from srplatform.train.api import _check_identity, stage_identity

    uri = tmp_path.as_uri()
    cfg = load_config(None)
    _check_identity(uri, stage_identity(cfg, "pretrain", None), "x/pretrain")
    _check_identity(uri, stage_identity(cfg.replace(["run.log_every=3"]), "pretrain", None), "x/pretrain")
    # A first attempt that failed before its first checkpoint saved nothing to resume: corrected
    # settings replace its record instead of locking the name (issue 12, item 2).
    said = []
    fixed = cfg.replace(["model.variant=hit"])
    _check_identity(uri, stage_identity(fixed, "pretrain", None), "x/pretrain", say=said.append)
    assert said and "model.variant" in said[0]
    _check_identity(uri, stage_identity(fixed, "pretrain", None), "x/pretrain")
    # Once a checkpoint exists, a re-run resumes it: different settings are refused.
    ckpt = tmp_path / "checkpoint_0000005"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"step": 5}))
    with pytest.raises(UserError, match=r"pretrain.steps|section.steps"):
        _check_identity(uri, stage_identity(fixed.replace(["pretrain.steps=7"]), "pretrain", None),
                        "x/pretrain")


def test_resolve_init_finds_model_files(tmp_path):
    from c2disr.evaluate import save_model
    from c2disr.models import build_model
    from srplatform.train.api import resolve_init

    cfg = load_config(None)
    run = tmp_path / "pretrain"
    for step in (10, 20):
        d = run / f"checkpoint_{step:07d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step}))
        save_model(d / "model.pt", build_model("swinir_l", flavor="tiny", head="continuous"))
    (run / "checkpoint_0000020" / "model_ema.pt").write_bytes((run / "checkpoint_0000020" / "model.pt").read_bytes())
    newest = run / "checkpoint_0000020"
    assert resolve_init(str(run), cfg) == (newest / "model_ema.pt").as_uri()
    assert resolve_init(newest.as_uri(), cfg) == (newest / "model_ema.pt").as_uri()
    assert resolve_init(str(run / "checkpoint_0000010" / "model.pt"), cfg).endswith("0000010/model.pt")
    with pytest.raises(UserError, match="not a model file"):
        resolve_init(str(tmp_path), cfg)


def test_source_name_and_summary_table():
    from srplatform.train.api import StageResult, source_name, summary_table

    assert source_name("T91") == "T91"
    assert source_name("/data/DIV2K/") == "DIV2K"
    assert source_name("s3://bucket/images/*.png") == "images"
    table = summary_table([
        StageResult(name="t/x2", kind="finetune", scale=2, steps=40, seconds=12.0,
                    metrics={"val_x2_psnr": 30.123, "val_x2_ssim": 0.9, "val_x2_psnr_ema": 30.2,
                             "val_x2_ssim_ema": 0.91, "val_x2_psnr_bicubic": 29.9},
                    model_path="/m.pt", registered_model="c2disr-swinir_l-c2d-x2:7"),
        StageResult(name="t/x3", kind="finetune", scale=3, error="RuntimeError: boom"),
    ])
    # The headline is the kept (EMA) weights, the ones saved and registered; raw in brackets.
    assert "x2 30.20/0.9100 (raw 30.12)" in table and "FAILED: RuntimeError: boom" in table
    header = table.splitlines()[0]
    assert "bicubic" in header and "gain dB" in header and "registered" in header
    assert "x2 29.90" in table and "x2 +0.30" in table  # the gain of the EMA weights
    assert "c2disr-swinir_l-c2d-x2 v7" in table


def test_fan_out_reports_a_failed_scale_and_finishes_the_others(monkeypatch):
    """The fan-out runs scales concurrently; one raising does not stop or hide the others."""
    import threading

    from srplatform.train import api

    started, barrier = [], threading.Barrier(3, timeout=10)

    def fake_stage(cfg, *, kind, scale, **kw):
        started.append(scale)
        barrier.wait()  # all three are in flight at the same time
        if scale == 3:
            raise RuntimeError("worker ran out of memory")
        return api.StageResult(name=f"t/x{scale}", kind=kind, scale=scale, steps=5)

    class Printer:
        lines: list[str] = []

        def say(self, run, msg):
            self.lines.append(f"[{run}] {msg}")

    monkeypatch.setattr(api, "_run_stage", fake_stage)
    printer = Printer()
    cfg = load_config(None, ["name=t"])
    out = api._fan_out(cfg, [2, 3, 4], "/init.pt", data=None, tracker=None, parent_run_id=None,
                       printer=printer)
    assert sorted(started) == [2, 3, 4]
    assert out[2].ok and out[4].ok and out[4].steps == 5
    assert not out[3].ok and "worker ran out of memory" in out[3].error
    assert any("t/x3" in line and "FAILED" in line for line in printer.lines)


def test_tracker_rejected_request_is_not_an_outage(monkeypatch):
    """A call that fails while the server is healthy is dropped alone: later calls still go out."""
    from srplatform import tracking

    monkeypatch.setattr(tracking, "server_reachable", lambda uri, timeout=3.0: True)
    said, sent = [], []
    tr = tracking.Tracker("http://127.0.0.1:1", say=said.append, probe=False)

    def bad():
        raise ValueError("INVALID_PARAMETER_VALUE: metric name")

    assert tr.call("log metrics", bad, default="d") == "d"
    assert tr.call("log metrics", bad) is None
    assert tr.available and tr.call("set tags", lambda: sent.append(1) or "ok") == "ok"
    assert sent == [1] and len(said) == 1 and "log metrics failed" in said[0]


def test_stage_loss_starts_with_l2_then_follows_the_config():
    from srplatform.config import load_config
    from srplatform.train.optim import stage_loss

    from .conftest import REPO

    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["pretrain.l2_steps=3"])
    pred, target = torch.zeros(2, 5, 3, requires_grad=True), torch.full((2, 5, 3), 0.5)
    for step, want in ((0, 0.25), (2, 0.25), (3, 0.5)):  # L2 = 0.5^2 during the first 3 steps, then L1
        objective, shown = stage_loss(pred, target, step=step, section=cfg.pretrain)
        assert float(objective.detach()) == pytest.approx(want)
        assert float(shown) == pytest.approx(0.5) and not shown.requires_grad  # always the L1
    assert cfg.finetune.l2_steps == 0 and cfg.finetune.loss == "l1"
    two = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["finetune.loss=l2"])
    assert float(stage_loss(pred, target, step=99, section=two.finetune)[0].detach()) == pytest.approx(0.25)


@pytest.mark.parametrize("override, message", [
    ("pretrain.loss=huber", "pretrain.loss must be l1 or l2"),
    ("pretrain.l2_steps=-1", "pretrain.l2_steps must be >= 0"),
    ("finetune.residual=bicubic", "finetune.residual must be bilinear or none"),
    ("finetune.head_fit_batches=0", "finetune.head_fit_batches must be >= 1"),
])
def test_new_training_settings_are_validated(override, message):
    from srplatform.config import ConfigError, load_config

    from .conftest import REPO

    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "jobs" / "configs" / "tiny.yaml", [override])


def test_validation_reports_bicubic_and_the_gain():
    """`validate` with the baseline gives bicubic PSNR on the same pairs; `with_gains` adds
    model minus bicubic for the raw and EMA weights."""
    from c2disr.metrics import psnr, quantize
    from c2disr.ops.resize import imresize
    from srplatform.train import loop

    torch.manual_seed(0)
    hr = torch.rand(1, 3, 16, 16)
    lr = imresize(hr, scale=0.5).clamp(0, 1)
    pairs = {2: [("a", lr, hr)]}

    class Exact(torch.nn.Module):  # returns the HR image: infinite PSNR is clipped by measure
        continuous = False

        def forward(self, x):
            return hr + 0.01

    metrics, samples = loop.validate({"": Exact(), "bicubic": loop.BicubicBaseline()}, pairs, rank=0,
                                     world=1, device=torch.device("cpu"), allreduce=lambda t: t)
    want = float(psnr(quantize(imresize(lr, scale=2).clamp(0, 1)), hr, 2, y_channel=True)[0])
    assert metrics["val_x2_psnr_bicubic"] == pytest.approx(want, abs=1e-6)
    gains = loop.with_gains({**metrics, "val_x2_psnr_ema": metrics["val_x2_psnr"] + 1})
    assert gains["val_x2_gain_db"] == pytest.approx(metrics["val_x2_psnr"] - want)
    assert gains["val_x2_gain_db_ema"] == pytest.approx(gains["val_x2_gain_db"] + 1)
