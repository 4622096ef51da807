"""`c2d submit`: run a job on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse
import sys

HELP = "Submit a job to a Ray cluster through the Ray Jobs API"
DESCRIPTION = """\
Submit JOB to a Ray cluster. The cluster runs `python -m jobs.JOB [--config REL] [--set k=v ...]
[EXTRA ...]` in an uploaded copy of this project (the job's working_dir, without .venv, .c2d,
.git, benchmarks/results and caches), so a submitted job runs the same code as the same local
`c2d JOB ...` call. Arguments after `--` are passed to the job unchanged.

JOB: pipeline, pretrain, finetune, tune, eval, promote, upscale, serve (`c2d serve ... --foreground`
on the cluster: the job runs while the app serves; `c2d jobs stop ID` deletes the app), or
selfcheck (reports what a job sees on the cluster: config, forwarded variables, GPUs, cluster
resources).

Config: a file inside the project travels with the upload (its relative path is used); a file
outside it is copied into the upload for you. `--config`/`--set` are checked locally first,
so a typo fails before anything is uploaded (skip with --no-validate).

Environment: MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN),
C2D_S3_ENDPOINT_URL, AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION and AWS_DEFAULT_REGION are forwarded to the job when set here
(--no-forward-env turns that off); add more with --env NAME or --env NAME=VALUE. Values are
never printed. Anyone who can reach the cluster's dashboard can read them, which is one reason
the dashboard listens on 127.0.0.1 only (reach it through `ray dashboard ray-cluster.yaml`).

Cluster address: --address > RAY_ADDRESS > RAY_API_SERVER_ADDRESS. Start one with
`ray start --head --dashboard-host=127.0.0.1` (address http://127.0.0.1:8265), or
`ray up ray-cluster.yaml` and then `ray dashboard ray-cluster.yaml` for an SSH tunnel to it.

--gpus/--cpus reserve resources for the job's driver process (what eval and upscale use);
training workers get theirs from the config's `resources` section.

Exit status: 0 when submitted; with --follow, 0 when the job SUCCEEDED, 1 when it FAILED or
was STOPPED.

Examples:
  c2d submit pipeline --config jobs/configs/swinir_l.yaml --address http://127.0.0.1:8265
  c2d submit pretrain --config my.yaml --set pretrain.steps=1000 --follow
  c2d submit eval --gpus 1 -- --model runs:/RUN_ID/model --data Set5 --scales 2,3,4
  c2d submit selfcheck --gpus 1 --follow -- --expect-gpus 1
  c2d submit serve -- models:/c2disr-swinir_l-c2d-x4@champion --host 0.0.0.0 --gpus 1"""


class _DashDashParser(argparse.ArgumentParser):
    """Puts everything after the first `--` into `args.extra`, verbatim (including further
    `--`), instead of letting argparse mix it with JOB and the options."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        extra: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, extra = args[:cut], args[cut + 1 :]
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.extra = extra
        return namespace, rest


def configure(parser):
    from srplatform.submit import JOBS

    parser.__class__ = _DashDashParser
    parser.usage = (
        "c2d submit [options] JOB [--config PATH] [--set KEY=VALUE ...] [-- EXTRA ...]"
    )
    parser.add_argument("job", metavar="JOB", choices=JOBS, help="the job to run: " + ", ".join(JOBS))
    parser.add_argument("--config", metavar="PATH", help="the job's config file (YAML)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override, repeatable (e.g. --set pretrain.steps=1000)",
    )
    parser.add_argument(
        "--address", metavar="URL",
        help="the cluster's Jobs API, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)",
    )
    parser.add_argument("--gpus", type=float, metavar="N", help="GPUs reserved for the job's driver")
    parser.add_argument("--cpus", type=float, metavar="N", help="CPUs reserved for the job's driver")
    parser.add_argument(
        "--submission-id", metavar="ID", help="default: c2d-JOB-YYYYmmdd-HHMMSS-RANDOM"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME[=VALUE]",
        help="also forward this environment variable, repeatable",
    )
    parser.add_argument(
        "--no-forward-env", dest="forward_env", action="store_false",
        help="do not forward the MLflow/S3 variables listed above",
    )
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip the local config check")
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would be submitted; contact no cluster")
    parser.set_defaults(extra=[])


def run(args) -> int:
    from srplatform import submit as sub
    from srplatform.errors import UserError

    if args.validate and (args.config or args.overrides) and args.job != "selfcheck":
        from srplatform.config import load_config

        try:
            load_config(args.config, args.overrides)
        except UserError as exc:
            raise UserError(f"{exc}\n(the config is checked before submitting; --no-validate skips that)") from None

    if args.dry_run:
        try:
            address = sub.resolve_address(args.address)
        except UserError:
            address = sub.Address("(none yet: pass --address or set RAY_ADDRESS)", "")
    else:
        address = sub.resolve_address(args.address)
    plan = sub.plan_submission(
        args.job,
        address=address,
        config=args.config,
        overrides=args.overrides,
        extra=args.extra,
        env=args.env,
        forward_env=args.forward_env,
        num_gpus=args.gpus,
        num_cpus=args.cpus,
        submission_id=args.submission_id,
    )
    if args.dry_run:
        print("dry run, nothing submitted")
        print(sub.describe(plan))
        return 0

    client = sub.connect(address)
    submission_id = sub.submit(client, plan)
    print(sub.describe(plan))
    print(f"submitted {submission_id}")
    if not args.follow:
        print(f"  follow: c2d jobs logs {submission_id} --follow")
        print(f"  status: c2d jobs status {submission_id}")
        print(f"  stop:   c2d jobs stop {submission_id}")
        return 0
    return sub.follow_to_stdout(client, submission_id, plan.secrets)
