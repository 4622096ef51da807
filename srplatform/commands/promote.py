"""`c2d promote`: re-evaluate a registered candidate against the champion and move the alias."""

from __future__ import annotations

import json
import sys

HELP = "Re-evaluate a registered model version against the champion and promote it (MLflow aliases)"
DESCRIPTION = """\
Promotion moves the alias `champion` of a registered model (names look like
c2disr-<arch>-<variant>-x<scale>, e.g. c2disr-swinir_l-c2d-x4) to a better version. Stages are
not used (deprecated in MLflow); the aliases are:
  candidate           the newest registered version (set at registration)
  champion            the version that serves: models:/NAME@champion
  previous-champion   the champion before it (what --rollback restores)

Logged numbers are not trusted: the candidate (--version V, default the alias `candidate`) and the
current champion are both loaded from the registry and evaluated on the benchmark --data (a set
name under ../shared/data or $C2D_SHARED/data, or a folder of HR images) with the standard metric:
PSNR/SSIM on the Y channel, border = scale, LR by MATLAB bicubic. Bicubic upscaling is measured
on the same images and shown beside them. The champion moves only when the candidate's PSNR beats
bicubic's, and beats the champion's strictly and by at least --margin dB. With no champion yet,
the candidate is promoted if it beats bicubic.

  --force --reason "..."   promote regardless of the comparison (the reason is recorded)
  --rollback               restore the previous champion (both are evaluated for the record)

Every decision (promoted, refused, forced, rolled-back) is recorded on the versions involved:
`promotion.*` tags (decision, role, by, at (UTC ISO), data, both versions' PSNR/SSIM, delta,
margin, reason) and one line appended to each version's description; the registered model keeps
the chain of champions in the tag `champion_history` and the last decision as JSON in
`last_decision`. The user is $C2D_USER, else the login name.

Exit status: 0 promoted / forced / rolled back / already champion; 1 refused (the candidate does
not beat bicubic, or the champion by the margin, or does not evaluate); 2 errors (no such model or
version, benchmark not found, tracking server unreachable, the champion cannot be evaluated).

Tracking server: --tracking-uri, else $MLFLOW_TRACKING_URI, else the running local stack
(`c2d stack up`); no server is started for you.

Examples:
  c2d promote c2disr-swinir_l-c2d-x4
  c2d promote c2disr-swinir_l-c2d-x4 --version 7 --data Set14 --margin 0.05
  c2d promote c2disr-swinir_l-c2d-x4 --version 6 --force --reason "better on customer photos"
  c2d promote c2disr-swinir_l-c2d-x4 --rollback
"""


def configure(parser) -> None:
    parser.add_argument("name", metavar="NAME", help="registered model name (c2disr-<arch>-<variant>-x<scale>)")
    parser.add_argument("--version", default=None, help="candidate version (default: the alias `candidate`)")
    parser.add_argument("--data", default="Set5", help="benchmark set name or folder of HR images")
    parser.add_argument("--margin", type=float, default=0.0, help="dB of PSNR the candidate must gain")
    parser.add_argument("--force", action="store_true", help="promote regardless of the comparison (needs --reason)")
    parser.add_argument("--reason", default="", help="why (with --force or --rollback); recorded on the versions")
    parser.add_argument("--rollback", action="store_true", help="restore the previous champion")
    parser.add_argument("--tile", type=int, default=0,
                        help="evaluate in LR tiles of this size (0 = whole images)")
    parser.add_argument("--tracking-uri", default="", help="MLflow server (default: $MLFLOW_TRACKING_URI, then the running local stack)")
    parser.add_argument("--json", action="store_true", help="print the decision as JSON instead of a table")


def run(args) -> int:
    from srplatform import registry
    from srplatform.errors import UserError
    from srplatform.evaluation import model_tracking_uri
    from srplatform.tracking import redact_uri, server_reachable

    if args.rollback and (args.force or args.version is not None):
        raise UserError("--rollback takes no --version or --force")
    registry.http_defaults()
    uri = model_tracking_uri(args.tracking_uri)
    if not server_reachable(uri):
        raise UserError(f"MLflow server {redact_uri(uri)} is not reachable (c2d stack up, or --tracking-uri)")

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    from mlflow.exceptions import MlflowException

    try:
        if args.rollback:
            result = registry.rollback(args.name, data=args.data, reason=args.reason, tracking_uri=uri,
                                       tile=args.tile or None, log=say)
        else:
            result = registry.promote(args.name, version=args.version, data=args.data, margin=args.margin,
                                      force=args.force, reason=args.reason, tracking_uri=uri,
                                      tile=args.tile or None, log=say)
    except MlflowException as exc:
        print(f"c2d promote: error: MLflow ({redact_uri(uri)}): {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(registry.format_result(result))
    return result.exit_code
