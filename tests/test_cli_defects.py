"""Issue 12 ("The README's flow works as written"): each test here failed before its fix.

Unit tests only: no servers, no Ray, a few seconds in all (T91 is packed once, when present).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srplatform.cli import COMMANDS, build_parser, main
from srplatform.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, size: tuple[int, int] = (24, 24), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny discrete x2 model file and a tiny continuous one that records its training range."""
    from c2disr.evaluate import save_model
    from c2disr.models import build_model

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    x2 = save_model(root / "tiny_x2.pt", build_model("swinir_l", variant="c2d", flavor="tiny", scale=2))
    cont = build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous")
    ranged = save_model(root / "tiny_cont.pt", cont, scale_range=(1.0, 4.0))
    return {"x2": x2, "continuous": ranged}


# ----------------------------------------------------------------------------- 3: upscale IN == OUT


def test_upscale_refuses_to_overwrite_its_input_file(tmp_path, model_files, capsys, monkeypatch):
    src = _png(tmp_path / "in.png")
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.png").symlink_to(src)
    for out in ("in.png", "./in.png", str(src), "link.png", f"{tmp_path}/sub/../in.png"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        rc = main(["upscale", "--model", str(model_files["x2"]), "in.png", out, "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2, (out, err)
        assert "overwrite" in err and "input" in err and "Traceback" not in err
        assert src.read_bytes() == before
    # the symlinked input written to its own target is refused the same way
    rc = main(["upscale", "--model", str(model_files["x2"]), "link.png", "in.png", "--quiet"])
    assert rc == 2 and src.read_bytes() == before


# ----------------------------------------------------------------------------- 5: symlink loops


def test_pack_skips_symlink_loops_and_duplicate_files(tmp_path, capsys):
    from srplatform.data.pack import pack, summary

    src = tmp_path / "src"
    for i in range(3):
        _png(src / f"a{i}.png", (40, 40), seed=i)
    _png(src / "deeper" / "b.png", (40, 40), seed=9)
    (src / "loop").symlink_to(src)                      # a loop back to the top
    (src / "deeper" / "up").symlink_to(src / "deeper")  # a loop to itself
    (src / "dup.png").symlink_to(src / "a0.png")        # the same file twice
    m = pack(str(src), str(tmp_path / "out"), min_size=8, progress=False)
    assert m["samples"] == 4 and m["inputs"] == 4
    assert m["symlink_loops_skipped"] == 2 and m["duplicates_skipped"] == 1
    text = summary(m)
    assert "2 symlink loop" in text and "1 duplicate" in text
    # the CLI summary says it too
    assert main(["data", "pack", str(src), str(tmp_path / "cli"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 samples" in out and "2 symlink loop" in out and "1 duplicate" in out


# ----------------------------------------------------------------------------- 6: bad destinations


def test_pack_bad_destination_fails_first_with_one_line(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    _png(src / "a.png", (40, 40))
    afile = tmp_path / "afile"
    afile.write_text("x")
    pack_mod = importlib.import_module("srplatform.data.pack")  # the package re-exports pack()

    def no_listing(*a, **k):  # the destination is checked before any input is read
        raise AssertionError("inputs were listed before the destination was checked")

    monkeypatch.setattr(pack_mod, "list_sources", no_listing)
    for dest in (str(afile), str(afile / "sub"), f"file://{afile}/sub/deeper"):
        assert main(["data", "pack", str(src), dest, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(afile) in err and "file" in err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(tmp_path / "ro")
                        else real_access(p, mode, **k))
    (tmp_path / "ro").mkdir()
    assert main(["data", "pack", str(src), str(tmp_path / "ro" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and len(err.strip().splitlines()) == 1


def test_upscale_bad_destination_fails_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    src = _png(tmp_path / "in" / "a.png")
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing_model = str(tmp_path / "no-such-model.pt")  # would be the error if loaded first
    cases = [(src.parent, afile / "out"), (src, afile / "out.png"), (src, afile / "d" / "o.png")]
    for inp, out in cases:
        assert main(["upscale", "--model", missing_model, str(inp), str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(afile) in err and "no-such-model" not in err
    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(ro)
                        else real_access(p, mode, **k))
    for out in (ro, ro / "new"):
        assert main(["upscale", "--model", missing_model, str(src.parent), str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "not writable" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- 7: eval skips bad images


def test_eval_skips_and_counts_a_bad_image(tmp_path, capsys):
    data = tmp_path / "bench"
    _png(data / "a.png", (40, 32), seed=1)
    _png(data / "b.png", (36, 36), seed=2)
    Image.new("RGB", (1, 1)).save(data / "c_tiny.png")
    (data / "d_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc = main(["eval", "--model", "bicubic", "--data", str(data), "--scales", "2", "--no-mlflow",
               "--quiet", "--json", str(tmp_path / "r.json")])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    assert "c_tiny.png" in cap.err and "d_broken.png" in cap.err and "Traceback" not in cap.err
    assert "bench" in cap.out and "2 of 4 images" in cap.out  # the table is printed
    report = json.loads((tmp_path / "r.json").read_text())
    res = report["results"][0]
    assert res["count"] == 2 and [s["name"] for s in res["skipped"]] == ["c_tiny.png", "d_broken.png"]


def test_evaluate_folder_reports_skips_with_names(tmp_path):
    from c2disr.evaluate import evaluate_folder
    from c2disr.ops.resize import imresize

    _png(tmp_path / "a.png", (40, 40))
    Image.new("RGB", (2, 3)).save(tmp_path / "tiny.png")
    res = evaluate_folder(lambda x: imresize(x, 4), tmp_path, 4)
    assert res["count"] == 1 and res["skipped"][0]["name"] == "tiny.png"
    assert "tiny.png" in res["skipped"][0]["reason"]


# ----------------------------------------------------------------------------- 8: min size


def test_pack_default_min_size_keeps_every_usable_image():
    from srplatform.data.pack import DEFAULT_MIN_SIZE

    parser = build_parser()
    args = parser.parse_args(["data", "pack", "SRC", "DEST"])
    assert args.min_size == DEFAULT_MIN_SIZE
    # the smallest HR crop any valid training config draws: data.patch >= 4 at scale >= 1
    from srplatform.config import Config, ConfigError

    with pytest.raises(ConfigError):
        Config.from_dict({"data": {"patch": DEFAULT_MIN_SIZE - 1}})
    Config.from_dict({"data": {"patch": DEFAULT_MIN_SIZE}})


def test_pack_t91_with_defaults_keeps_all_91(tmp_path, capsys):
    t91 = Path(os.environ.get("C2D_SHARED", REPO.parent / "shared")) / "data" / "T91"
    if not (t91 / "t1.png").is_file():
        pytest.skip(f"T91 not found at {t91}")
    assert main(["data", "pack", str(t91), str(tmp_path / "t91"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "91 samples" in out and "dropped" not in out


def test_pack_summary_says_when_many_were_dropped():
    from srplatform.data.pack import summary

    base = {"dest": "x", "samples": 40, "shards": [], "inputs": 91, "images": {},
            "params": {"min_size": 192}, "skipped_count": 51,
            "skipped": [{"source": f"t{i}.png", "reason": "too small: ..."} for i in range(51)]}
    text = summary(base)
    assert re.search(r"51 of 91 inputs \(56%\) were dropped", text)
    few = dict(base, samples=90, skipped_count=1, skipped=base["skipped"][:1])
    assert "were dropped" not in summary(few)


def test_pair_task_counts_batches_whose_samples_are_all_too_small():
    """A batch whose every image is smaller than the scale it drew emits no row; its count
    must still reach the `skipped` column (carried to the block's next batch)."""
    from srplatform.data.pipeline import _PairTask

    def enc(side, seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    files = [("s1", enc(20, 1)), ("s2", enc(20, 2)), ("g1", enc(80, 3)), ("g2", enc(80, 4))]
    block = {"key": np.array([k for k, _ in files], dtype=object),
             "url": np.array(["mem"] * 4, dtype=object),
             "image": np.array([d for _, d in files], dtype=object)}
    out = list(_PairTask(batch_size=2, patch=16, fixed_scale=3, scale_min=1.0, scale_max=4.0,
                         seed=0, epoch=0)(block))
    assert sum(len(b["lr"]) for b in out) == 2
    assert sum(int(b["skipped"].sum()) for b in out) == 2


# ----------------------------------------------------------------------------- 10: help examples


def _walk(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if action.choices and hasattr(action, "_name_parser_map"):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def _example_lines(text: str) -> list[str]:
    out = []
    for line in (text or "").splitlines():
        s = line.strip()
        if s.startswith("c2d "):
            out.append(re.split(r"\s{2,}", s)[0])  # "c2d stack up    start ..." -> the command
    return out


def _commands(example: str) -> list[str]:
    """The c2d commands of one example line ("c2d a; c2d b" and "&&" chains are several)."""
    return [c for c in re.split(r"\s*(?:;|&&)\s*", example) if c.startswith("c2d ")]


def test_every_help_example_parses_and_stands_on_its_own_line():
    parser = build_parser()
    seen, failures = 0, []
    for path, p in _walk(parser):
        rendered = [ln.strip() for ln in p.format_help().splitlines()]
        for ex in _example_lines(p.description) + _example_lines(p.epilog):
            seen += 1
            if not any(r.startswith(ex) for r in rendered):
                failures.append(f"{' '.join(path)}: example not on a line of its own: {ex}")
            for cmd in _commands(ex):
                # "[--follow]" in a synopsis line is optional: parse without it
                argv = shlex.split(re.sub(r"\s\[[^\]]*\]", "", cmd), comments=True)[1:]
                try:
                    args = parser.parse_args(argv)
                    if args.command == "submit" and args.extra and args.job in COMMANDS:
                        parser.parse_args([args.job, *args.extra])  # what the job will parse
                except SystemExit:
                    failures.append(f"{' '.join(path)}: does not parse: {cmd}")
    assert seen > 20
    assert not failures, "\n".join(failures)


def test_help_examples_use_the_stacks_bucket():
    from srplatform import stack

    bucket = stack.DEFAULT_BUCKET
    parser = build_parser()
    for path, p in _walk(parser):
        for ex in _example_lines(p.description) + _example_lines(p.epilog):
            for b in re.findall(r"s3://([^/\s']+)", ex):
                assert b == bucket, f"{' '.join(path)}: {ex} uses bucket {b}, the stack's is {bucket}"


# ----------------------------------------------------------------------------- 12: smaller items


def test_non_utf8_config_is_one_line_error_naming_the_file(tmp_path):
    from srplatform.config import ConfigError, load_config

    p = tmp_path / "latin1.yaml"
    p.write_bytes("data:\n  val: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(str(p))) as e:
        load_config(p)
    assert "UTF-8" in str(e.value)


def test_duplicate_yaml_keys_are_errors_naming_key_and_line(tmp_path):
    from srplatform.config import ConfigError, load_config
    from srplatform.tune_space import SpaceError, load_space

    p = tmp_path / "dup.yaml"
    p.write_text("data:\n  patch: 48\n  batch_size: 4\n  patch: 32\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'patch'.*line 4") as e:
        load_config(p)
    assert str(p) in str(e.value)
    top = tmp_path / "dup_top.yaml"
    top.write_text("data: {patch: 48}\nrun: {}\ndata: {patch: 32}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'data'.*line 3"):
        load_config(top)
    s = tmp_path / "space.yaml"
    s.write_text("params:\n  model.overrides.window: {choice: [4, 8]}\n"
                 "  model.overrides.window: {choice: [2]}\n")
    with pytest.raises(SpaceError, match=r"duplicate key 'model.overrides.window'.*line 3"):
        load_space(s)
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: a\ndata:\n  patch: 32\n")
    assert load_config(ok).data.patch == 32


def test_broken_pipe_is_quiet():
    # stdout is a pipe whose reader is gone before c2d writes to it
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.run([sys.executable, "-m", "srplatform", "model", "list"], stdout=w,
                          stderr=subprocess.PIPE, cwd=REPO, timeout=120)
    os.close(w)
    err = proc.stderr.decode()
    assert "BrokenPipe" not in err and "Traceback" not in err, err
    assert proc.returncode in (0, 141)


def test_unsafe_checkpoint_refused_without_torchs_advice(tmp_path, capsys):
    from c2disr.evaluate import load_model
    from c2disr.models.checkpoints import read_official_state_dict

    bad = tmp_path / "unsafe.pt"
    torch.save({"spec": {"arch": "swinir_l"}, "state_dict": {}, "x": _Payload()}, bad)
    for fn in (load_model, read_official_state_dict):
        with pytest.raises(ValueError) as e:
            fn(bad)
        msg = str(e.value)
        assert str(bad) in msg and "non-tensor" in msg and "refused" in msg
        for advice in ("weights_only=False", "weights_only` set to `False", "can still be loaded",
                       "trust", "\x1b["):
            assert advice not in msg, msg
    assert main(["eval", "--model", str(bad), "--data", str(tmp_path), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "non-tensor" in err and "weights_only" not in err and len(err.strip().splitlines()) == 1


class _Payload:
    pass


def test_continuous_model_outside_its_training_range_warns(tmp_path, model_files, capsys):
    from c2disr.evaluate import load_model

    assert load_model(model_files["continuous"]).scale_range == (1.0, 4.0)
    src = _png(tmp_path / "in.png", (10, 10))
    assert main(["upscale", "--model", str(model_files["continuous"]), "--scale", "2.5", str(src),
                 str(tmp_path / "ok.png"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["upscale", "--model", str(model_files["continuous"]), "--scale", "6", str(src),
                 str(tmp_path / "far.png"), "--quiet"]) == 0
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "x6" in warn[0] and "1-4" in warn[0], warn
    data = tmp_path / "bench"
    _png(data / "a.png", (30, 30))
    assert main(["eval", "--model", str(model_files["continuous"]), "--data", str(data),
                 "--scales", "2,5", "--no-mlflow", "--quiet"]) == 0
    warn = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "x5" in warn[0] and "1-4" in warn[0], warn


def test_training_checkpoint_model_files_record_the_scale_range(tmp_path):
    from c2disr.evaluate import load_model
    from c2disr.models import build_model
    from srplatform.config import Config
    from srplatform.train.loop import EMA_FILE, MODEL_FILE, save_checkpoint

    cfg = Config.from_dict({"data": {"scale_min": 1.5, "scale_max": 3.5}}).to_dict()
    model = build_model("swinir_l", variant="c2d", flavor="tiny", head="continuous")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    d = save_checkpoint(tmp_path / "ck", model=model, ema=None, optimizer=opt, scheduler=sched,
                        step=1, epoch=0, rng=[], config=cfg, stage={"kind": "pretrain"})
    assert load_model(d / MODEL_FILE).scale_range == (1.5, 3.5)
    assert not (d / EMA_FILE).exists()


def test_ray_init_is_quiet(monkeypatch):
    """ray_session: no token-auth notice (auth itself stays as Ray sets it) and
    no raylet worker-pool chatter; other raylet messages still come through."""
    import ray
    from ray._private import worker as ray_worker

    from srplatform.train import api

    calls, printed = [], []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    monkeypatch.setattr(auth_log, "level", auth_log.level)  # restored after the test
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((kw, dict(os.environ),
                                                                auth_log.getEffectiveLevel())))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, *a, **k: printed.append(data))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "C2D_RAY_LOGS"):
        monkeypatch.delenv(var, raising=False)
    with api.ray_session():
        pass
    kw, env, auth_level = calls[0]
    assert kw["log_to_driver"] is False and kw["logging_level"] == "WARNING"
    assert auth_level > logging.WARNING  # the token-auth notice is not shown
    assert "RAY_AUTH_MODE" not in env  # authentication itself is left as Ray sets it
    relay = ray_worker.print_to_stdstream
    relay({"lines": ["WARNING: 8 PYTHON worker processes have been started on node: ab with "
                     "address: 10.0.0.1, which is 4x the maximum expected startup concurrency"],
           "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == []
    oom = {"lines": ["Task was killed due to the node running low on memory."], "pid": "raylet",
           "is_err": False}
    relay(oom, ignore_prefix=False)
    assert printed == [oom]


def test_demo_ends_by_saying_the_stack_is_up(capsys):
    from srplatform.demo import print_closing

    print_closing(Path("/tmp/r/report.md"), "http://127.0.0.1:5000", "c2d-demo", 12.0)
    out = capsys.readouterr().out
    assert "report: /tmp/r/report.md" in out
    assert "still running" in out and "c2d stack down" in out


def test_stack_subcommands_have_descriptions():
    parser = build_parser()
    stack = dict(_walk(parser))[("stack",)]
    subs = {path[-1]: p for path, p in _walk(stack) if path}
    assert set(subs) == {"up", "status", "down", "env"}
    for name, p in subs.items():
        assert p.description and len(p.description) > 40, name
        assert p.description.strip() in " ".join(p.format_help().split()) or \
            p.description.splitlines()[0].strip() in p.format_help(), name
