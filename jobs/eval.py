"""`python -m jobs.eval ARGS`: exactly `c2d eval ARGS` (what `c2d submit eval` runs on a cluster)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
