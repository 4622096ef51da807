"""`python -m jobs.selfcheck [--config PATH] [--expect-env NAME] [--expect-gpus N]`: report what
a job sees on the cluster (config, forwarded variables, GPUs, Ray resources); exit 1 when an
expectation fails. Submit it with `c2d submit selfcheck ... -- --expect-gpus 1`."""

import sys

from srplatform.submit import selfcheck_main

if __name__ == "__main__":
    sys.exit(selfcheck_main(sys.argv[1:]))
