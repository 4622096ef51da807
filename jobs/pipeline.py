"""`python -m jobs.pipeline ARGS`: exactly `c2d pipeline ARGS` (what `c2d submit pipeline` runs on a cluster)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
