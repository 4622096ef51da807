"""`python -m jobs.promote ARGS`: exactly `c2d promote ARGS` (what `c2d submit promote` runs on a cluster)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
