"""Building the command-line parser imports no heavy library, and its torch-free copies of the
choices match the modules that own them (``surrogate_cert/cli/choices.py``)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

from surrogate_cert.cli import choices

HEAVY = ("torch", "scipy", "numpy", "mapie", "sklearn", "matplotlib", "h5py", "torchvision")


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys, json; import surrogate_cert.cli as cli; cli.build_parser(); "
        "import surrogate_cert; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_help_and_argument_errors_import_no_heavy_library():
    # --help exits through argparse, a usage error through OneLineErrorParser: neither runs a command.
    code = (
        "import sys, json, contextlib, io; from surrogate_cert.cli import main; "
        "f = io.StringIO(); "
        "codes = []\n"
        "with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):\n"
        "    codes = [main(['--help']), main(['datagen', '--help']), main(['datagen', '--sigma', 'x']), "
        "main(['calibrate', '--guarantee', 'nope'])]\n"
        f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    codes, loaded = json.loads(out.stdout)
    assert codes == [0, 0, 2, 2]
    assert loaded == []


def test_choice_copies_match_their_source_of_truth():
    for name, (module, attribute) in choices.COPIES.items():
        source = getattr(importlib.import_module(module), attribute)
        assert getattr(choices, name) == source, f"cli/choices.py {name} differs from {module}.{attribute}"
    from surrogate_cert.core.architectures import ARCHITECTURES
    from surrogate_cert.workflows.bench import BENCH_FULL, BENCH_QUICK
    from surrogate_cert.workflows.pipeline import FULL, QUICK

    assert choices.ARCHITECTURES == tuple(sorted(ARCHITECTURES))
    assert choices.QUICKSTART_TEST_LIMIT == FULL.test_limit
    assert choices.QUICKSTART_QUICK_TEST_LIMIT == QUICK.test_limit
    assert choices.BENCH_TEST_LIMIT == BENCH_FULL.test_limit
    assert choices.BENCH_QUICK_TEST_LIMIT == BENCH_QUICK.test_limit


def test_public_stats_module_is_the_core_module_loaded_on_first_use():
    code = (
        "import sys, json; import surrogate_cert as sc; before = 'scipy' in sys.modules; "
        "import surrogate_cert.stats as s; from surrogate_cert.core import stats; "
        "print(json.dumps([before, s is stats, sc.stats is stats]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [False, True, True]
