"""``python -m surrogate_cert ...``: the same as the ``surrogate-cert`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a worker process imports it (multiprocessing's spawn)
    sys.exit(main())
