"""``python -m surrogate_cert ...``: the same as the ``surrogate-cert`` command."""
import sys

from .cli import main

sys.exit(main())
