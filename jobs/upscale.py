"""`python -m jobs.upscale ARGS`: exactly `c2d upscale ARGS` (what `c2d submit upscale` runs on a cluster)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["upscale", *sys.argv[1:]]))
