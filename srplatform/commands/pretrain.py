"""`c2d pretrain`: stage 1, continuous-scale pretraining on Ray Train.

Also home of the options and helpers the three training commands share (`pretrain`,
`finetune`, `pipeline`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "Stage 1: continuous-scale pretraining (backbone + implicit head) on Ray Train"
DESCRIPTION = """\
Stage 1 of C2D-ISR: trains the backbone with the continuous (arbitrary-scale) head on
random-scale LR/HR pairs (scale uniform in [data.scale_min, data.scale_max]) with DDP on
resources.num_workers Ray Train workers. Checkpoints go to <storage>/<name>/pretrain
(storage: cfg.storage, default $C2D_HOME/runs); metrics, config and weights to MLflow
(cfg.tracking.uri > $MLFLOW_TRACKING_URI > the local stack, started when needed).

Re-running the same command with the same --name resumes from the latest checkpoint (the
step count continues); a finished run is reported without training again.

  c2d pretrain --config jobs/configs/tiny.yaml --set pretrain.steps=200 --name trial1
"""

DEFAULT_CONFIG = "jobs/configs/tiny.yaml"


def default_config_path() -> Path:
    """The bundled tiny config (package data of `jobs`), whatever the working directory."""
    import jobs

    return Path(jobs.__file__).resolve().parent / "configs" / "tiny.yaml"


def add_training_args(parser) -> None:
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"YAML job config (default: the bundled {DEFAULT_CONFIG}, a few-minute CPU run)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config value, e.g. --set pretrain.steps=500 (repeatable)")
    parser.add_argument("--name", default=None,
                        help="run name (default: the config's `name`); the same name resumes a run")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the result as JSON to PATH")


def config_from_args(args):
    from srplatform.config import load_config

    path = args.config
    if path is None:
        path = default_config_path()
        print(f"using the default config {DEFAULT_CONFIG} (pass --config to choose another)",
              file=sys.stderr)
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"name={args.name}")
    return load_config(path, overrides)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))


def configure(parser):
    add_training_args(parser)


def run(args):
    from srplatform.train.api import run_pretrain, summary_table

    cfg = config_from_args(args)
    result = run_pretrain(cfg)
    print(summary_table([result]))
    write_json(args.json, result.to_dict())
    return 0 if result.ok else 1
