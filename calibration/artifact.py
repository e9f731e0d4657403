"""The calibration artifact, ``calibration.json``: the offsets ``q^`` and everything they depend on.

A calibration is only valid for the surrogate, noise level and class count it was computed for,
so the file binds them, and ``load_calibration`` refuses another surrogate, sigma or class count.
It also refuses, with a ``CalibrationError`` naming the problem:

- a file of another kind (an HDF5 counts file, a checkpoint, text that is not JSON);
- a file whose content no longer matches its checksum (``checksum_sha256``: an unkeyed SHA-256,
  which detects accidental change, a truncated copy or an edit by hand, but not a forger, who can
  recompute it);
- a file that contradicts itself: a missing field, a non-number or NaN where a number belongs,
  ``epsilon`` outside (0, 0.5), an offset below the smallest score a calibration can produce, a
  ``radius_cap`` other than ``stats.max_radius(n_cal, alpha_mc, sigma)``, a finite ``q^`` from
  fewer points than ``epsilon`` needs, group keys or bin edges that do not fit ``groups``;
- with a signing key configured (``core.signing``: ``--key-file``, ``SURROGATE_CERT_KEY_FILE`` or
  ``SURROGATE_CERT_KEY``), an unsigned file, or one whose HMAC-SHA256 signature
  (``signature_hmac_sha256``) does not verify under that key (``SignatureError``).

Files of format version 1 (whose checksum was called ``integrity_sha256``, never signed) still load
when no key is configured; files of version 2 load as the ``residual`` score with a Clopper-Pearson
reference and no required-radius thresholds (what they are). Version 3 added ``score``,
``score_params``, ``partition``, ``reference``, ``radius_thresholds`` and ``bin_edges_source``; a
reader of version 2 refuses a version-3 file by its version number, so a shifted score is never
deployed without its shifts. Version 4 adds the ``issued`` guarantee (``method`` ``ltt``, LTT with the
fallback procedure; version 3 recorded LTT as ``pac``), stores ``null`` (never certifies) as the offset
of a Mondrian group too small for its own (version 3 stored the pooled offset there; deployment now
reads such a group as never certifying whatever the version, since the pooled offset voids the bound),
and records the top-up's ``stages`` in ``reference`` (so an audit can rebuild reference radii the same
way; a version-3 topped-up calibration cannot be audited). A reader of version 3 refuses version 4.

Keys (stable; the HTML report reads them):

======================== =========================================================================
``format``               ``"surrogate-cert-calibration"``
``format_version``       4 (versions 1 to 3 still load)
``surrogate_sha256``     SHA-256 of the surrogate's weights and metadata (``Surrogate.fingerprint``)
``surrogate_file_sha256``SHA-256 of the surrogate checkpoint file, when calibrated from a file
``counts_sha256``        SHA-256 of the calibration counts file
``base_model_sha256``    the base model's SHA-256 recorded in the counts file
``dataset``, ``split``   where the calibration images came from
``sigma``                noise level (l2, input units)
``num_classes``          number of classes
``epsilon``              target rate of ``R^ > reference``
``alpha_mc``             Clopper-Pearson level of the reference radius
``delta``                PAC / issued confidence parameter (``null`` for marginal conformal)
``guarantee``            ``"marginal"``, ``"pac"`` or ``"issued"`` (what ``bound`` means: ``guarantee_statement``)
``method``               ``"conformal"`` or ``"ltt"`` (``ltt`` with ``issued``; ``pac`` in version 3)
``groups``               ``"none"``, ``"class"`` or ``"confidence"``
``offsets``              ``{group: q^}``; ``null`` = infinite (that group never certifies)
``pooled_offset``        ``q^`` of the whole calibration set (``null`` = infinite)
``group_sizes``          ``{group: calibration points in it}``
``fallback_groups``      groups too small for their own ``q^``: never certified by the surrogate (offset null;
                         version 3 stored ``pooled_offset``, read as never certifying too)
``min_group_size``       points a group needs for its own ``q^``
``radius_cap``           ``r_max``: surrogate radii are clipped here before the offset (the largest
                         reference radius ``n_cal`` samples can express)
``bin_edges``            confidence-bin edges on ``z~ = Phi^{-1}(p~)`` (``groups="confidence"``), else null
``bin_edges_source``     where those edges came from: ``rule`` (default, given, or equal-mass quantiles of
                         ``z~`` on another split's images, with that file's ``file_sha256``, ``split``,
                         ``images``, ``bins``), or null
``score``                the best-radius conformity score: ``"residual"`` (``R~ - y``), ``"shifted"``
                         (``R~ - t_b - y``) or ``"shaped"`` (``z~ - g(r+(y))``, ``calibration.shaped``);
                         the quantile rule is ``guarantee`` / ``method``
``score_params``         ``shifted``: ``bins``, ``bin_edges`` (on ``z~``), ``bin_offsets`` (``t_b``, l2
                         units) and the rules that chose them on the tuning part; ``shaped``: ``grid``,
                         ``shape`` (``g``, fitted on the tuning part), ``shift`` (``c``, ``z~`` units), ``rule``
                         (the offsets then are the calibration part's residual ones, for diagnostics only);
                         ``{}`` for ``residual``
``partition``            ``shifted`` and ``shaped``: the seeded split of the cal split into a tuning and a calibration
                         part: ``seed``, ``tune_share``, ``tune_size``, ``calibration_size``,
                         ``tune_indices_sha256``, ``rule``; null otherwise
``reference``            the reference radius: ``{"bound": "clopper-pearson"}``, or for a topped-up counts
                         file ``"clopper-pearson+confidence-sequence"`` with ``planned_max_samples``,
                         ``prior``, ``alpha_split``, ``topped_up_points`` and (version 4) ``stages`` (samples
                         after each top-up round) and ``rule`` (``"all-agree"``)
``radius_thresholds``    required-radius thresholds: ``grid`` (radii, l2 units), ``tau`` (``z~`` thresholds,
                         null = never certifies), ``score``, ``rule``, ``guarantee`` (``issued``: with
                         ``delta``; ``tau`` need not be monotone), ``epsilon``, ``calibration_size``,
                         ``points_per_sigma``; null when not fitted
``calibration_size``     number of calibration points ``m`` in the offsets' quantile (the calibration part
                         of a ``shifted`` score)
``n_cal``                noisy samples per calibration point
``bound``                the guarantee in numbers: ``epsilon + alpha_mc`` (surrogate certificates; marginal,
                         PAC or among issued certificates as ``guarantee`` says)
``package_version``      surrogate-cert version that wrote the file
``created``              UTC time of writing (ISO 8601)
``diagnostics``          in-sample summary numbers: ``certified_share``, ``violation_rate`` (share
                         with ``R^ > reference``), ``violation_rate_among_certified``,
                         ``mean_certified_radius``, ``mean_surrogate_radius``,
                         ``mean_reference_radius``, ``reference_positive_share``,
                         ``mapie_interval_coverage`` / ``mapie_interval_nominal`` (MAPIE's coverage
                         of its two-sided intervals, pooled), ``surrogate_agrees_with_counts``
``noise_scheme``         optional: the noise scheme of the calibration counts (``core.smoothing``); absent or
                         null in files older than the field, which are float noise. Deployment draws its
                         fallback samples with a scheme of the same family and refuses the other
``noise_slack``          optional (absent = 0): the radius slack of that scheme for the surrogate's input
                         size (``smoothing.noise_slack``, ``stats.grid_radius``); the reference radii and
                         ``radius_cap`` are radii of the law the counts were drawn from
``monitor_reference``    optional: the surrogate's class ``predicted`` and probability ``p_tilde`` of
                         every calibration image, in calibration order (``statistic`` names them):
                         the reference sample of the drift monitor (``deploy.monitor``). Files
                         written before it existed lack it; the monitor then asks to recalibrate.
``signature_key_id``     which key signed the file (``core.signing.key_id``), or null when unsigned
``checksum_sha256``      unkeyed SHA-256 of the canonical JSON of every other key (sorted, compact);
                         called ``integrity_sha256`` in version 1 files
``signature_hmac_sha256``HMAC-SHA256 of the same canonical JSON under the signing key; absent when
                         unsigned
======================== =========================================================================
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import TypeGuard

from data_gen.datasets import same_dataset
from surrogate_cert.core import stats
from surrogate_cert.core.errors import CalibrationError, SignatureError
from surrogate_cert.core.files import atomic_output, sniff, wrong_kind
from surrogate_cert.core.one_pass import GROUPINGS, all_group_keys
from surrogate_cert.core.signing import key_id, resolve_key, sign, verify
from surrogate_cert.core.smoothing import NOISE_SCHEMES, noise_family, noise_slack
from surrogate_cert.core.surrogate import Surrogate

FORMAT = "surrogate-cert-calibration"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

CHECKSUM_KEY = "checksum_sha256"
LEGACY_CHECKSUM_KEY = "integrity_sha256"
"""Version 1's name of the unkeyed checksum: it never guarded against anything but accidents."""
SIGNATURE_KEY = "signature_hmac_sha256"

GUARANTEES = ("marginal", "pac", "issued")
METHODS = ("conformal", "ltt")
SCORES = ("residual", "shifted", "shaped")
REFERENCE_CP = "clopper-pearson"
REFERENCE_TOPUP = "clopper-pearson+confidence-sequence"

_REQUIRED = (
    "surrogate_sha256",
    "sigma",
    "num_classes",
    "epsilon",
    "alpha_mc",
    "guarantee",
    "method",
    "groups",
    "offsets",
    "pooled_offset",
    "calibration_size",
    "n_cal",
    "radius_cap",
)


def guarantee_statement(
    guarantee: str,
    epsilon: float,
    alpha_mc: float,
    delta: float | None = None,
    groups: str = "none",
    method: str = "conformal",
) -> str:
    """The precise meaning of a calibration's bound ``epsilon + alpha_mc``, in one sentence (reports, CLI).

    Examples
    --------
    >>> print(guarantee_statement("marginal", 0.01, 0.001))  # doctest: +NORMALIZE_WHITESPACE
    P(wrong one-pass certificate) <= 0.011 over the calibration draw and a random test input, counting
    inputs that get no certificate; among certified inputs the rate can be higher (use --guarantee issued
    for that rate); required radius r* fixed before the input is seen
    """
    bound = f"{epsilon + alpha_mc:.4g}"
    where = " in each Mondrian group with its own offset (other groups are never certified)" if groups != "none" else ""
    if guarantee == "issued" or (method == "ltt" and guarantee == "pac"):
        text = (
            f"with probability >= {1 - (delta or 0.05):.4g} over the calibration draw, P(wrong | the surrogate "
            f"issued the certificate) <= {bound}{where}"
        )
    elif guarantee == "pac":
        text = (
            f"with probability >= {1 - (delta or 0.05):.4g} over the calibration draw, "
            f"P(wrong one-pass certificate) <= {bound} for a random test input{where}, "
            "counting inputs that get no certificate; among certified "
            "inputs the rate can be higher"
        )
    else:
        text = (
            f"P(wrong one-pass certificate) <= {bound} over the calibration draw and a random test input{where}, "
            "counting inputs that get no certificate; among certified inputs the rate can be higher (use "
            "--guarantee issued for that rate)"
        )
    return text + "; required radius r* fixed before the input is seen"


def _encode_offset(q: float) -> float | None:
    return None if q is None or math.isinf(q) else float(q)


def _decode_offset(q) -> float:
    return float("inf") if q is None else float(q)


def _canonical(content: dict) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def _content_hash(content: dict) -> str:
    return hashlib.sha256(_canonical(content)).hexdigest()


# --------------------------------------------------------------------------- checks


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _number(value) and math.isfinite(value)


def _whole(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def content_problems(content: dict) -> list[str]:
    """What is wrong with a calibration's JSON content, checked against itself (empty when nothing).

    Every value a deployment reads must be of its type and in its range, and the values must agree
    with one another: the radius cap is the one ``n_cal`` samples give, a finite offset needs enough
    points for ``epsilon``, offsets cannot lie below the smallest possible score, group keys and bin
    edges fit the grouping.

    Parameters
    ----------
    content : dict
        The parsed calibration.json.

    Returns
    -------
    list of str
        One line per problem found (the checks stop early when a value the later checks need is bad).
    """
    missing = [k for k in _REQUIRED if k not in content]
    if missing:
        return [f"lacks the fields {missing}"]
    p = _field_problems(content)
    if p:
        return p

    sigma, epsilon, alpha_mc, m = content["sigma"], content["epsilon"], content["alpha_mc"], content["calibration_size"]
    pac = content["guarantee"] in ("pac", "issued")
    reference = content.get("reference") or {"bound": REFERENCE_CP}
    problem = _reference_problem(reference, content["n_cal"])
    if problem:
        return p + [problem]
    expected_cap = expected_radius_cap(
        reference, content["n_cal"], alpha_mc, sigma, slack=content.get("noise_slack") or 0.0
    )
    needed = stats.min_calibration_size(epsilon, content.get("delta") if pac else None)
    p += _bound_problems(content, expected_cap, needed)
    largest_shift, problem = _score_problem(content, expected_cap)
    if problem:
        return p + [problem]
    thresholds = content.get("radius_thresholds")
    if thresholds is not None:
        problem = _thresholds_problem(thresholds, expected_cap)
        if problem:
            p.append(problem)

    # Offsets: null (= never certifies) or a finite number no smaller than the smallest possible score.
    lowest = float(stats.surrogate_radius(stats.P_CLIP, sigma)) - expected_cap - max(largest_shift, 0.0)
    problem = _bad_offset(content["pooled_offset"], lowest)
    if problem:
        p.append(f"pooled_offset {problem}")
    elif content["pooled_offset"] is not None and m < needed:
        p.append(f"a finite q^ from {m} points, but epsilon={epsilon} needs {needed}")
    edges = content.get("bin_edges")
    if content["groups"] == "confidence" and not (_increasing(edges) and edges):
        return p + [f"bin_edges {edges!r} are not finite, strictly increasing numbers"]
    if not isinstance(content["offsets"], dict):
        return p + ["offsets is not an object"]
    p += _group_problems(content, lowest, needed, clean=not p)
    return p + _monitor_reference_problems(content)


def _field_problems(content: dict) -> list[str]:
    """Each field of a calibration alone: of its type, in its range, and the options consistent."""
    p = []
    if not (_finite(content["sigma"]) and content["sigma"] > 0):
        p.append(f"sigma {content['sigma']!r} is not a finite number > 0")
    if not _whole(content["num_classes"], 2):
        p.append(f"num_classes {content['num_classes']!r} is not an integer >= 2")
    if not (_finite(content["epsilon"]) and 0 < content["epsilon"] < 0.5):
        p.append(f"epsilon {content['epsilon']!r} is not a number in (0, 0.5)")
    if not (_finite(content["alpha_mc"]) and 0 < content["alpha_mc"] < 1):
        p.append(f"alpha_mc {content['alpha_mc']!r} is not a number in (0, 1)")
    delta = content.get("delta")
    if delta is not None and not (_finite(delta) and 0 < delta < 1):
        p.append(f"delta {delta!r} is not null or a number in (0, 1)")
    version = content.get("format_version", FORMAT_VERSION)
    ltt_guarantee = "issued" if version >= 4 else "pac"
    if content["guarantee"] not in GUARANTEES or (content["guarantee"] == "issued" and version < 4):
        p.append(f"guarantee {content['guarantee']!r} is not one of {GUARANTEES}")
    elif content["guarantee"] in ("pac", "issued") and delta is None:
        p.append(f"a {content['guarantee']} guarantee needs delta")
    if content["method"] not in METHODS:
        p.append(f"method {content['method']!r} is not one of {METHODS}")
    elif content["method"] == "ltt" and content["guarantee"] != ltt_guarantee:
        p.append(f"an ltt calibration states the {ltt_guarantee} guarantee")
    elif content["guarantee"] == "issued" and content["method"] != "ltt":
        p.append("an issued guarantee is calibrated by ltt")
    if content["groups"] not in GROUPINGS:
        p.append(f"groups {content['groups']!r} is not one of {GROUPINGS}")
    for key in ("calibration_size", "n_cal"):
        if not _whole(content[key], 1):
            p.append(f"{key} {content[key]!r} is not an integer >= 1")
    if not isinstance(content["surrogate_sha256"], str):
        p.append("surrogate_sha256 is not a string")
    for key in (
        "surrogate_file_sha256",
        "counts_sha256",
        "base_model_sha256",
        "dataset",
        "split",
        "package_version",
        "created",
        "signature_key_id",
    ):
        if content.get(key) is not None and not isinstance(content[key], str):
            p.append(f"{key} is not a string")
    if not isinstance(content.get("diagnostics", {}), dict):
        p.append("diagnostics is not an object")
    return p + _noise_problems(content)


def _bound_problems(content: dict, expected_cap: float, needed: int) -> list[str]:
    """The radius cap, the stated bound and the minimum group size against the ones the options give."""
    p = []
    cap, epsilon, alpha_mc = content["radius_cap"], content["epsilon"], content["alpha_mc"]
    if not (_finite(cap) and math.isclose(cap, expected_cap, rel_tol=1e-9, abs_tol=1e-12)):
        p.append(
            f"radius_cap {cap!r} is not the largest radius n_cal={content['n_cal']} samples can show "
            f"({expected_cap:.6g})"
        )
    bound = content.get("bound", epsilon + alpha_mc)
    if not (_finite(bound) and math.isclose(bound, epsilon + alpha_mc, rel_tol=1e-9)):
        p.append(f"bound {bound!r} is not epsilon + alpha_mc")
    if "min_group_size" in content and content["min_group_size"] != needed:
        p.append(f"min_group_size {content['min_group_size']!r} is not the {needed} points epsilon={epsilon} needs")
    return p


def _score_problem(content: dict, expected_cap: float) -> tuple[float, str | None]:
    """The best-radius score and its parameters: the largest shift ``t_b`` (0 but for the shifted score)
    and what is wrong (None when nothing; the later checks need them right)."""
    score = content.get("score", "residual")
    params = content.get("score_params") or {}
    if score not in SCORES:
        return 0.0, f"score {score!r} is not one of {SCORES}"
    if score == "shifted":
        problem = _shifted_problem(params, content)
        return (0.0, problem) if problem else (max(params["bin_offsets"]), None)
    if score == "shaped":
        return 0.0, _shaped_problem(params, content, expected_cap)
    return 0.0, None


def _bad_offset(q, lowest: float) -> str | None:
    """What is wrong with an offset: null (never certifies) or a finite number no smaller than ``lowest``."""
    if q is None:
        return None
    if not _finite(q):
        return f"{q!r} is not a finite number or null"
    if q < lowest - 1e-9:
        return f"{q!r} is below {lowest:.4g}, the smallest score a calibration can produce"
    return None


def _group_problems(content: dict, lowest: float, needed: int, *, clean: bool) -> list[str]:
    """The groups' offsets, sizes and fallbacks against the grouping; ``clean``: no problem found before
    (the checks of which groups may hold a finite offset only run on an otherwise sound calibration)."""
    p = []
    offsets, m = content["offsets"], content["calibration_size"]
    keys = all_group_keys(content["groups"], content["num_classes"], content.get("bin_edges"))
    if sorted(offsets) != sorted(keys):
        p.append(f"offsets have groups {sorted(offsets)[:12]} but groups={content['groups']!r} has {keys[:12]}")
    for group, q in offsets.items():
        problem = _bad_offset(q, lowest)
        if problem:
            p.append(f"offset of group {group!r} {problem}")
    fallback = content.get("fallback_groups", [])
    sizes = content.get("group_sizes", {})
    if not (isinstance(fallback, list) and set(map(str, fallback)) <= set(keys)):
        p.append(f"fallback_groups {fallback!r} are not groups of this calibration")
    elif not (
        isinstance(sizes, dict)
        and set(sizes) <= set(keys)
        and all(_whole(v, 0) for v in sizes.values())
        and (not sizes or sum(sizes.values()) == m)
    ):
        p.append(f"group_sizes do not split the {m} calibration points among the groups")
    elif content["groups"] != "none" and clean and not p:
        for group, q in offsets.items():
            own = str(group) not in set(map(str, fallback))
            if own and q is not None and sizes.get(group, 0) < needed:
                p.append(
                    f"group {group!r} has its own finite q^ from {sizes.get(group, 0)} points; {needed} are needed"
                )
            legacy = content.get("format_version", FORMAT_VERSION) < 4  # stored the pooled q^, read as never
            if not own and q is not None and not (legacy and q == content["pooled_offset"]):
                p.append(f"group {group!r} is too small for its own q^ but has a finite offset (it must never certify)")
    elif content["groups"] == "none" and clean and not p and offsets.get("all") != content["pooled_offset"]:
        p.append("the one group's offset is not the pooled offset")
    return p


def _monitor_reference_problems(content: dict) -> list[str]:
    """The drift monitor's reference: one class and one probability per calibration point (or none)."""
    reference = content.get("monitor_reference")
    if reference is None:
        return []
    m = content["calibration_size"]
    predicted = reference.get("predicted") if isinstance(reference, dict) else None
    p_tilde = reference.get("p_tilde") if isinstance(reference, dict) else None
    if not (
        isinstance(predicted, list)
        and isinstance(p_tilde, list)
        and len(predicted) == len(p_tilde) == m
        and all(_whole(c, 0) and c < content["num_classes"] for c in predicted)
        and all(_finite(v) and 0 <= v <= 1 for v in p_tilde)
    ):
        return [
            f"monitor_reference is not one class in 0..{content['num_classes'] - 1} and one probability "
            f"in [0, 1] for each of the {m} calibration points"
        ]
    return []


def _reference_problem(reference, n_cal) -> str | None:
    if not isinstance(reference, dict) or reference.get("bound") not in (REFERENCE_CP, REFERENCE_TOPUP):
        return f"reference {reference!r:.80} names no known bound ({REFERENCE_CP!r} or {REFERENCE_TOPUP!r})"
    if reference["bound"] == REFERENCE_TOPUP:
        top, prior = reference.get("planned_max_samples"), reference.get("prior")
        if not (_whole(top, 1) and top >= n_cal):
            return f"reference planned_max_samples {top!r} is not an integer >= n_cal"
        if not (
            isinstance(prior, dict)
            and all(
                isinstance(prior.get(k), list) and prior[k] and all(_finite(v) and v >= 0 for v in prior[k])
                for k in ("a", "b", "weights")
            )
            and len({len(prior[k]) for k in ("a", "b", "weights")}) == 1
            and min(prior["a"] + prior["b"]) > 0
            and sum(prior["weights"]) > 0
        ):
            return "reference prior is not a Beta mixture (lists a, b, weights of one length, a, b > 0)"
        stages = reference.get("stages")
        if stages is not None and not (
            isinstance(stages, list)
            and stages
            and all(_whole(v, 1) for v in stages)
            and stages[0] == n_cal
            and all(b > a for a, b in zip(stages, stages[1:]))
            and stages[-1] <= top
        ):
            return f"reference stages {stages!r:.80} do not rise strictly from n_cal to at most planned_max_samples"
    return None


def expected_radius_cap(
    reference: dict | None, n_cal: int, alpha_mc: float, sigma: float, *, slack: float = 0.0
) -> float:
    """The radius cap a calibration with this ``reference`` record must have (``conformal.reference_radii``)."""
    if not reference or reference.get("bound", REFERENCE_CP) == REFERENCE_CP:
        return stats.max_radius(n_cal, alpha_mc, sigma, slack=slack)
    prior = reference["prior"]
    return stats.topup_max_radius(
        n_cal,
        int(reference["planned_max_samples"]),
        alpha_mc,
        sigma,
        (prior["a"], prior["b"], prior["weights"]),
        slack=slack,
    )


def _noise_problems(content: dict) -> list[str]:
    """The optional noise fields: a known scheme, and a slack that is 0 exactly for float noise."""
    scheme, slack = content.get("noise_scheme"), content.get("noise_slack", 0.0)
    if scheme is not None and scheme not in NOISE_SCHEMES:
        return [f"noise_scheme {scheme!r} is not one of {NOISE_SCHEMES}"]
    if not (_finite(slack) and 0 <= slack < 0.25):
        return [f"noise_slack {slack!r} is not a number in [0, 0.25)"]
    if (noise_family(scheme) == "grid") != (slack > 0):
        return [f"noise_slack {slack!r} does not fit noise_scheme {scheme!r} (positive exactly for the sound scheme)"]
    return []


def _increasing(values) -> TypeGuard[list]:
    return (
        isinstance(values, list) and all(_finite(v) for v in values) and all(b > a for a, b in zip(values, values[1:]))
    )


def _shaped_problem(params: dict, content: dict, cap: float) -> str | None:
    """A ``shaped`` score's parameters (``calibration.shaped``): grid, non-decreasing shape, shift, partition."""
    grid, shape, shift = params.get("grid"), params.get("shape"), params.get("shift")
    if not (_increasing(grid) and grid and grid[0] > 0 and grid[-1] <= cap * (1 + 1e-9)):
        return "score_params grid is not strictly increasing radii in (0, radius_cap]"
    if not (isinstance(shape, list) and len(shape) == len(grid) and all(v is None or _finite(v) for v in shape)):
        return "score_params shape is not one threshold (a z~ value or null) per grid radius"
    finite = [float("inf") if v is None else v for v in shape]
    if any(b < a for a, b in zip(finite, finite[1:])):
        return "score_params shape decreases with the radius (the rule needs it non-decreasing)"
    if not (shift is None or _finite(shift)):
        return f"score_params shift {shift!r} is not a finite number or null"
    return _shifted_problem(dict(bin_edges=[0.0], bin_offsets=[0.0, 0.0]), content)


def _shifted_problem(params: dict, content: dict) -> str | None:
    edges, offsets = params.get("bin_edges"), params.get("bin_offsets")
    if not _increasing(edges):
        return f"score_params bin_edges {edges!r:.80} are not finite, strictly increasing numbers"
    if not (isinstance(offsets, list) and len(offsets) == len(edges) + 1 and all(_finite(t) for t in offsets)):
        return "score_params bin_offsets are not one finite offset per bin"
    if content["groups"] != "none" or content["method"] != "conformal":
        return "a shifted score is calibrated with groups none and the conformal method"
    part = content.get("partition")
    if not (
        isinstance(part, dict)
        and _whole(part.get("seed"), 0)
        and _finite(part.get("tune_share"))
        and 0 < part["tune_share"] < 1
        and _whole(part.get("tune_size"), 1)
        and part.get("calibration_size") == content["calibration_size"]
    ):
        return "a shifted score needs its partition (seed, tune_share, tune_size, calibration_size)"
    return None


def _thresholds_problem(table, cap: float) -> str | None:
    if not isinstance(table, dict):
        return "radius_thresholds is not an object"
    grid, tau = table.get("grid"), table.get("tau")
    if not (_increasing(grid) and grid and grid[0] > 0 and grid[-1] <= cap * (1 + 1e-9) + 1e-12):
        return "radius_thresholds grid is not strictly increasing radii in (0, radius_cap]"
    if not (
        isinstance(tau, list)
        and len(tau) == len(grid)
        and all(t is None or (_finite(t) and -stats.Z_MAX - 1 - 1e-9 <= t <= stats.Z_MAX) for t in tau)
    ):
        return "radius_thresholds tau is not one threshold (a z~ value or null) per grid radius"
    finite = [math.inf if t is None else t for t in tau]
    if table.get("guarantee") == "issued":
        if not (_finite(table.get("delta")) and 0 < table["delta"] < 1):
            return "radius_thresholds of the issued guarantee need their delta in (0, 1)"
    elif any(b < a for a, b in zip(finite, finite[1:])):
        return "radius_thresholds tau decreases with the radius (the rule makes it non-decreasing)"
    if not (_finite(table.get("epsilon")) and 0 < table["epsilon"] < 0.5):
        return "radius_thresholds epsilon is not a number in (0, 0.5)"
    return None


@dataclass
class Calibration:
    """A calibrated surrogate's offsets ``q^`` with their provenance (see the module docstring)."""

    surrogate_sha256: str
    sigma: float
    num_classes: int
    epsilon: float
    alpha_mc: float
    guarantee: str
    method: str
    groups: str
    offsets: dict
    pooled_offset: float
    calibration_size: int
    n_cal: int
    radius_cap: float  # required: offsets are only valid for radii clipped where they were calibrated
    delta: float | None = None
    group_sizes: dict = field(default_factory=dict)
    fallback_groups: list = field(default_factory=list)
    min_group_size: int = 0
    bin_edges: list | None = None
    surrogate_file_sha256: str | None = None
    counts_sha256: str | None = None
    base_model_sha256: str | None = None
    dataset: str | None = None
    split: str | None = None
    package_version: str | None = None
    created: str | None = None
    diagnostics: dict = field(default_factory=dict)
    signature_key_id: str | None = None
    monitor_reference: dict | None = None
    score: str = "residual"
    score_params: dict = field(default_factory=dict)
    partition: dict | None = None
    reference: dict = field(default_factory=lambda: {"bound": REFERENCE_CP})
    radius_thresholds: dict | None = None
    bin_edges_source: dict | None = None
    noise_scheme: str | None = None
    noise_slack: float = 0.0

    # ------------------------------------------------------------------ use
    @property
    def bound(self) -> float:
        """``epsilon + alpha_mc``: the bound on wrong surrogate certificates, in the sense ``statement`` gives."""
        return self.epsilon + self.alpha_mc

    @property
    def statement(self) -> str:
        """What ``bound`` means for this calibration, in one sentence (``guarantee_statement``)."""
        return guarantee_statement(self.guarantee, self.epsilon, self.alpha_mc, self.delta, self.groups, self.method)

    @property
    def threshold_epsilon(self) -> float | None:
        """``epsilon`` of the required-radius thresholds (None without them); their bound adds ``alpha_mc``."""
        return None if not self.radius_thresholds else float(self.radius_thresholds["epsilon"])

    @property
    def signed(self) -> bool:
        """Whether this calibration was written (or read) with a signature; see ``signature_key_id``."""
        return self.signature_key_id is not None

    def offset(self, group: str) -> float:
        """``q^`` of a group: ``+inf`` (never certifies) for a group without its own offset or never seen."""
        if self.groups != "none" and str(group) in {str(g) for g in self.fallback_groups or []}:
            return float("inf")
        return float(self.offsets.get(group, float("inf")))

    def check_matches(self, surrogate) -> None:
        """Refuse (``CalibrationError``) a surrogate this calibration was not made for.

        Parameters
        ----------
        surrogate : Surrogate
            Checked for the same fingerprint (weights and metadata), sigma and class count.

        Raises
        ------
        CalibrationError
            If any of the three differs.
        """
        if surrogate.fingerprint() != self.surrogate_sha256:
            raise CalibrationError(
                "the calibration was made for another surrogate (SHA-256 mismatch); "
                "re-run `surrogate-cert calibrate` with this surrogate"
            )
        if not math.isclose(float(surrogate.sigma), self.sigma, rel_tol=1e-9):
            raise CalibrationError(
                f"the calibration is for sigma={self.sigma} but the surrogate has sigma={surrogate.sigma}; re-calibrate"
            )
        if int(surrogate.num_classes) != self.num_classes:
            raise CalibrationError(
                f"the calibration is for {self.num_classes} classes but the surrogate has {surrogate.num_classes}; "
                "re-calibrate"
            )
        expected = noise_slack(self.noise_scheme, self.sigma, surrogate.input_shape)
        if not math.isclose(expected, float(self.noise_slack), rel_tol=1e-9, abs_tol=0.0):
            raise CalibrationError(
                f"the calibration records noise slack {self.noise_slack!r} but its scheme gives "
                f"{expected!r} for the surrogate's {tuple(surrogate.input_shape)} images; "
                "re-calibrate"
            )

    def check_fresh(
        self,
        *,
        dataset: str | None = None,
        split: str | None = None,
        counts_sha256: str | None = None,
        what: str = "these images",
    ) -> None:
        """Refuse (``CalibrationError``) to use this calibration on its own calibration images.

        The guarantee holds for inputs exchangeable with the calibration images and not among them:
        evaluated on the calibration set itself, every calibrated radius was fitted to its own point.
        One rule for every consumer: the held-out check of ``report`` / ``calibrate --report-counts``
        (a counts file) and ``certify`` (a dataset split).

        Parameters
        ----------
        dataset : str, optional
            The dataset spec of the images (``data_gen.datasets.same_dataset`` compares it).
        split : str, optional
            Their split; the same split of the same dataset as the calibration's is its images.
        counts_sha256 : str, optional
            SHA-256 of the counts file about to be used; the calibration's own counts file is refused.
        what : str, optional
            What the images are, for the message.

        Raises
        ------
        CalibrationError
            If the counts file is the calibration's, or the split is the calibration's split of its dataset.
        """
        if counts_sha256 and self.counts_sha256 and counts_sha256 == self.counts_sha256:
            raise CalibrationError(
                f"{what} is the calibration's own counts file: the guarantee needs images the "
                "calibration never saw; use the test split"
            )
        if (
            split is not None
            and self.split is not None
            and str(split) == str(self.split)
            and (dataset is None or self.dataset is None or same_dataset(str(dataset), str(self.dataset)))
        ):
            raise CalibrationError(
                f"{what} is the {split} split of {self.dataset or dataset}, the calibration images "
                "themselves: the guarantee needs images the calibration never saw; use the test "
                "split"
            )

    # ------------------------------------------------------------------ files
    def to_dict(self, *, key: bytes | None = None) -> dict:
        """The JSON content, with its checksum and (given a key) its signature.

        Infinite offsets and non-finite diagnostics become ``null``; ``created`` is filled with the
        current UTC time if unset; ``bound`` is added. ``checksum_sha256`` (unkeyed) and, when ``key``
        is given, ``signature_hmac_sha256`` (HMAC-SHA256) cover every other key.

        Parameters
        ----------
        key : bytes, optional
            Signing key; ``None`` writes an unsigned file (``signature_key_id`` null).

        Returns
        -------
        dict
            The keys of the module docstring, checksum and signature last.
        """
        content = asdict(self)
        content["offsets"] = {k: _encode_offset(v) for k, v in self.offsets.items()}
        content["pooled_offset"] = _encode_offset(self.pooled_offset)
        content["radius_cap"] = _encode_offset(self.radius_cap)
        content["created"] = self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        content["bound"] = self.bound
        content["diagnostics"] = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.diagnostics.items()
        }
        content["signature_key_id"] = key_id(key) if key is not None else None
        content = {"format": FORMAT, "format_version": FORMAT_VERSION, **content}
        message = _canonical(content)
        content[CHECKSUM_KEY] = hashlib.sha256(message).hexdigest()
        if key is not None:
            content[SIGNATURE_KEY] = sign(message, key)
        return content

    def save(
        self, path: str | os.PathLike, *, key: bytes | str | None = None, key_file=None, overwrite: bool = True
    ) -> str:
        """Write calibration.json atomically, signed when a key is configured; returns the path.

        The key is ``key``, else ``key_file``, else the environment (``core.signing.resolve_key``);
        without one the file is unsigned. Sets ``created`` (if unset) and ``signature_key_id`` to what
        was written.

        Parameters
        ----------
        path : str or os.PathLike
            The file to write.
        key : bytes or str, optional
            Signing key.
        key_file : str or os.PathLike, optional
            File holding the signing key.
        overwrite : bool, optional
            Replace an existing file (default); if false, ``OutputExistsError`` and the file is kept.

        Returns
        -------
        str
            ``path``.

        Raises
        ------
        CalibrationError
            If the file cannot be written.
        OutputExistsError
            If ``path`` exists and ``overwrite`` is false.
        InvalidParameterError
            If the key is misconfigured (``resolve_key``).
        """
        path = os.fspath(path)
        content = self.to_dict(key=resolve_key(key, key_file))
        try:
            with atomic_output(path, overwrite=overwrite) as tmp:
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(content, fh, indent=2, sort_keys=False)
                    fh.write("\n")
        except OSError as exc:
            raise CalibrationError(f"cannot write {path} ({exc.strerror or exc}); choose a writable --out") from None
        self.created = content["created"]
        self.signature_key_id = content["signature_key_id"]
        return path

    @classmethod
    def from_dict(cls, content: dict, *, key: bytes | None = None) -> Calibration:
        """Rebuild from JSON content after checking its format, checksum, consistency and signature.

        Parameters
        ----------
        content : dict
            The parsed calibration.json (as ``to_dict`` made it; format version 1 or 2).
        key : bytes, optional
            When given, the content must carry a valid HMAC-SHA256 signature under it. ``None``
            verifies no signature (``load_calibration`` takes the key from the environment).

        Returns
        -------
        Calibration

        Raises
        ------
        CalibrationError
            If ``content`` is not a calibration of a readable format version, its checksum does not
            match, or it contradicts itself (``content_problems``).
        SignatureError
            If ``key`` is given and the content is unsigned or its signature does not verify.
        """
        if not isinstance(content, dict) or content.get("format") != FORMAT:
            raise CalibrationError("not a surrogate-cert calibration file; create one with `surrogate-cert calibrate`")
        version = content.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CalibrationError(
                f"calibration format version {version!r} is not supported "
                f"(this version reads {', '.join(map(str, READABLE_VERSIONS))}); re-run `surrogate-cert calibrate`"
            )
        checksum_key = CHECKSUM_KEY if version >= 2 else LEGACY_CHECKSUM_KEY
        stored = content.get(checksum_key)
        signature = content.get(SIGNATURE_KEY)
        rest = {k: v for k, v in content.items() if k not in (checksum_key, SIGNATURE_KEY)}
        if stored != _content_hash(rest):
            raise CalibrationError(
                "the calibration file was modified after it was written (checksum mismatch); "
                "re-run `surrogate-cert calibrate`"
            )
        if key is not None:
            _check_signature(rest, signature, key)
        problems = content_problems(rest)
        if problems:
            raise CalibrationError(
                "the calibration contradicts itself: " + "; ".join(problems[:3]) + "; re-run `surrogate-cert calibrate`"
            )
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in rest.items() if k in names}
        kwargs["offsets"] = {k: _decode_offset(v) for k, v in rest["offsets"].items()}
        kwargs["pooled_offset"] = _decode_offset(rest["pooled_offset"])
        kwargs["radius_cap"] = _decode_offset(rest["radius_cap"])
        kwargs["diagnostics"] = {k: (float("nan") if v is None else v) for k, v in rest.get("diagnostics", {}).items()}
        return cls(**kwargs)


def _check_signature(rest: dict, signature, key: bytes) -> None:
    if signature is None:
        raise SignatureError(
            "the calibration is not signed but a signing key is configured; re-run "
            "`surrogate-cert calibrate` with the key (--key-file or SURROGATE_CERT_KEY_FILE)"
        )
    if not verify(_canonical(rest), signature, key):
        other = rest.get("signature_key_id")
        why = (
            f"it was signed with another key (key id {other}, yours is {key_id(key)})"
            if other and other != key_id(key)
            else "it was altered after signing"
        )
        raise SignatureError(
            f"the calibration's signature does not verify under the configured key: {why}; "
            "use the right key, or re-run `surrogate-cert calibrate`"
        )


def load_calibration(
    path: str | os.PathLike, surrogate=None, *, key: bytes | str | None = None, key_file=None
) -> Calibration:
    """Read calibration.json, refusing a file of another kind, a changed, inconsistent or unsigned one, or
    one made for another surrogate.

    ``surrogate`` (a ``Surrogate`` or a checkpoint path) is checked when given: same weights and
    metadata fingerprint, sigma and class count, else ``CalibrationError``. The signing key is
    ``key``, else ``key_file``, else the environment (``SURROGATE_CERT_KEY_FILE`` /
    ``SURROGATE_CERT_KEY``); with one configured the file must carry a valid signature under it.

    Parameters
    ----------
    path : str or os.PathLike
        The calibration file.
    surrogate : Surrogate or path, optional
        The surrogate it must belong to.
    key : bytes or str, optional
        The signing key.
    key_file : str or os.PathLike, optional
        A file holding the signing key.

    Returns
    -------
    Calibration

    Raises
    ------
    CalibrationError
        If the file cannot be read, is not a JSON calibration, was modified after it was written,
        contradicts itself, or belongs to another surrogate.
    SignatureError
        If a key is configured and the file is unsigned or its signature does not verify.
    ModelError
        If ``surrogate`` is a path that cannot be loaded as a surrogate.
    InvalidParameterError
        If the key is misconfigured (``core.signing.resolve_key``).
    """
    secret = resolve_key(key, key_file)
    kind = sniff(path)
    if kind == "missing":
        raise CalibrationError(
            f"cannot read calibration file {path}: no such file; make one with `surrogate-cert calibrate`"
        )
    if kind not in ("json", "text", "empty"):
        raise CalibrationError(wrong_kind(path, kind, "calibration"))
    try:
        with open(path, encoding="utf-8") as fh:
            content = json.load(fh)
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CalibrationError(wrong_kind(path, "binary", "calibration")) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CalibrationError(
            f"{path} is not valid JSON ({getattr(exc, 'msg', type(exc).__name__)}); re-run `surrogate-cert calibrate`"
        ) from None
    try:
        calibration = Calibration.from_dict(content, key=secret)
    except CalibrationError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # a check missed a shape: still one line, never a traceback
        raise CalibrationError(
            f"{path} lacks or mistypes calibration fields ({exc}); re-run `surrogate-cert calibrate`"
        ) from None
    if surrogate is not None:
        if not isinstance(surrogate, Surrogate):
            surrogate = Surrogate.load(surrogate, key=secret)
        calibration.check_matches(surrogate)
    return calibration


__all__ = [
    "Calibration",
    "load_calibration",
    "content_problems",
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "GUARANTEES",
    "METHODS",
    "guarantee_statement",
]
