"""The values the argument definitions need, without importing the modules that own them.

``surrogate-cert --help`` and a one-line argument error must answer in well under a second, so
building the parser imports no torch, SciPy, MAPIE or matplotlib: those load when a command runs.
Each name below copies a constant of a heavy module (named beside it); the owning module stays the
source of truth and ``tests/test_cli_imports_are_lazy.py`` fails when a copy drifts from it. When
you add a choice there (a noise scheme, a guarantee, ...), add it here too.
"""

from __future__ import annotations

SPLITS = ("train", "surrogate", "cal", "test")
"""``data_gen.datasets.SPLITS``."""

ALL_SPLITS = SPLITS + ("pool",)
"""``data_gen.datasets.ALL_SPLITS``."""

DATASET_HELP = (
    "digits, mnist, cifar10, cifar100, imagefolder:PATH or npz:PATH; unlabeled pools (split pool): "
    "npz:PATH without y, images:FOLDER"
)
"""``data_gen.datasets.DATASET_HELP``."""

ARCHITECTURES = ("mlp", "resnet18", "small_cnn")
"""``sorted(core.architectures.ARCHITECTURES)``."""

NOISE_SCHEMES = (
    "torch-generator-block256-v1",
    "torch-generator-block256-v2",
    "philox4x32-block256-v3",
    "rounded-gaussian-grid255-v1",
)
"""``core.smoothing.NOISE_SCHEMES``."""

NOISE_SCHEME_SOUND = "rounded-gaussian-grid255-v1"
"""``core.smoothing.NOISE_SCHEME_SOUND``."""

NOISE_ALIASES = {"sound": NOISE_SCHEME_SOUND, "float": "torch-generator-block256-v2"}
"""``core.smoothing.NOISE_ALIASES``."""

NOISE_SCHEME = "torch-generator-block256-v2"
"""``core.smoothing.NOISE_SCHEME``: the scheme new files use."""

GUARANTEES = ("marginal", "pac", "issued")
"""``calibration.conformal.GUARANTEES``."""

CALIBRATION_METHODS = ("conformal", "ltt")
"""``calibration.conformal.METHODS``."""

SCORES = ("residual", "shifted", "shaped")
"""``calibration.conformal.SCORES``."""

SHIFT_BINS = 8
"""``calibration.conformal.SHIFT_BINS``."""

TUNE_SHARE = 0.5
"""``calibration.conformal.TUNE_SHARE``."""

GROUPINGS = ("none", "class", "confidence")
"""``core.one_pass.GROUPINGS``."""

DETERMINISTIC_METHODS = ("ibp", "crown")
"""``core.deterministic.METHODS``."""

TOPUP_RULES = ("all-agree",)
"""``data_gen.generate.TOPUP_RULES``."""

QUICKSTART_TEST_LIMIT = 100
"""``workflows.pipeline.FULL.test_limit``."""

QUICKSTART_QUICK_TEST_LIMIT = 20
"""``workflows.pipeline.QUICK.test_limit``."""

BENCH_TEST_LIMIT = 100
"""``workflows.bench.BENCH_FULL.test_limit``."""

BENCH_QUICK_TEST_LIMIT = 10
"""``workflows.bench.BENCH_QUICK.test_limit``."""

COPIES = {
    "SPLITS": ("data_gen.datasets", "SPLITS"),
    "DATASET_HELP": ("data_gen.datasets", "DATASET_HELP"),
    "ALL_SPLITS": ("data_gen.datasets", "ALL_SPLITS"),
    "NOISE_SCHEMES": ("surrogate_cert.core.smoothing", "NOISE_SCHEMES"),
    "NOISE_SCHEME": ("surrogate_cert.core.smoothing", "NOISE_SCHEME"),
    "NOISE_SCHEME_SOUND": ("surrogate_cert.core.smoothing", "NOISE_SCHEME_SOUND"),
    "NOISE_ALIASES": ("surrogate_cert.core.smoothing", "NOISE_ALIASES"),
    "GUARANTEES": ("calibration.conformal", "GUARANTEES"),
    "CALIBRATION_METHODS": ("calibration.conformal", "METHODS"),
    "SCORES": ("calibration.conformal", "SCORES"),
    "SHIFT_BINS": ("calibration.conformal", "SHIFT_BINS"),
    "TUNE_SHARE": ("calibration.conformal", "TUNE_SHARE"),
    "GROUPINGS": ("surrogate_cert.core.one_pass", "GROUPINGS"),
    "DETERMINISTIC_METHODS": ("surrogate_cert.core.deterministic", "METHODS"),
    "TOPUP_RULES": ("data_gen.generate", "TOPUP_RULES"),
}
"""Name here -> (module, name) of its source of truth; the test compares them (and the others below)."""
