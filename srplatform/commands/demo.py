"""`c2d demo`: the end-to-end main job on the embedded stack."""

from __future__ import annotations

HELP = "The end-to-end main job on the embedded stack (pack, train, search, promote, upscale, report)"
DESCRIPTION = """\
Runs the whole platform on this machine, with nothing to set up and nothing downloaded:

  1. starts the embedded stack (MLflow tracking server + S3 endpoint on 127.0.0.1)
  2. gathers images: --images DIR, or the photographs that scikit-image ships
  3. packs them into WebDataset shards under $C2D_HOME/shards/<name>
  4. continuous-scale pretraining, then x2/x3/x4 fine-tunes fanned out on Ray Train;
     each fine-tuned model becomes a registered MLflow model version (alias `candidate`)
  5. a small Ray Tune search over the hierarchical-encoding hyperparameters
  6. re-evaluates each candidate against the current champion and promotes the better
  7. upscales a sample image with the champion
  8. prints a summary (bicubic vs model per scale, MACs, time) and writes a Markdown report
     with loss/PSNR plots and a visual comparison to $C2D_HOME/demo/<name>/report.md

Sized for a 2-core laptop (jobs/configs/demo.yaml, under 10 minutes). A second run with
the same --name reuses the shards, finished training stages and the finished search.
Validation uses ../shared/data/Set5 when present (or $C2D_SHARED/data/Set5), else two of the
images are held out.
"""


def configure(parser):
    parser.add_argument("--name", default="demo", help="run name (re-use it to resume / reuse results)")
    parser.add_argument("--images", default="", help="folder of HR training images (default: bundled photographs)")
    parser.add_argument("--config", default="", help="base config (default: jobs/configs/demo.yaml)")
    parser.add_argument("--space", default="", help="search space (default: jobs/spaces/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set pretrain.steps=100)")
    parser.add_argument("--val", default="", help="validation/benchmark folder (default: Set5 if present)")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the Ray Tune step")
    parser.add_argument("--search-trials", type=int, default=2, help="trials of the small search")


def run(args) -> int:
    from srplatform.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(name=args.name, images=args.images, config=args.config,
                                space=args.space, overrides=args.overrides, search=args.search,
                                search_trials=args.search_trials, val=args.val))
