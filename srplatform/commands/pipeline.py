"""`c2d pipeline`: both C2D stages in one job."""

from __future__ import annotations

from srplatform.commands.pretrain import add_training_args, config_from_args, write_json

HELP = "Both stages in one job: continuous pretraining, then the discrete fine-tuning fan-out"
DESCRIPTION = """\
Runs C2D-ISR end to end: stage 1 (continuous-scale pretraining, as `c2d pretrain`), then
stage 2 from its final model (one discrete fine-tuning run per finetune.scales, concurrently,
as `c2d finetune`). MLflow gets one parent run with a child per stage and scale. Training data
is packed from data.source first when data.train has no manifest.

Re-running with the same --name skips finished stages and resumes unfinished ones from their
latest checkpoints.

  c2d pipeline --config jobs/configs/tiny.yaml
"""


def configure(parser):
    add_training_args(parser)


def run(args):
    from srplatform.train.api import run_pipeline, summary_table

    cfg = config_from_args(args)
    result = run_pipeline(cfg)
    print(summary_table([result.pretrain, *result.finetune.values()]))
    print(f"pipeline {result.name}: {'ok' if result.ok else 'FAILED'} in {result.seconds:.0f}s"
          + (f"; MLflow parent run {result.mlflow_run_id}" if result.mlflow_run_id else ""))
    write_json(args.json, result.to_dict())
    return 0 if result.ok else 1
