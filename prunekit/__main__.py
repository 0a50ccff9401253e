"""``python -m prunekit``: the ``prunekit`` command, also as torchrun launches it
(``torchrun --nproc-per-node 2 -m prunekit prune ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
