"""`python -m jobs.pretrain ARGS`: exactly `c2d pretrain ARGS` (what `c2d submit pretrain` runs on a cluster)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
