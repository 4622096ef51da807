"""The model registry: registered SR model versions, and promotion with MLflow aliases.

Names: one registered model per backbone, variant and scale, `c2disr-<arch>-<variant>-x<scale>`
(e.g. `c2disr-swinir_l-c2d-x4`). Stages are deprecated in MLflow; only aliases are used:

- `candidate`: the newest registered version (set by `register`; promotion leaves it alone);
- `champion`: the version that serves (`models:/NAME@champion`);
- `previous-champion`: the champion before the current one (what `rollback` restores).

The registered model's tag `champion_history` holds the chain of champions, oldest first,
comma-separated (the last entry is the current champion); `rollback` pops it.

`register(...)` tags a new version with its validation metrics (`val.<name>`), `config_hash`,
`manifest_hash`, `source_commit` (`$C2D_SOURCE_COMMIT`, else `git rev-parse HEAD` of this
checkout, else "unknown"), `parent_run_id`, `arch`, `variant`, `scale`, who registered it and
when. Who: `$C2D_USER`, else the login name.

Rollback re-evaluates both versions on the benchmark for the record when the data is at hand;
it never depends on it (a broken champion is a reason to roll back, not to be stuck).

`promote(...)` never trusts logged numbers: it loads the candidate and the champion from the
registry and evaluates both on a benchmark folder with the standard metric (PSNR/SSIM on Y,
border = scale, `c2disr.evaluate.evaluate_folder`). `champion` moves only when the candidate is
strictly better in PSNR and by at least `margin` dB; with no champion yet the candidate is
promoted if it evaluates at all. `force=True` (with a reason) promotes regardless and records
why. Every decision is written on the versions involved: `promotion.*` tags (the latest decision)
and one line appended to each version's description (the history, newest last), plus the
registered model's `last_decision` tag (JSON). Exit codes (`PromotionResult.exit_code`): 0 when
`champion` ends on the candidate (promoted, forced, rolled back, or already champion), 1 when
the candidate was refused; errors raise (the CLI reports them with exit code 2).

Concurrent promotions of the same name are not serialised: run one at a time per name.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from srplatform.errors import UserError

__all__ = [
    "CANDIDATE", "CHAMPION", "PREVIOUS", "HISTORY_TAG",
    "model_name", "parse_model_name", "register", "ensure_registered", "promote", "rollback", "decide",
    "Evaluation", "PromotionResult", "format_result", "benchmark_folder", "source_commit",
]

CANDIDATE = "candidate"
CHAMPION = "champion"
PREVIOUS = "previous-champion"
HISTORY_TAG = "champion_history"
LAST_DECISION_TAG = "last_decision"
_DESCRIPTION_LIMIT = 5000  # MLflow's model version description column
_NAME_RE = re.compile(r"^c2disr-(?P<arch>[a-z0-9_]+)-(?P<variant>[a-z0-9_]+)-x(?P<scale>[1-9][0-9]*)$")
_PART_RE = re.compile(r"^[a-z0-9_]+$")


# ----------------------------------------------------------------------------- names and helpers


def model_name(arch: str, variant: str, scale: int) -> str:
    """`c2disr-<arch>-<variant>-x<scale>`; arch and variant are lower-case words ([a-z0-9_])."""
    for what, value in (("arch", arch), ("variant", variant)):
        if not isinstance(value, str) or not _PART_RE.match(value):
            raise ValueError(f"{what} must be a lower-case name of [a-z0-9_], got {value!r}")
    if isinstance(scale, bool) or int(scale) != scale or int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return f"c2disr-{arch}-{variant}-x{int(scale)}"


def parse_model_name(name: str) -> dict[str, Any] | None:
    """`{"arch", "variant", "scale"}` of a registered model name, or None if it is not ours."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    return {"arch": m["arch"], "variant": m["variant"], "scale": int(m["scale"])}


def source_commit(repo: Path | None = None) -> str:
    """`$C2D_SOURCE_COMMIT` when set (images built by CI, Ray working dirs without .git), else
    `git rev-parse HEAD` of the checkout this code runs from, else "unknown"."""
    if os.environ.get("C2D_SOURCE_COMMIT"):
        return os.environ["C2D_SOURCE_COMMIT"]
    where = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else "unknown"


def http_defaults() -> None:
    """MLflow HTTP limits for the admin commands (promote, upscale), unless the user set them:
    60 s per request and 2 retries. Long enough for a busy server (a promotion is not worth
    failing halfway over a slow response), short of MLflow's defaults (120 s, 7 retries with
    back-off: about 20 minutes before a dead server is noticed). Training uses the stricter
    `srplatform.tracking.configure_http`."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


def _user() -> str:
    for key in ("C2D_USER",):  # an explicit identity (CI, a shared service account)
        if os.environ.get(key):
            return os.environ[key]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a container, no USER variable
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    from srplatform.evaluation import model_tracking_uri

    uri = model_tracking_uri(tracking_uri)  # explicit > $MLFLOW_TRACKING_URI > running local stack
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _not_found(exc) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- register


def _resolve_source(client, model_uri: str) -> tuple[str, str | None, str | None]:
    """(source, run_id, model_id) for a new model version from a model URI."""
    from mlflow.exceptions import MlflowException

    if model_uri.startswith("models:/m-"):
        model_id = model_uri[len("models:/"):].split("/")[0]
        try:
            logged = client.get_logged_model(model_id)
        except MlflowException as exc:
            raise UserError(f"{model_uri}: no such logged model ({exc.message})") from exc
        return model_uri, logged.source_run_id, model_id
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri[len("runs:/"):].partition("/")
        path = path.strip("/") or "model"
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise UserError(f"{model_uri}: no such run ({exc.message})") from exc
        found = [m for m in client.search_logged_models([run.info.experiment_id],
                                                        filter_string=f"name = '{path}'")
                 if m.source_run_id == run_id]
        if not found:
            raise UserError(f"{model_uri}: run {run_id} logged no model named {path!r}")
        newest = max(found, key=lambda m: m.creation_timestamp)
        return f"models:/{newest.model_id}", run_id, newest.model_id
    if model_uri.startswith("models:/"):
        raise UserError(f"{model_uri}: register a logged model (models:/m-...) or runs:/RUN/model, "
                        "not a registered model version")
    return model_uri, None, None


def register(model_uri: str, *, arch: str, variant: str, scale: int, metrics: Mapping[str, float],
             config_hash: str, manifest_hash: str, parent_run_id: str | None,
             tracking_uri: str | None = None):
    """Register the logged model `model_uri` (`models:/m-...` from `log_sr_model`'s ModelInfo,
    or `runs:/RUN/model`) as a new version of `c2disr-<arch>-<variant>-x<scale>`, tagged (see
    the module docstring) and given the alias `candidate`. Returns MLflow's `ModelVersion`
    (`.name`, `.version`)."""
    from mlflow.exceptions import MlflowException

    name = model_name(arch, variant, scale)
    client, _ = _client(tracking_uri)
    source, run_id, model_id = _resolve_source(client, str(model_uri))
    tags: dict[str, str] = {
        "arch": arch, "variant": variant, "scale": str(int(scale)),
        "config_hash": str(config_hash), "manifest_hash": str(manifest_hash),
        "source_commit": source_commit(), "parent_run_id": str(parent_run_id or ""),
        "registered_by": _user(), "registered_at": _now(),
    }
    for key, value in (metrics or {}).items():
        tags[f"val.{key}"] = repr(float(value)) if isinstance(value, (int, float)) else str(value)
    try:
        client.create_registered_model(
            name, tags={"arch": arch, "variant": variant, "scale": str(int(scale))},
            description=f"c2disr {arch} ({variant}) fine-tuned at x{int(scale)}. Aliases: "
                        f"{CANDIDATE} (newest), {CHAMPION} (serving), {PREVIOUS}.")
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    summary = ", ".join(f"{k}={_fmt(v, 4) if isinstance(v, float) else v}" for k, v in (metrics or {}).items())
    mv = client.create_model_version(
        name, source, run_id=run_id, tags=tags, model_id=model_id,
        description=f"{tags['registered_at']} registered by {tags['registered_by']} from run "
                    f"{run_id or '-'} (parent {parent_run_id or '-'}); validation {summary or 'n/a'}.",
    )
    client.set_registered_model_alias(name, CANDIDATE, mv.version)
    return mv


# ----------------------------------------------------------------------------- evaluation


def benchmark_folder(data: str | os.PathLike) -> Path:
    """One benchmark folder: a path, or a set name (`Set5`) under the shared data folder, resolved
    as `c2d eval --data` does (`srplatform.evaluation.resolve_data`)."""
    from srplatform.evaluation import resolve_data

    found = resolve_data(str(data))
    if len(found) != 1:
        raise UserError(f"--data {data!r}: promotion compares on one benchmark set, got {len(found)}")
    return found[0][1]


def _check_images(folder: Path) -> None:
    from c2disr.evaluate import list_images

    try:
        list_images(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"benchmark: {exc}") from exc


@dataclass
class Evaluation:
    """One version measured on the benchmark (psnr/ssim None when it failed: see `error`)."""

    version: str
    run_id: str | None = None
    psnr: float | None = None
    ssim: float | None = None
    images: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.psnr is not None and math.isfinite(self.psnr)


def _measure(version: str, run_id: str | None, make_upscaler: Callable[[], Callable],
             folder: Path, scale: int) -> Evaluation:
    """`make_upscaler()` (LR -> SR) on the benchmark folder; failures become `Evaluation.error`."""
    from c2disr.evaluate import evaluate_folder

    t0 = time.perf_counter()
    try:
        res = evaluate_folder(make_upscaler(), folder, scale)
    except (UserError, ValueError, TypeError, RuntimeError, OSError) as exc:
        return Evaluation(version, run_id, error=f"{type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - t0)
    return Evaluation(version, run_id, psnr=float(res["psnr"]), ssim=float(res["ssim"]),
                      images=int(res["count"]), seconds=time.perf_counter() - t0)


def _evaluate(name: str, version: str, run_id: str | None, folder: Path, scale: int,
              tracking_uri: str, tile: int | None) -> Evaluation:
    from srplatform.mlmodel import load_sr_model
    from srplatform.upscale import sr_forward

    def make() -> Callable:
        model = load_sr_model(f"models:/{name}/{version}", tracking_uri=tracking_uri)
        if not model.continuous and model.scale != scale:
            raise ValueError(f"the model is a x{model.scale} model, the registered name says x{scale}")
        return lambda lr: sr_forward(model, lr, scale=scale, tile=tile)

    return _measure(version, run_id, make, folder, scale)


def _evaluate_bicubic(folder: Path, scale: int) -> Evaluation:
    """The published baseline on the same images and metric (what a model must beat)."""
    from c2disr.ops.resize import imresize

    return _measure("bicubic", None, lambda: (lambda lr: imresize(lr, scale)), folder, scale)


# ----------------------------------------------------------------------------- promotion


@dataclass
class PromotionResult:
    """What `promote` / `rollback` decided.

    decision: "promoted" | "refused" | "forced" | "rolled-back" | "unchanged" (the candidate is
    already the champion; nothing evaluated or recorded).
    """

    name: str
    decision: str
    candidate: Evaluation | None
    champion: Evaluation | None
    champion_before: str | None
    champion_after: str | None
    data: str
    scale: int
    margin: float
    reason: str
    by: str
    at: str
    message: str
    history: list[str] = field(default_factory=list)
    bicubic: Evaluation | None = None

    @property
    def delta_db(self) -> float | None:
        if self.candidate and self.champion and self.candidate.ok and self.champion.ok:
            return self.candidate.psnr - self.champion.psnr
        return None

    @property
    def gain_over_bicubic_db(self) -> float | None:
        if self.candidate and self.bicubic and self.candidate.ok and self.bicubic.ok:
            return self.candidate.psnr - self.bicubic.psnr
        return None

    @property
    def exit_code(self) -> int:
        return 1 if self.decision == "refused" else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["delta_db"] = self.delta_db
        out["gain_over_bicubic_db"] = self.gain_over_bicubic_db
        out["exit_code"] = self.exit_code
        return out


def _version(client, name: str, *, version: str | None = None, alias: str | None = None):
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc) or getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
            return None
        raise


def _history(client, name: str, champion: str | None) -> list[str]:
    rm = client.get_registered_model(name)
    chain = [v for v in (rm.tags.get(HISTORY_TAG) or "").split(",") if v]
    if champion and (not chain or chain[-1] != champion):
        chain.append(champion)  # the alias was moved by hand: adopt it into the chain
    return chain


def _scale_of(name: str, mv) -> int:
    tag = (mv.tags or {}).get("scale")
    if tag and tag.isdigit():
        return int(tag)
    parsed = parse_model_name(name)
    if parsed:
        return parsed["scale"]
    raise UserError(f"{name} v{mv.version}: cannot tell its scale (no 'scale' tag, and the name "
                    "is not c2disr-<arch>-<variant>-x<scale>)")


def _record(client, result: PromotionResult, roles: dict[str, str | None]) -> None:
    """Write the decision on every version involved (tags + a description line) and on the
    registered model (`last_decision`)."""
    cand, champ = result.candidate, result.champion
    record = {
        "decision": result.decision, "by": result.by, "at": result.at, "data": result.data,
        "scale": result.scale, "margin_db": result.margin, "reason": result.reason,
        "candidate": cand.version if cand else None, "champion_before": result.champion_before,
        "champion_after": result.champion_after,
        "candidate_psnr": cand.psnr if cand else None, "candidate_ssim": cand.ssim if cand else None,
        "champion_psnr": champ.psnr if champ else None, "champion_ssim": champ.ssim if champ else None,
        "delta_db": result.delta_db,
        "bicubic_psnr": result.bicubic.psnr if result.bicubic else None,
        "gain_over_bicubic_db": result.gain_over_bicubic_db,
        "candidate_error": cand.error if cand else None, "champion_error": champ.error if champ else None,
    }
    line = f"[{result.at}] {result.by}: {result.message}"
    for version, role in roles.items():
        if not version:
            continue
        mine, other = (cand, champ) if role in ("candidate", "restored") else (champ, cand)
        tags = {
            "promotion.decision": result.decision, "promotion.role": role,
            "promotion.by": result.by, "promotion.at": result.at, "promotion.data": result.data,
            "promotion.margin_db": repr(result.margin),
            "promotion.psnr": _fmt(mine.psnr, 4) if mine else "n/a",
            "promotion.ssim": _fmt(mine.ssim, 6) if mine else "n/a",
            "promotion.other_version": other.version if other else "",
            "promotion.other_psnr": _fmt(other.psnr, 4) if other else "n/a",
            "promotion.other_ssim": _fmt(other.ssim, 6) if other else "n/a",
            "promotion.delta_db": _fmt(result.delta_db, 4),
            "promotion.bicubic_psnr": _fmt(result.bicubic.psnr, 4) if result.bicubic else "n/a",
            "promotion.reason": result.reason or "",
        }
        for key, value in tags.items():
            client.set_model_version_tag(result.name, version, key, value)
        mv = client.get_model_version(result.name, version)
        client.update_model_version(result.name, version, description=_append_line(mv.description or "", line))
    client.set_registered_model_tag(result.name, LAST_DECISION_TAG, json.dumps(record))


def _append_line(description: str, line: str) -> str:
    """Append `line`, dropping the oldest decision lines (never the first, registration line)
    to stay within MLflow's description limit."""
    lines = description.splitlines() + [line]
    while len("\n".join(lines)) > _DESCRIPTION_LIMIT and len(lines) > 2:
        del lines[1]
    return "\n".join(lines)[-_DESCRIPTION_LIMIT:]


def _set_champion(client, name: str, chain: list[str]) -> None:
    client.set_registered_model_alias(name, CHAMPION, chain[-1])
    if len(chain) >= 2:
        client.set_registered_model_alias(name, PREVIOUS, chain[-2])
    else:
        try:
            client.delete_registered_model_alias(name, PREVIOUS)
        except Exception:  # no such alias
            pass
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(chain[-200:]))


def decide(candidate: Evaluation, champion: Evaluation | None, margin: float,
           bicubic: Evaluation | None = None) -> tuple[bool, str]:
    """The promotion rule: (passes, why). The candidate must evaluate and, when `bicubic` is
    given, beat bicubic's PSNR on the same images (an SR model that loses to the baseline is not
    worth serving). No champion: that is all. Otherwise it must also beat the champion's PSNR
    strictly and by at least `margin` dB."""
    if not candidate.ok:
        if champion is None:
            return False, f"no champion yet, but the candidate does not evaluate ({candidate.error})"
        return False, f"the candidate does not evaluate ({candidate.error})"
    if bicubic is not None and bicubic.ok and not candidate.psnr > bicubic.psnr:
        return False, (f"PSNR {candidate.psnr:.2f} dB does not beat bicubic ({bicubic.psnr:.2f} dB, "
                       f"{candidate.psnr - bicubic.psnr:+.3f} dB)")
    vs_bicubic = (f"; {candidate.psnr - bicubic.psnr:+.2f} dB over bicubic"
                  if bicubic is not None and bicubic.ok else "")
    if champion is None:
        return True, "no champion yet; the candidate evaluates" + vs_bicubic
    delta = candidate.psnr - champion.psnr
    passed = delta > 0 and delta >= margin
    why = (f"PSNR {candidate.psnr:.2f} vs {champion.psnr:.2f} dB: {delta:+.3f} dB "
           f"{'>=' if passed else '<'} margin {margin:.2f} dB")
    if not passed and delta <= 0 and margin <= 0:
        why += " (not better)"
    return passed, why + vs_bicubic


def promote(name: str, *, version: str | int | None = None, data: str = "Set5", margin: float = 0.0,
            force: bool = False, reason: str = "", tracking_uri: str | None = None,
            tile: int | None = None, log: Callable[[str], None] | None = None) -> PromotionResult:
    """Re-evaluate the candidate (`version`, default alias `candidate`) and the champion on
    `data` and move `champion` when the rule in the module docstring allows it.

    Raises UserError for a missing model/version/benchmark, a bad margin, `force` without a
    reason, or a champion that cannot be evaluated (unless `force`)."""
    if not math.isfinite(margin) or margin < 0:
        raise UserError(f"--margin must be a finite number of dB >= 0, got {margin}")
    if force and not reason.strip():
        raise UserError("--force needs --reason \"why\" (it is recorded on the versions)")
    if reason and not force:
        raise UserError("--reason goes with --force (a normal promotion is decided by the evaluation)")
    say = log or (lambda msg: None)
    client, uri = _client(tracking_uri)
    _require_model(client, name)
    cand_mv = _version(client, name, version=version) if version is not None else _version(client, name, alias=CANDIDATE)
    if cand_mv is None:
        what = f"version {version}" if version is not None else f"alias '{CANDIDATE}'"
        raise UserError(f"{name}: no {what}; register a model first (or pass --version)")
    champ_mv = _version(client, name, alias=CHAMPION)
    scale = _scale_of(name, cand_mv)
    cand_v = str(cand_mv.version)
    champ_v = str(champ_mv.version) if champ_mv else None
    chain = _history(client, name, champ_v)
    base = dict(name=name, champion_before=champ_v, data=str(data), scale=scale, margin=float(margin),
                reason=reason.strip(), by=_user(), at=_now())
    if champ_v == cand_v:
        return PromotionResult(decision="unchanged", candidate=Evaluation(cand_v, cand_mv.run_id),
                               champion=Evaluation(champ_v, champ_mv.run_id),
                               champion_after=champ_v, history=chain,
                               message=f"v{cand_v} is already the {CHAMPION}; nothing to do", **base)
    folder = benchmark_folder(data)
    _check_images(folder)
    say(f"evaluating candidate v{cand_v} on {folder} (x{scale}) ...")
    cand = _evaluate(name, cand_v, cand_mv.run_id, folder, scale, uri, tile)
    champ = None
    if champ_mv is not None:
        say(f"evaluating champion v{champ_v} on {folder} (x{scale}) ...")
        champ = _evaluate(name, champ_v, champ_mv.run_id, folder, scale, uri, tile)
        if not champ.ok and not force:
            raise UserError(
                f"{name}: the champion v{champ_v} could not be evaluated ({champ.error}); the "
                "candidate cannot be compared. Fix it, or use --force --reason \"...\"")
    bicubic = _evaluate_bicubic(folder, scale)
    passed, why = decide(cand, champ, margin, bicubic)
    if force:
        if not cand.ok:
            raise UserError(f"{name}: v{cand_v} does not evaluate ({cand.error}); a model that cannot "
                            "run on the benchmark is not promoted, even with --force")
        decision = "forced"
        why = f"forced ({reason.strip()}); on its own: {'would pass' if passed else 'would be refused'}: {why}"
    else:
        decision = "promoted" if passed else "refused"
    if decision in ("promoted", "forced"):
        chain = [v for v in chain if v != cand_v] + [cand_v]
        _set_champion(client, name, chain)
        after = cand_v
        message = (f"{decision} v{cand_v} to {CHAMPION} on {data} x{scale} "
                   f"(was {('v' + champ_v) if champ_v else 'none'}): {why}")
    else:
        after = champ_v
        stays = f"champion stays v{champ_v}" if champ_v else f"still no {CHAMPION}"
        message = f"refused v{cand_v} on {data} x{scale} ({stays}): {why}"
    result = PromotionResult(decision=decision, candidate=cand, champion=champ, champion_after=after,
                             history=chain, message=message, bicubic=bicubic, **base)
    _record(client, result, {cand_v: "candidate", champ_v: "champion"})
    return result


def rollback(name: str, *, data: str | None = "Set5", reason: str = "", tracking_uri: str | None = None,
             tile: int | None = None, log: Callable[[str], None] | None = None) -> PromotionResult:
    """Restore the previous champion (`champion_history`), recording it on both versions.

    Both versions are re-evaluated on `data` for the record (failures are recorded, they do not
    block a rollback; `data=None` skips the evaluation)."""
    say = log or (lambda msg: None)
    client, uri = _client(tracking_uri)
    _require_model(client, name)
    champ_mv = _version(client, name, alias=CHAMPION)
    if champ_mv is None:
        raise UserError(f"{name}: there is no {CHAMPION} to roll back")
    current = str(champ_mv.version)
    chain = _history(client, name, current)
    if len(chain) < 2:
        raise UserError(f"{name}: v{current} is the first {CHAMPION}; there is no previous one to restore")
    restored = chain[-2]
    restored_mv = _version(client, name, version=restored)
    if restored_mv is None:
        raise UserError(f"{name}: the previous champion v{restored} no longer exists")
    scale = _scale_of(name, champ_mv)
    cand = Evaluation(restored, restored_mv.run_id)
    champ = Evaluation(current, champ_mv.run_id)
    if data is not None:
        try:  # a rollback must not depend on the benchmark data being at hand
            folder = benchmark_folder(data)
            _check_images(folder)
        except UserError as exc:
            say(f"not evaluating for the record: {exc}")
            cand.error = champ.error = f"not evaluated: {exc}"
        else:
            say(f"evaluating v{restored} and v{current} on {folder} for the record ...")
            cand = _evaluate(name, restored, restored_mv.run_id, folder, scale, uri, tile)
            champ = _evaluate(name, current, champ_mv.run_id, folder, scale, uri, tile)
    chain = chain[:-1]
    _set_champion(client, name, chain)
    result = PromotionResult(
        name=name, decision="rolled-back", candidate=cand, champion=champ, champion_before=current,
        champion_after=restored, data=str(data or "-"), scale=scale, margin=0.0, reason=reason.strip(),
        by=_user(), at=_now(), history=chain,
        message=(f"rolled back {CHAMPION} v{current} -> v{restored}"
                 + (f" ({reason.strip()})" if reason.strip() else "")
                 + (f"; {data}: v{restored} {_fmt(cand.psnr)} dB, v{current} {_fmt(champ.psnr)} dB"
                    if data is not None else "")))
    _record(client, result, {restored: "restored", current: "demoted"})
    return result


def _require_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            raise UserError(f"no registered model named {name!r} (names look like "
                            "c2disr-<arch>-<variant>-x<scale>)") from exc
        raise


# ----------------------------------------------------------------------------- output


def format_result(r: PromotionResult) -> str:
    """The decision as a small table, for people."""
    rows = [("role", "version", "run", "PSNR (dB)", "SSIM", "images", "note")]
    if r.decision == "rolled-back":
        pairs = (("restored", r.candidate), ("demoted", r.champion))
    else:
        pairs = (("candidate", r.candidate), ("champion", r.champion))
    for role, ev in pairs:
        if ev is None:
            rows.append((role, "-", "-", "-", "-", "-", "none yet" if role == "champion" else ""))
            continue
        note = (ev.error or "")[:60]
        if r.decision == "unchanged":
            note = "not evaluated: already the champion"
        rows.append((role, f"v{ev.version}", (ev.run_id or "-")[:8], _fmt(ev.psnr), _fmt(ev.ssim, 4),
                     str(ev.images or "-"), note))
    if r.bicubic is not None:
        b = r.bicubic
        rows.append(("bicubic", "-", "-", _fmt(b.psnr), _fmt(b.ssim, 4), str(b.images or "-"),
                     (b.error or "the baseline a model must beat")[:60]))
    if r.delta_db is not None:
        dssim = r.candidate.ssim - r.champion.ssim
        rows.append(("delta", "", "", f"{r.delta_db:+.2f}", f"{dssim:+.4f}", "", f"margin {r.margin:.2f} dB"))
    if r.gain_over_bicubic_db is not None:
        rows.append(("gain", "", "", f"{r.gain_over_bicubic_db:+.2f}",
                     f"{r.candidate.ssim - r.bicubic.ssim:+.4f}", "", "candidate over bicubic"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{r.name}  (benchmark {r.data}, x{r.scale}, PSNR/SSIM on Y, border {r.scale})"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"decision: {r.decision.upper()}: {r.message}")
    lines.append(f"champion: {('v' + r.champion_before) if r.champion_before else 'none'} -> "
                 f"{('v' + r.champion_after) if r.champion_after else 'none'}   "
                 f"(history {' > '.join('v' + v for v in r.history) or '-'}; by {r.by} at {r.at})")
    return "\n".join(lines)


def ensure_registered(run_id: str, *, arch: str, variant: str, scale: int, metrics: Mapping[str, float],
                      config_hash: str, manifest_hash: str, parent_run_id: str | None,
                      tracking_uri: str | None = None):
    """Register the model that fine-tuning run `run_id` logged (`runs:/RUN/model`), unless a
    version from that run already exists under the same name; returns the ModelVersion.

    Idempotent, so re-running a finished pipeline never adds duplicate versions."""
    name = model_name(arch, variant, scale)
    client, _ = _client(tracking_uri)
    try:
        existing = [mv for mv in client.search_model_versions(f"name = '{name}'") if mv.run_id == run_id]
    except Exception:  # noqa: BLE001 - no registered model of that name yet
        existing = []
    if existing:
        return max(existing, key=lambda mv: int(mv.version))
    return register(f"runs:/{run_id}/model", arch=arch, variant=variant, scale=scale, metrics=metrics,
                    config_hash=config_hash, manifest_hash=manifest_hash, parent_run_id=parent_run_id,
                    tracking_uri=tracking_uri)
