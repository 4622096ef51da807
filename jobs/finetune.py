"""`python -m jobs.finetune ARGS`: exactly `c2d finetune ARGS` (what `c2d submit finetune` runs on a cluster)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
