"""`python -m jobs.serve ARGS`: `c2d serve ARGS --foreground` (what `c2d submit serve` runs on a
cluster: the job joins the cluster through RAY_ADDRESS, deploys the app and keeps running while
it serves; stopping the job deletes the app)."""

import sys

from srplatform.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:], "--foreground"]))
