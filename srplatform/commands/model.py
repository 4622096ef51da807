"""`c2d model`: what an architecture config costs (parameters, MACs) and which models exist."""

from __future__ import annotations

import json

from srplatform.errors import UserError

HELP = "Model information: parameters and MACs for any architecture config; list the registry"
DESCRIPTION = """\
Parameters and MACs of one architecture configuration, at the papers' convention: MACs of one
forward producing a 1280x720 image (LR 640x360 at x2, 427x240 at x3, 320x180 at x4), counted by
torch's FlopCounterMode on the meta device (nothing is allocated).

Examples:
  c2d model list
  c2d model info --arch swinir_l --variant c2d --scale 4
  c2d model info --arch srformer_l --variant hit --scale 2 --set window=8 --set depths=[6,6]
  c2d model info --arch swinir_l --head continuous --scale 3.3 --set head.width=128

--set key=value overrides a backbone config field (values are YAML: 8, 2.5, [6,6], true);
--set head.key=value overrides a continuous-head field. Unknown keys are rejected."""


def configure(parser):
    fmt = parser.formatter_class  # keeps the example lines as written (no re-wrapping)
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND", title="subcommands")
    info = sub.add_parser("info", help="parameters and MACs of one configuration", description=DESCRIPTION,
                          formatter_class=fmt)
    info.add_argument("--arch", required=True, help="architecture (see `c2d model list`)")
    info.add_argument("--variant", default="plain", help="plain | hit | c2d")
    info.add_argument("--flavor", default="light", help="light (published size) | tiny")
    info.add_argument("--head", default="discrete", help="discrete (pixelshuffledirect) | continuous")
    info.add_argument(
        "--scale", default="4", help="upscaling factor: integer for discrete heads; any number >= 1 for continuous"
    )
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    lst = sub.add_parser("list", help="architectures, variants, flavors and heads in the registry",
                         description="List the architectures, variants, flavors and heads that "
                                     "`c2d model info` and the training configs accept.",
                         formatter_class=fmt)
    lst.add_argument("--json", action="store_true", help="print JSON")
    imp = sub.add_parser(
        "import", help="convert an official checkpoint into a c2disr model file",
        description="Load an official light-model checkpoint (SwinIR-S, SRFormer-light, MambaIRv2-light,\n"
                    "HiT-SR; keys under `params_ema` or `params`) with a strict key mapping and\n"
                    "weights_only=True, and save it as a c2disr model file that `c2d eval`, `c2d upscale`\n"
                    "and `c2d finetune --from` accept.\n\nExamples:\n  c2d model import --arch mambairv2_l --scale 2 "
                    "mambairv2_lightSR_x2.pth mambairv2_x2.pt\n  c2d eval --model mambairv2_x2.pt --data Set5 --scales 2",
        formatter_class=fmt)
    imp.add_argument("checkpoint", help="the official .pth file")
    imp.add_argument("output", help="where to write the c2disr model file (.pt)")
    imp.add_argument("--arch", required=True, help="architecture (see `c2d model list`)")
    imp.add_argument("--variant", default="plain", help="plain (SwinIR/SRFormer/MambaIRv2) | hit (HiT-SR)")
    imp.add_argument("--scale", type=int, required=True, help="the checkpoint's scale (2, 3 or 4)")


def parse_sets(items: list[str]) -> tuple[dict, dict]:
    """`["window=8", "head.width=64"]` -> (backbone overrides, head overrides); values are YAML."""
    import yaml

    backbone, head = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set window=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        if key.startswith("head."):
            head[key[len("head."):]] = value
        else:
            backbone[key] = value
    return backbone, head


def _scale(raw: str, head: str):
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"--scale {raw!r} is not a number") from None
    if value < 1:
        raise UserError(f"--scale must be >= 1, got {raw}")
    if head == "discrete":
        if not value.is_integer():
            raise UserError(f"--scale {raw}: a discrete head needs an integer scale (use --head continuous)")
        return int(value)
    return value


def info(args) -> dict:
    from c2disr.complexity import OUTPUT_HW, count_macs, count_params, lr_size_for_output
    from c2disr.models import build_model

    scale = _scale(args.scale, args.head)
    overrides, head_overrides = parse_sets(args.set)
    import torch

    try:
        with torch.device("meta"):
            model = build_model(
                args.arch,
                variant=args.variant,
                flavor=args.flavor,
                head=args.head,
                scale=int(scale) if args.head == "discrete" else 4,
                overrides=overrides,
                head_overrides=head_overrides,
            )
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    lr_hw = lr_size_for_output(scale)
    out_size = OUTPUT_HW if args.head == "continuous" else None
    macs = count_macs(model, lr_hw, out_size=out_size)
    return {
        "arch": args.arch,
        "variant": args.variant,
        "flavor": args.flavor,
        "head": args.head,
        "scale": scale,
        "overrides": overrides,
        "head_overrides": head_overrides,
        "params": count_params(model),
        "params_backbone": count_params(model.backbone),
        "params_head": count_params(model.head),
        "lr_hw": list(lr_hw),
        "out_hw": list(out_size or (lr_hw[0] * int(scale), lr_hw[1] * int(scale))),
        "macs": macs,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(model.backbone_config).items()},
    }


def run(args):
    if args.model_command == "list":
        from c2disr.models import ARCHS, FLAVORS, HEADS, VARIANTS

        listing = {"archs": sorted(ARCHS), "variants": list(VARIANTS), "flavors": list(FLAVORS), "heads": list(HEADS)}
        if args.json:
            print(json.dumps(listing, indent=2))
        else:
            print("architectures: " + ", ".join(listing["archs"]))
            print("variants:      " + ", ".join(listing["variants"]) + "   (plain = published; hit = HiT-SR; c2d = C2D)")
            print("flavors:       " + ", ".join(listing["flavors"]) + "   (light = published size; tiny = tests/CPU)")
            print("heads:         " + ", ".join(listing["heads"]) + "   (discrete = pixelshuffledirect; continuous = HIIF-L)")
        return 0
    if args.model_command == "import":
        return _import(args)
    if args.model_command != "info":
        raise UserError("choose a subcommand: `c2d model info ...`, `c2d model list` or `c2d model import ...`")
    result = info(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['arch']}  variant={result['variant']}  flavor={result['flavor']}  "
        f"head={result['head']}  scale=x{result['scale']}"
    )
    if result["overrides"] or result["head_overrides"]:
        print(f"overrides: {result['overrides']}  head overrides: {result['head_overrides']}")
    print(
        f"params: {result['params']:,}  (backbone {result['params_backbone']:,}, head {result['params_head']:,})"
    )
    h, w = result["lr_hw"]
    oh, ow = result["out_hw"]
    print(f"MACs:   {result['macs'] / 1e9:.2f} G  (one forward, LR {w}x{h} -> {ow}x{oh})")
    return 0


def _import(args) -> int:
    from pathlib import Path

    from c2disr.evaluate import save_model
    from c2disr.models import build_model
    from c2disr.models.checkpoints import load_published

    src = Path(args.checkpoint)
    if not src.is_file():
        raise UserError(f"{src}: no such checkpoint file")
    model = build_model(args.arch, variant=args.variant, flavor="light", head="discrete", scale=args.scale)
    try:
        load_published(model, src)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"{src} does not match {args.arch} ({args.variant}) x{args.scale}: {exc}") from None
    out = save_model(args.output, model)
    print(f"{src} -> {out}  ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
