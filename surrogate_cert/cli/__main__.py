"""``python -m surrogate_cert.cli ...`` (as in version 0.1): the same as ``surrogate-cert``."""

import sys

from . import main

if __name__ == "__main__":  # not when a worker process imports it (multiprocessing's spawn)
    sys.exit(main())
