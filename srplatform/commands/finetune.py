"""`c2d finetune`: stage 2, one discrete fine-tuning run per scale, fanned out on Ray Train."""

from __future__ import annotations

from srplatform.commands.pretrain import add_training_args, config_from_args, write_json

HELP = "Stage 2: discrete-scale fine-tuning per scale from a stage-1 model, fanned out on Ray Train"
DESCRIPTION = """\
Stage 2 of C2D-ISR: for each scale, the stage-1 backbone gets a fresh pixel-shuffle head and is
fine-tuned at that scale. Every scale is its own Ray Train run (own storage folder
<storage>/<name>/finetune-x<s>, own MLflow child run under one parent); all start at once
and share the cluster. A failed scale is reported with its error; the others still finish.
Each fine-tuned model is logged as an MLflow model (artifact `model`) for the registry.

--from takes the stage-1 weights as
  - a model file or checkpoint directory (path, file:// or s3:// URI), or a run folder such as
    $C2D_HOME/runs/NAME/pretrain (its newest checkpoint);
  - runs:/RUN_ID or a bare MLflow run id (the run's final checkpoint), runs:/RUN_ID/PATH or
    models:/NAME/VERSION.

  c2d finetune --from runs:/0123abcd... --scales 2,4 --name trial1
"""


def _scales(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales must look like 2,3,4, got {text!r}") from None
    if not values or any(v not in (2, 3, 4) for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"--scales takes distinct values from 2, 3, 4, got {text!r}")
    return values


def configure(parser):
    parser.add_argument("--from", dest="init_from", required=True, metavar="SOURCE",
                        help="stage-1 weights: checkpoint/model URI, runs:/RUN_ID or an MLflow run id")
    parser.add_argument("--scales", type=_scales, default=None,
                        help="comma-separated scales (default: the config's finetune.scales)")
    add_training_args(parser)


def run(args):
    from srplatform.train.api import resolve_init, run_finetune, summary_table

    cfg = config_from_args(args)
    init = resolve_init(args.init_from, cfg)
    results = run_finetune(cfg, init, args.scales or list(cfg.finetune.scales))
    print(summary_table(list(results.values())))
    write_json(args.json, {str(s): r.to_dict() for s, r in results.items()})
    return 0 if all(r.ok for r in results.values()) else 1
