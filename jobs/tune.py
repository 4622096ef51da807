"""`python -m jobs.tune ARGS`: exactly `c2d tune ARGS` (what `c2d submit tune` runs on a cluster)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
