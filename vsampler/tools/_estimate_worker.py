"""`python -m vsampler.tools._estimate_worker DIR [--no-profile]`: the compile worker of
`vsampler.tools.estimate.ProfileWorker` (libtpu's static profile flag, pointing at DIR, is set in its
environment before libtpu loads; `--no-profile`: it is not, and the answers hold no cycles)."""

import sys

from vsampler.tools.estimate import run_worker

if __name__ == "__main__":
    run_worker(sys.argv[1], sys.stdin, sys.stdout, profile="--no-profile" not in sys.argv[2:])
