"""`c2d jobs`: list, inspect, follow and stop jobs submitted to a Ray cluster."""

from __future__ import annotations

import os
import sys
import time

HELP = "List, inspect, follow and stop submitted Ray jobs"
DESCRIPTION = """\
Manage jobs on a Ray cluster through the Ray Jobs API (the same cluster address rules as
`c2d submit`: --address > RAY_ADDRESS > RAY_API_SERVER_ADDRESS).

  c2d jobs list                 submitted jobs, newest first
  c2d jobs status ID            status, message, times, entrypoint; the log tail when FAILED
  c2d jobs logs ID [--follow]   the job's output; --follow streams it until the job ends and
                                exits 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED
  c2d jobs stop ID [--wait]     ask the job to stop (SIGTERM, then SIGKILL after a grace period)

Values of secret-looking variables the job received (keys, tokens, passwords) are masked in
everything printed."""


def configure(parser):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", title="actions")
    sub.required = True

    def add(name: str, help_text: str):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--address", metavar="URL",
            help="the cluster's Jobs API, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)",
        )
        return p

    p = add("list", "list submitted jobs, newest first")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="show at most N (0: all)")

    p = add("status", "show a job's status; the log tail when it FAILED")
    p.add_argument("id", metavar="ID", help="submission id")
    p.add_argument("--tail", type=int, default=40, metavar="N", help="log lines shown for a FAILED job")

    p = add("logs", "print a job's logs")
    p.add_argument("id", metavar="ID", help="submission id")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream until the job ends; exit 0 only if it SUCCEEDED")
    p.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines (without --follow)")

    p = add("stop", "stop a running job")
    p.add_argument("id", metavar="ID", help="submission id")
    p.add_argument("--wait", action="store_true", help="wait until the job has ended")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="how long --wait waits")


def run(args) -> int:
    from srplatform import submit as sub

    client = sub.connect(sub.resolve_address(args.address))
    return {"list": _list, "status": _status, "logs": _logs, "stop": _stop}[args.action](sub, client, args)


def _list(sub, client, args) -> int:
    try:
        infos = [i for i in client.list_jobs() if i.submission_id]
    except Exception as exc:
        from srplatform.errors import UserError

        raise UserError(f"cannot list jobs: {sub.explain(exc)}") from None
    if not infos:
        print("no submitted jobs on this cluster")
        return 0
    infos.sort(key=lambda i: i.start_time or 0, reverse=True)
    shown = infos if args.limit <= 0 else infos[: args.limit]
    print(sub.mask(sub.format_table(shown), sub.secret_values(os.environ)))
    if len(shown) < len(infos):
        print(f"({len(infos) - len(shown)} older jobs not shown; --limit 0 shows all)")
    return 0


def _status(sub, client, args) -> int:
    info = sub.job_info(client, args.id)
    secrets = sub.job_secrets(info)
    print(sub.mask(sub.format_status(info), secrets))
    if sub.status_text(info) == "FAILED" and args.tail > 0:
        logs = _get_logs(sub, client, args.id)
        print(f"--- last {args.tail} log lines ---")
        print(sub.mask(sub.log_tail(logs, args.tail), secrets))
    return 0


def _logs(sub, client, args) -> int:
    info = sub.job_info(client, args.id)
    secrets = sub.job_secrets(info)
    if args.follow:
        return sub.follow_to_stdout(client, args.id, secrets)
    logs = _get_logs(sub, client, args.id)
    if args.tail > 0:
        logs = sub.log_tail(logs, args.tail) + "\n"
    sys.stdout.write(sub.mask(logs, secrets))
    return 0


def _get_logs(sub, client, submission_id: str) -> str:
    try:
        return client.get_job_logs(submission_id)
    except Exception as exc:
        from srplatform.errors import UserError

        raise UserError(f"cannot read the logs of {submission_id}: {sub.explain(exc)}") from None


def _stop(sub, client, args) -> int:
    info = sub.job_info(client, args.id)
    status = sub.status_text(info)
    if status in sub.TERMINAL:
        print(f"{args.id} already ended: {status}")
        return 0
    try:
        client.stop_job(args.id)
    except Exception as exc:
        from srplatform.errors import UserError

        raise UserError(f"cannot stop {args.id}: {sub.explain(exc)}") from None
    print(f"stop requested for {args.id} (was {status})")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = sub.status_of(client, args.id)
        if status in sub.TERMINAL:
            print(f"{args.id}: {status}")
            return 0
        time.sleep(1.0)
    print(f"{args.id} still {status} after {args.timeout:g}s", file=sys.stderr)
    return 1
