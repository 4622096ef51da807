"""`c2d stack up | status | down | env`: the embedded local stack."""

from __future__ import annotations

import json
import os
import sys

HELP = "Start, stop and inspect the embedded local stack (MLflow server, S3 endpoint)"
DESCRIPTION = """\
The embedded local stack, the default when no cluster is named:
  - an MLflow tracking server (SQLite backend, model registry, artifacts on local disk)
  - an S3-compatible endpoint (moto server mode, signed requests enforced, bucket `c2disr`)
Both bind to 127.0.0.1 on free ports. State (URLs, pids, S3 keys) lives in
$C2D_HOME/stack.json (default ./.c2d, mode 0600). Ray is started by the jobs themselves
(local `ray.init`) or taken from RAY_ADDRESS.

  c2d stack up        start (or confirm) the stack
  c2d stack status    URLs and health; exits 1 when a server crashed
  c2d stack down      stop exactly the processes `up` started
  c2d stack env       shell exports for other tools (secrets included: keep private)
"""


def configure(parser):
    sub = parser.add_subparsers(dest="stack_cmd", metavar="ACTION", required=True)
    fmt = parser.formatter_class
    up = sub.add_parser(
        "up", help="start the MLflow server and the S3 endpoint", formatter_class=fmt,
        description=(
            "Start the embedded stack on this machine: an MLflow tracking server (SQLite backend\n"
            "and model registry in $C2D_HOME/mlflow.db, artifacts under $C2D_HOME/mlartifacts)\n"
            "and an S3-compatible endpoint (moto, signed requests, bucket `c2disr`, fresh keys).\n"
            "Both bind to free loopback ports unless told otherwise. When the stack is already\n"
            "up and healthy, nothing is started: its status is printed. Stop it with\n"
            "`c2d stack down`."))
    up.add_argument("--no-s3", action="store_true", help="start only MLflow")
    up.add_argument("--host", default="127.0.0.1",
                    help="address to bind (loopback by default; anything else is reachable from other machines)")
    up.add_argument("--mlflow-port", type=int, default=None, help="default: a free port")
    up.add_argument("--s3-port", type=int, default=None, help="default: a free port")
    sub.add_parser(
        "status", help="show URLs and health", formatter_class=fmt,
        description=(
            "Show the data folder, each server's URL, process id and health, the S3 bucket and\n"
            "key (the secret is not shown) and which Ray jobs will use. Exit status: 0 when every\n"
            "server answers, 1 when the stack is not up or a server crashed (its log's last\n"
            "lines are printed)."),
    ).add_argument("--json", action="store_true", help="machine-readable output (secrets masked)")
    sub.add_parser(
        "down", help="stop the stack", formatter_class=fmt,
        description=(
            "Stop exactly the processes `c2d stack up` started (recorded in\n"
            "$C2D_HOME/stack.json); data in $C2D_HOME (MLflow runs, registry, shards) is kept.\n"
            "S3 objects live in moto's memory and go with it."))
    sub.add_parser(
        "env", help="print shell exports (MLFLOW_TRACKING_URI, C2D_S3_ENDPOINT_URL, AWS keys)",
        formatter_class=fmt,
        description=(
            "Print `export` lines for other tools (mlflow, aws, boto3, a notebook):\n"
            "MLFLOW_TRACKING_URI, C2D_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY\n"
            "and AWS_REGION of the running stack. The secret key is included: keep the output\n"
            "private. Use it as:  eval \"$(c2d stack env)\""))


def run(args) -> int:
    from srplatform import stack

    if args.stack_cmd == "up":
        state = stack.up(host=args.host, s3=not args.no_s3,
                         mlflow_port=args.mlflow_port, s3_port=args.s3_port)
        _print_status(stack, state)
        return 0
    if args.stack_cmd == "down":
        stack.down()
        return 0
    state = stack.read_state()
    if args.stack_cmd == "env":
        if not state:
            print("stack is not up: run `c2d stack up`", file=sys.stderr)
            return 1
        print(f"export MLFLOW_TRACKING_URI={state['mlflow']['tracking_uri']}")
        if "s3" in state:
            s = state["s3"]
            print(f"export C2D_S3_ENDPOINT_URL={s['endpoint_url']}")
            print(f"export AWS_ACCESS_KEY_ID={s['access_key']}")
            print(f"export AWS_SECRET_ACCESS_KEY={s['secret_key']}")
            print(f"export AWS_REGION={s['region']}")
        return 0
    # status
    if not state:
        print("stack is not up (no state in %s)" % stack.state_path(), file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        statuses = stack.check(state)
        out = {st.name: {"url": st.url, "pid": st.pid, "state": st.state} for st in statuses}
        print(json.dumps(out, indent=2))
        return 0 if all(st.healthy for st in statuses) else 1
    return _print_status(stack, state)


def _print_status(stack, state) -> int:
    statuses = stack.check(state)
    print(f"data dir: {state['root']}")
    for st in statuses:
        print(f"  {st.name:<7} {st.state:<9} {st.url}  (pid {st.pid})")
        if not st.healthy:
            print(f"    last lines of {st.log}:")
            for line in stack._log_tail(st.log).splitlines():
                print(f"      {line}")
    if "s3" in state:
        s = state["s3"]
        print(f"  bucket  s3://{s['bucket']}  key {stack.masked(s['access_key'])} (secret not shown; `c2d stack env`)")
    ray = os.environ.get("RAY_ADDRESS")
    print(f"  ray     {ray or 'local ray.init() per job (set RAY_ADDRESS to use a cluster)'}")
    return 0 if all(st.healthy for st in statuses) else 1
