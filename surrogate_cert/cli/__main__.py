"""``python -m surrogate_cert.cli ...`` (as in version 0.1): the same as ``surrogate-cert``."""
import sys

from . import main

sys.exit(main())
