"""`c2d tune`: a Ray Tune search over the hierarchical-encoding hyperparameters of a job config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "Search hierarchical-encoding hyperparameters (window schedule, depths, width, lr) with Ray Tune"
DESCRIPTION = """\
Runs a Ray Tune search over the keys of a job config named in a search-space file
(window schedule, base window, layers per group, width, heads as model.overrides.<field>,
learning rates as pretrain.lr / finetune.lr). Each trial is a real Ray Train run: by default a
short continuous-scale stage 1 from scratch, validated at the space's trial.scale
(val_psnr = val_x<scale>_psnr); see jobs/spaces/tiny.yaml for the file format.

Search algorithms (--algo): random, grid, optuna (TPE), optuna-mo (two objectives: PSNR up,
MACs down; the Pareto front is reported). ASHA stops weak trials early (scheduler section of
the space file). --max-macs rejects sampled models above a complexity budget (G MACs at
1280x720 output) before they train. Trials run concurrently as far as the Ray cluster's CPUs
allow (resources.num_workers x cpus_per_worker + data.num_cpus_per_task each).

Outputs go to $C2D_HOME/tune/<name>: best.yaml (the config with the best trial's values; train
it with `c2d pipeline --config .../best.yaml`), psnr_vs_macs.png, trials.txt, the trials'
runs; MLflow gets a parent run with one child run per trial. Every key, value, metric and
budget is checked before the first trial starts.

Ctrl-C stops the search and keeps its state: running the same command again (same --name)
resumes it: finished trials are kept, interrupted ones continue from their last checkpoint.

  c2d tune --config jobs/configs/tiny.yaml --space jobs/spaces/tiny.yaml
  c2d tune --config jobs/configs/tiny.yaml --space jobs/spaces/tiny.yaml --algo optuna-mo --trials 8
"""

DEFAULT_SPACE = "jobs/spaces/tiny.yaml"


def default_space_path() -> Path:
    import jobs

    return Path(jobs.__file__).resolve().parent / "spaces" / "tiny.yaml"


def configure(parser):
    from srplatform.commands.pretrain import DEFAULT_CONFIG

    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"YAML job config (default: the bundled {DEFAULT_CONFIG})")
    parser.add_argument("--space", metavar="PATH", default=None,
                        help=f"YAML search space (default: the bundled {DEFAULT_SPACE})")
    parser.add_argument("--name", default=None,
                        help="search name (default: <config name>-tune); the same name resumes a search")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a value of the job config, e.g. --set data.val_max_images=1")
    parser.add_argument("--algo", choices=["random", "grid", "optuna", "optuna-mo"], default=None,
                        help="search algorithm (default: the space file's search.algo, else random)")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="trial budget (default: the space file's search.trials)")
    parser.add_argument("--time-budget-s", type=float, default=None, metavar="S",
                        help="wall-clock budget of the whole search in seconds")
    parser.add_argument("--max-macs", type=float, default=None, metavar="G",
                        help="complexity budget in G MACs at 1280x720 output; larger models are not trained")
    parser.add_argument("--metric", default=None,
                        help="metric to maximise (default: the space file's search.metric, else val_psnr)")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                        help="run at most N trials at once (default: as many as the cluster fits)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON to PATH")


def run(args):
    from srplatform.commands.pretrain import DEFAULT_CONFIG, default_config_path
    from srplatform.config import load_config
    from srplatform.tune import run_tune

    cfg_path = args.config
    if cfg_path is None:
        cfg_path = default_config_path()
        print(f"using the default config {DEFAULT_CONFIG} (pass --config to choose another)", file=sys.stderr)
    space_path = args.space
    if space_path is None:
        space_path = default_space_path()
        print(f"using the default search space {DEFAULT_SPACE} (pass --space to choose another)",
              file=sys.stderr)
    cfg = load_config(cfg_path, list(args.overrides))
    result = run_tune(cfg, space_path, name=args.name, algo=args.algo, trials=args.trials,
                      time_budget_s=args.time_budget_s, max_macs=args.max_macs, metric=args.metric,
                      max_concurrent=args.max_concurrent)
    print()
    print(result.table())
    print()
    done = len([t for t in result.trials if t.status not in ("pending", "running")])
    print(f"search {result.name}: {done}/{len(result.trials)} trial(s) done in {result.seconds:.0f}s "
          f"({result.algo}, up to {result.max_concurrent} at once); folder {result.path}")
    if result.best is not None:
        b = result.best
        print(f"best: trial {b.trial_id}  {result.metric} {b.metric:.4f}"
              + (f"  {b.macs_g:.2f} G MACs" if b.macs_g is not None else ""))
        print(f"best config: {result.best_config_path}  (c2d pipeline --config {result.best_config_path})")
    if result.pareto:
        print("Pareto front (metric up, MACs down): " + ", ".join(t.trial_id for t in result.pareto))
    if result.plot_path:
        print(f"plot: {result.plot_path}")
    if result.mlflow_run_id:
        print(f"MLflow parent run: {result.mlflow_run_id}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True, default=str))
    if result.interrupted:
        why = f"stopped by an error ({result.error})" if result.error else "interrupted"
        print(f"the search was {why}; run the same command again (--name {result.name}) to resume it",
              file=sys.stderr)
        return 1 if result.error else 130
    return 0 if result.best is not None else 1
