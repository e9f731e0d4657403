"""The numbers of the comparison and calibration reports, and their tables as data.

``build_report(results, calibration=..., counts=..., surrogate=..., ...)`` returns one JSON-ready
dict: per results file, certified accuracy at fixed radii and ACR (mean over all inputs of the
radius of correct certificates, 0 otherwise); the cost in base-model evaluations per query over
all / certified / other inputs (the Halt Fast table format), medians, wall time and the share of
each path; the calibration's parameters, ``q^`` per group and, with the test split's counts and
the surrogate, the held-out rate of calibrated radii above the Monte Carlo reference against its
bound; the amortisation (break-even queries); the environment; with a ``surrogate-cert monitor``
JSON, the deployment watchers (the drift martingale against its threshold ``log(1/delta)``, the
audited rate with its confidence sequence against the audit's threshold). ``tables(report)`` lays
those numbers out as (header, rows) of display cells, the one source for every renderer.
Figures are in ``calibration.figures``; HTML and Markdown in ``surrogate_cert.workflows.report``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_gen.store import CountsMismatchError, check_counts_for, read_counts
from surrogate_cert.core import stats
from surrogate_cert.core.certificate import certified_accuracy, read_meta, read_tsv
from surrogate_cert.core.errors import CalibrationError, InvalidInputError, InvalidParameterError
from surrogate_cert.core.hashing import sha256_file
from surrogate_cert.core.one_pass import deployed_radius
from surrogate_cert.core.smoothing import NOISE_SCHEME_V2
from surrogate_cert.core.surrogate import Surrogate

from .artifact import guarantee_statement
from .artifact import load_calibration as load_artifact

STANDARD_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Radii of the certified-accuracy table (input l2 units), as in Cohen et al. at sigma = 0.25."""

SIGMA_MULTIPLES = (1.0, 2.0, 3.0, 4.0)
"""For another sigma the table adds radii ``sigma * k``: the same points in units of the noise."""

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


# --------------------------------------------------------------------------- reading inputs


def parse_header(comments: Sequence[str]) -> dict:
    """``sigma``, ``seed`` and ``device`` from a results file's ``#`` lines, where they are stated.

    Accepts the command line (``--sigma 0.25``) and ``key=value`` / ``key: value`` / ``key value`` /
    JSON forms; the last statement wins (resolved values follow the command line).
    """
    text = "\n".join(comments)
    found: dict[str, Any] = {}
    for key, pattern, cast in (
        ("sigma", r"(?<![\w-])(?:--)?sigma[\"']?\s*[=: ]\s*" + _NUMBER, float),
        ("seed", r"(?<![\w-])(?:--)?seed[\"']?\s*[=: ]\s*([0-9]+)", int),
        ("device", r"(?<![\w-])(?:--)?device[\"']?\s*[=: ]\s*[\"']?([\w:.-]+)", str),
    ):
        matches = re.findall(pattern, text)
        if matches:
            found[key] = cast(matches[-1])
    return found


def provenance(meta: dict) -> dict:
    """``sigma``, ``seed`` and ``device`` of a results file, from its ``.meta.json`` sidecar
    (``core.certificate.read_meta``), or parsed from the ``#`` lines of an older file."""
    found = {k: meta[k] for k in ("sigma", "seed", "device") if meta.get(k) is not None}
    legacy = parse_header(meta.get("comment") or [])
    return {**legacy, **found}


def _meta_lines(meta: dict) -> list[str]:
    """The provenance as display lines: ``key: value`` (the legacy ``#`` lines kept as they were)."""
    lines = list(meta.get("comment") or [])
    lines += [f"{k}: {v}" for k, v in sorted(meta.items()) if k != "comment"]
    return lines


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Each results TSV as ``{"label", "path", "rows", "comments", "header"}``; labels are file stems.

    ``comments`` are the provenance lines for display, ``header`` the parsed ``sigma`` / ``seed`` /
    ``device``.
    """
    if not paths:
        raise InvalidParameterError("give at least one results TSV, e.g. --results cohen.tsv hybrid.tsv")
    stems = [Path(p).stem for p in paths]
    runs = []
    for path, stem in zip(paths, stems):
        rows = read_tsv(path)
        if not rows:
            raise InvalidInputError(f"{path} has no result rows; re-run the certifier that wrote it")
        meta = read_meta(path)
        label = stem if stems.count(stem) == 1 else os.fspath(path)
        runs.append(
            dict(label=label, path=os.fspath(path), rows=rows, comments=_meta_lines(meta), header=provenance(meta))
        )
    return runs


def image_sets(runs: Sequence[dict]) -> dict:
    """Whether the runs certified the same images (by dataset index), and a warning when they did not.

    Certified accuracies of runs on different images are not comparable (Cohen on the first 100 test
    images and the hybrid on all 397 measure two populations), so the report says so above its tables.

    Parameters
    ----------
    runs : sequence of dict
        ``load_results``'s runs (``label`` and ``rows``, each row with ``idx``).

    Returns
    -------
    dict
        ``same`` (bool), ``images`` (run label -> number of images), ``shared`` (images every run
        certified) and ``warning`` (a sentence, or None when the sets are equal).
    """
    sets = {r["label"]: {int(row["idx"]) for row in r["rows"]} for r in runs}
    if not sets:
        return dict(same=True, images={}, shared=0, warning=None)
    shared = set.intersection(*sets.values())
    same = all(s == shared for s in sets.values())
    counts = {label: len(s) for label, s in sets.items()}
    warning = (
        None
        if same
        else (
            "the compared runs certified different images ("
            + ", ".join(f"{k} on {v}" for k, v in counts.items())
            + f"; {len(shared)} in common), so their certified accuracies and costs are not comparable: certify the "
            "same split with the same --limit"
        )
    )
    return dict(same=same, images=counts, shared=len(shared), warning=warning)


def load_calibration(path: str | os.PathLike, key: bytes | None = None) -> dict:
    """The calibration JSON as a dict, after ``artifact.load_calibration`` has checked it.

    A changed, inconsistent or (with a signing key configured: ``key``, else the environment)
    unsigned file is refused (``CalibrationError``) rather than reported as if it were valid.
    """
    load_artifact(path, key=key)  # refuses the file unless it is a sound calibration (signed, if a key is set)
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def offline_evaluations_from_counts(paths: Sequence[str | os.PathLike], key: bytes | None = None) -> int:
    """Base-model evaluations spent to make counts files: rows x (n + n0), summed.

    Each file is read whole and checked (``read_counts``: rows summing to ``n``, ...; ``check_counts_for``:
    complete, and signed when a key is configured), so a damaged or edited file is refused, not counted.
    """
    total = 0
    for path in paths:
        counts = read_counts(path)
        try:
            check_counts_for(counts, path, complete=True, key=key)
        except CountsMismatchError as exc:
            raise CalibrationError(f"--offline-counts: {exc}") from None
        attrs = counts.attrs
        total += len(counts) * (int(attrs["n"]) + int(attrs.get("n0") or 0))
    return total


# --------------------------------------------------------------------------- numbers


def table_radii(sigma: float | None) -> list[float]:
    """``STANDARD_RADII``, plus ``sigma * SIGMA_MULTIPLES`` when sigma is known and not 0.25."""
    radii = list(STANDARD_RADII)
    if sigma is not None:
        for k in SIGMA_MULTIPLES:
            r = round(sigma * k, 6)
            if all(abs(r - q) > 1e-9 for q in radii):
                radii.append(r)
    return sorted(radii)


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return dict(mean=None, median=None, count=0)
    return dict(mean=float(values.mean()), median=float(np.median(values)), count=int(values.size))


def summarize_run(rows: Sequence[dict], radii: Sequence[float]) -> dict:
    """Certified accuracy at ``radii``, ACR, cost (all / certified / rest), wall time and path shares.

    An input is *certified* when its prediction is a class (not -1) and its radius is > 0; the
    cost split follows the Halt Fast tables. ``n_samples`` of -1 (a TSV without that column) makes
    the cost unknown (None).
    """
    radius = np.array([r["radius"] for r in rows], dtype=float)
    correct = np.array([r["correct"] for r in rows], dtype=bool)
    predict = np.array([r["predict"] for r in rows], dtype=int)
    samples = np.array([r["n_samples"] for r in rows], dtype=float)
    seconds = np.array([r["time"] for r in rows], dtype=float)
    methods = [r["method"] for r in rows]
    certified = (predict >= 0) & (radius > 0)
    cost_known = bool(np.all(samples >= 0))
    n = len(rows)
    total_time = float(seconds.sum())
    return dict(
        num_inputs=n,
        radii=[float(r) for r in radii],
        certified_accuracy=certified_accuracy(rows, radii),
        acr=float(np.where(correct, radius, 0.0).mean()),
        clean_accuracy_of_smoothed=float(correct.mean()),
        share_certified=float(certified.mean()),
        samples=dict(
            all=_stats(samples) if cost_known else None,
            certified=_stats(samples[certified]) if cost_known else None,
            rest=_stats(samples[~certified]) if cost_known else None,
            max=float(samples.max()) if cost_known else None,
            total=float(samples.sum()) if cost_known else None,
        ),
        seconds_per_query=_stats(seconds),
        images_per_second=(n / total_time) if total_time > 0 else None,
        share_by_method={m: methods.count(m) / n for m in sorted(set(methods))},
    )


def amortisation(runs: dict[str, dict], offline_evaluations: int | None, baseline: str | None = None) -> dict:
    """Evaluations saved per query against ``baseline`` (default: the run with the most samples per
    query, normally Cohen) and the break-even number of queries ``offline / saved``."""
    known = {k: v for k, v in runs.items() if v["samples"]["all"] is not None}
    if not known:
        return dict(offline_evaluations=offline_evaluations, baseline=None, per_run={})
    if baseline is None:
        baseline = max(known, key=lambda k: known[k]["samples"]["all"]["mean"])
    elif baseline not in known:
        raise InvalidParameterError(f"baseline {baseline!r} is not one of the results with costs: {sorted(known)}")
    base_mean = known[baseline]["samples"]["all"]["mean"]
    per_run = {}
    for label, summary in known.items():
        mean = summary["samples"]["all"]["mean"]
        saved = base_mean - mean
        per_run[label] = dict(
            mean_evaluations_per_query=mean,
            saved_per_query=saved,
            speedup=(base_mean / mean) if mean > 0 else None,
            break_even_queries=(offline_evaluations / saved) if offline_evaluations is not None and saved > 0 else None,
        )
    return dict(
        offline_evaluations=offline_evaluations,
        baseline=baseline,
        baseline_mean_evaluations_per_query=base_mean,
        per_run=per_run,
    )


def calibration_summary(cal: dict) -> dict:
    """The parameters a reader checks first, from a calibration JSON (keys: calibration.artifact).

    ``q_hat`` maps each group to its offset (None = infinite: that group never certifies).
    """
    return dict(
        epsilon=cal.get("epsilon"),
        alpha_mc=cal.get("alpha_mc"),
        delta=cal.get("delta"),
        guarantee=cal.get("guarantee"),
        method=cal.get("method"),
        groups=cal.get("groups"),
        sigma=cal.get("sigma"),
        num_classes=cal.get("num_classes"),
        calibration_size=cal.get("calibration_size"),
        n_cal=cal.get("n_cal"),
        q_hat=cal.get("offsets"),
        pooled_q_hat=cal.get("pooled_offset"),
        group_sizes=cal.get("group_sizes"),
        fallback_groups=cal.get("fallback_groups"),
        min_group_size=cal.get("min_group_size"),
        radius_cap=cal.get("radius_cap"),
        bound=cal.get("bound"),
        statement=guarantee_statement(
            cal.get("guarantee") or "marginal",
            cal.get("epsilon") or 0.0,
            cal.get("alpha_mc") or 0.0,
            cal.get("delta"),
            cal.get("groups") or "none",
            cal.get("method") or "conformal",
        )
        if cal.get("epsilon") is not None
        else None,
        diagnostics=cal.get("diagnostics") or {},
        raw=cal,
    )


MONITOR_FORMAT = "surrogate-cert-monitor"
"""``format`` of the JSON ``surrogate-cert monitor`` writes (``surrogate_cert.workflows.monitoring``)."""


def load_monitor(path: str | os.PathLike) -> dict:
    """A ``surrogate-cert monitor`` JSON, checked for its format (``InvalidInputError`` otherwise)."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise InvalidInputError(f"cannot read monitor file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidInputError(f"{path} is not valid JSON ({exc}); re-run `surrogate-cert monitor`") from None
    if not isinstance(doc, dict) or doc.get("format") != MONITOR_FORMAT:
        raise InvalidInputError(f"{path} is not a monitor file; write one with `surrogate-cert monitor`")
    return doc


def monitor_summary(doc: dict) -> dict:
    """The watchers' numbers for the report: the drift martingale and the audit (keys of the monitor JSON).

    ``path`` (the log martingale after every query) and the audit's bounds over time are kept for
    the figure only.
    """
    lm = doc.get("log_martingale") or {}
    audit = doc.get("audit")
    return dict(
        queries=doc.get("queries"),
        delta=doc.get("delta"),
        log_threshold=lm.get("threshold"),
        log_martingale=lm.get("final"),
        max_log_martingale=lm.get("max"),
        drift_alarm=doc.get("drift_alarm"),
        drift_alarm_at=doc.get("drift_alarm_at"),
        reference_size=(doc.get("drift") or {}).get("reference_size"),
        routes=doc.get("routes") or {},
        one_pass_certificates=doc.get("one_pass_certificates"),
        audit=None if audit is None else {k: v for k, v in audit.items() if k != "path"},
        _path=lm.get("path") or [],
        _audit_path=(audit or {}).get("path") or [],
    )


def build_report(
    results: Sequence[str | os.PathLike],
    calibration: str | os.PathLike | None = None,
    counts: str | os.PathLike | None = None,
    surrogate: str | os.PathLike | None = None,
    offline_evaluations: int | None = None,
    baseline: str | None = None,
    data_root: str | None = None,
    key: bytes | None = None,
    monitor: str | os.PathLike | None = None,
) -> dict:
    """All numbers of the report as one JSON-ready dict (see the module docstring).

    ``key`` is the signing key the calibration must be signed with (default: the environment's, if
    any; ``core.signing``).
    """
    runs = load_results(results) if results else []
    cal = load_calibration(calibration, key) if calibration is not None else None
    sigmas = {r["header"]["sigma"] for r in runs if "sigma" in r["header"]}
    sigma = sigmas.pop() if len(sigmas) == 1 else None
    if sigma is None and cal is not None and not sigmas:
        sigma = cal.get("sigma")
    radii = table_radii(sigma)
    summaries = {r["label"]: summarize_run(r["rows"], radii) for r in runs}
    report: dict[str, Any] = dict(
        sigma=sigma,
        radii=radii,
        runs=summaries,
        amortisation=amortisation(summaries, offline_evaluations, baseline) if runs else None,
        calibration=None,
        environment=environment(runs, cal),
        image_sets=image_sets(runs),
    )
    if cal is not None:
        section = calibration_summary(cal)
        section["path"] = os.fspath(calibration)
        if counts is not None and surrogate is not None:
            section["check"] = calibration_check(calibration, counts, surrogate, data_root, key)
        report["calibration"] = section
    if monitor is not None:
        section = monitor_summary(load_monitor(monitor))
        section["path"] = os.fspath(monitor)
        report["monitor"] = section
    report["_curves"] = {r["label"]: curve(r["rows"]) for r in runs}
    report["_samples"] = {
        r["label"]: [x["n_samples"] for x in r["rows"]]
        for r in runs
        if summaries[r["label"]]["samples"]["all"] is not None
    }
    return report


def curve(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy as a step function of the radius: (radii, accuracy at each radius)."""
    radius = np.sort(np.array([r["radius"] for r in rows if r["correct"] and r["predict"] >= 0], dtype=float))
    n = len(rows)
    top = float(radius.max()) if radius.size else 1.0
    grid = np.linspace(0.0, top * 1.05 + 1e-9, 400)
    # accuracy(r) = #{correct with radius >= r} / n
    acc = (radius.size - np.searchsorted(radius, grid, side="left")) / n
    return grid, acc


def calibration_check(
    calibration: str | os.PathLike,
    counts: str | os.PathLike,
    surrogate: str | os.PathLike,
    data_root: str | None = None,
    key: bytes | None = None,
) -> dict:
    """Calibrated surrogate radii on a held-out split against that split's MC reference.

    For each image of ``counts`` (normally the test split; never the calibration counts, nor images
    the surrogate was trained on): the surrogate's class A, probability p~ and calibrated radius R^
    (``calibration.conformal.deployed_radius``); the reference y from the counts of A
    (``check_against_reference``). The counts are refused unless ``held_out_counts`` accepts them.
    """
    model = Surrogate.load(surrogate, key=key)
    cal = load_artifact(calibration, surrogate=model, key=key)
    held_out = held_out_counts(counts, model, cal, key=key)
    attrs = held_out.attrs
    images = held_out.images(data_root)
    predicted, p_tilde, z = model.predict_z(images)
    predicted = np.asarray(predicted)
    calibrated = deployed_radius(cal, predicted, p_tilde, z)
    counts_top = held_out.counts[np.arange(len(predicted)), predicted]
    check = check_against_reference(
        p_tilde,
        calibrated,
        counts_top,
        int(attrs["n"]),
        cal.sigma,
        cal.epsilon,
        cal.alpha_mc,
        guarantee=cal.guarantee if cal.method != "ltt" else "issued",
        slack=held_out.radius_slack,
    )
    check.update(counts_path=os.fspath(counts), split=str(attrs["split"]), n=int(attrs["n"]))
    return check


def held_out_counts(counts: str | os.PathLike, model: Surrogate, cal, key: bytes | None = None):
    """The counts file of the held-out check, read and refused unless it fits (``CalibrationError``).

    It must be a complete, self-consistent counts file (``read_counts``), not the calibration's own
    images (``Calibration.check_fresh``), of the calibration's dataset, sigma, classes, image shape and
    base model, without images the surrogate was trained on, and signed when a key is configured
    (``check_counts_for``). ``calibrate --report-counts`` calls it before anything is written.
    """
    held_out = read_counts(counts)
    attrs = held_out.attrs
    cal.check_fresh(
        dataset=str(attrs["dataset"]),
        split=str(attrs["split"]),
        counts_sha256=sha256_file(counts),
        what=os.fspath(counts),
    )
    try:
        check_counts_for(
            held_out,
            counts,
            dataset=cal.dataset or model.meta.get("dataset"),
            sigma=cal.sigma,
            num_classes=cal.num_classes,
            input_shape=model.input_shape,
            model_sha256=cal.base_model_sha256 or model.meta.get("base_model_sha256"),
            complete=True,
            excluded_indices=model.meta.get("train_index_ranges"),
            key=key,
            noise_scheme=cal.noise_scheme or NOISE_SCHEME_V2,
        )
    except CountsMismatchError as exc:
        raise CalibrationError(f"the held-out check: {exc}") from None
    return held_out


def check_against_reference(
    p_surrogate,
    calibrated_radius,
    counts_top,
    n: int,
    sigma: float,
    epsilon: float,
    alpha_mc: float,
    guarantee: str = "marginal",
    *,
    slack: float = 0.0,
) -> dict:
    """The held-out check on numbers: calibrated radii ``R^`` against the MC reference radii ``y``.

    ``counts_top[i]`` is how often the base model returned the surrogate's class among ``n`` noisy
    evaluations of image ``i``. ``y = max(sigma Phi^-1(pL), 0)``, ``pL`` the one-sided
    Clopper-Pearson bound at ``alpha_mc`` (DESIGN.md). A marginal or PAC calibration promises
    ``P(R^ > y) <= epsilon`` over all images, certified or not, so the count of ``R^ > y`` should not
    exceed the 0.999-quantile of ``Binomial(images, epsilon)`` (the allowance) but in one time out of a
    thousand; the ``issued`` guarantee promises it among certified images, so there the allowance is
    that of ``Binomial(certified images, epsilon)``. Both rates are reported.
    """
    p_surrogate = np.asarray(p_surrogate, dtype=float)
    calibrated_radius = np.asarray(calibrated_radius, dtype=float)
    counts_top = np.asarray(counts_top, dtype=float)
    reference = np.atleast_1d(stats.reference_radius(counts_top, n, alpha_mc, sigma, slack=slack))
    above = (calibrated_radius > 0) & (calibrated_radius > reference)
    m = int(above.size)
    certified = int((calibrated_radius > 0).sum())
    allowance = stats.binomial_allowance(certified if guarantee == "issued" else m, epsilon)
    return dict(
        num_images=m,
        num_above=int(above.sum()),
        rate_above=float(above.mean()) if m else None,
        rate_above_among_certified=float(above.sum() / certified) if certified else None,
        guarantee=guarantee,
        bound=float(epsilon),
        allowance=allowance,
        within_bound=bool(above.sum() <= allowance),
        share_certified=float((calibrated_radius > 0).mean()) if m else None,
        points=dict(
            p_surrogate=p_surrogate.tolist(),
            p_mc=(counts_top / n).tolist(),
            calibrated_radius=calibrated_radius.tolist(),
            reference_radius=np.atleast_1d(reference).tolist(),
            above_reference=above.tolist(),
        ),
    )


# --------------------------------------------------------------------------- environment


def _version(module: str) -> str | None:
    try:
        return version(module)
    except PackageNotFoundError:  # not installed: reported as None
        return None


def environment(runs: Sequence[dict] = (), cal: dict | None = None) -> dict:
    """Versions, the device of this machine, and per results file its seed, device and command."""
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    env = dict(
        python=sys.version.split()[0],
        platform=platform.platform(),
        device=device,
        cpu_count=os.cpu_count(),
        torch_threads=threads,
        versions={
            name: _version(dist)
            for name, dist in (
                ("surrogate-cert", "surrogate-cert"),
                ("torch", "torch"),
                ("torchvision", "torchvision"),
                ("mapie", "mapie"),
                ("h5py", "h5py"),
                ("numpy", "numpy"),
                ("scipy", "scipy"),
                ("scikit-learn", "scikit-learn"),
                ("matplotlib", "matplotlib"),
            )
        },
        files={
            r["label"]: dict(
                path=r["path"],
                seed=r["header"].get("seed"),
                device=r["header"].get("device"),
                sigma=r["header"].get("sigma"),
                header=r["comments"],
            )
            for r in runs
        },
    )
    if cal is not None:
        env["calibration_file"] = {
            k: cal[k] for k in cal if any(s in k for s in ("sha", "version", "seed", "command", "created"))
        }
    return env


# --------------------------------------------------------------------------- tables as data


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:,.3f}" if seconds < 0.01 else f"{1000 * seconds:,.1f}"


def _m(stat: dict | None, key: str = "mean") -> str:
    return "n/a" if stat is None or stat[key] is None else f"{stat[key]:,.1f}"


Table = tuple[list[str], list[list[str]]]
"""One table: its header and its rows, all strings."""


def tables(report: dict) -> dict[str, Table]:
    """Every table of the report as (header, rows) of strings: the one source for HTML and Markdown."""
    out: dict[str, Table] = {}
    if report["runs"]:
        out.update(_run_tables(report["runs"], report["radii"]))
    am = report.get("amortisation")
    if am and am.get("per_run"):
        out["amortisation"] = _amortisation_table(am)
    if report.get("calibration"):
        out.update(_calibration_tables(report["calibration"]))
    if report.get("monitor"):
        out.update(_monitor_tables(report["monitor"]))
    out["environment"] = _environment_table(report["environment"])
    return out


def _run_tables(runs: dict, radii) -> dict[str, Table]:
    """Per results file: certified accuracy per radius, cost in samples, and per-query figures."""
    out: dict[str, Table] = {}
    out["accuracy"] = (
        ["results"] + [f"r = {r:g}" for r in radii] + ["ACR"],
        [[label] + [_pct(a) for a in s["certified_accuracy"]] + [_fmt(s["acr"])] for label, s in runs.items()],
    )
    out["cost"] = (
        [
            "method",
            "certified accuracy",
            "ACR",
            "mean samples (all)",
            "mean samples (certified)",
            "mean samples (rest)",
        ],
        [
            [
                label,
                _pct(s["certified_accuracy"][0]),
                _fmt(s["acr"]),
                _m(s["samples"]["all"]),
                _m(s["samples"]["certified"]),
                _m(s["samples"]["rest"]),
            ]
            for label, s in runs.items()
        ],
    )
    methods = sorted({m for s in runs.values() for m in s["share_by_method"]})
    out["per_query"] = (
        [
            "results",
            "inputs",
            "median samples (all / certified / rest)",
            "mean ms / query",
            "median ms / query",
            "images / s",
        ]
        + [f"share {m}" for m in methods],
        [
            [
                label,
                _fmt(s["num_inputs"]),
                " / ".join(_m(s["samples"][k], "median") for k in ("all", "certified", "rest")),
                _ms(s["seconds_per_query"]["mean"]),
                _ms(s["seconds_per_query"]["median"]),
                _fmt(s["images_per_second"], 1),
            ]
            + [_pct(s["share_by_method"].get(m, 0.0)) for m in methods]
            for label, s in runs.items()
        ],
    )
    return out


def _amortisation_table(am: dict) -> Table:
    """Evaluations per query against the baseline, and the queries after which training paid off."""
    return (
        ["results", "evaluations / query", f"saved / query vs {am['baseline']}", "speed-up", "break-even queries"],
        [
            [
                label,
                _fmt(v["mean_evaluations_per_query"], 1),
                _fmt(v["saved_per_query"], 1),
                "n/a" if v["speedup"] is None else f"{v['speedup']:,.1f}x",
                _fmt(v["break_even_queries"], 0) if v["break_even_queries"] is not None else "n/a",
            ]
            for label, v in am["per_run"].items()
        ],
    )


def _calibration_tables(cal: dict) -> dict[str, Table]:
    """The calibration's parameters and diagnostics, its groups, and its check on test images."""
    out: dict[str, Table] = {}
    params = [
        ["epsilon", _fmt(cal["epsilon"], 4)],
        ["alpha_mc", _fmt(cal["alpha_mc"], 4)],
        ["delta", _fmt(cal["delta"], 4)],
        ["guarantee", _fmt(cal["guarantee"])],
        ["method", _fmt(cal["method"])],
        ["groups", _fmt(cal["groups"])],
        ["sigma", _fmt(cal["sigma"], 4)],
        ["calibration size (images)", _fmt(cal["calibration_size"])],
        ["noisy samples per calibration image", _fmt(cal["n_cal"])],
        ["smallest group with its own q^", _fmt(cal["min_group_size"])],
        [
            "radius cap before the offset (largest reference radius n_cal samples can show)",
            _fmt(cal["radius_cap"], 4),
        ],
        ["bound on wrong surrogate certificates (epsilon + alpha_mc)", _fmt(cal["bound"], 4)],
        ["what the bound means", _fmt(cal.get("statement"))],
    ]
    diag = cal["diagnostics"]
    for key, text in (
        ("certified_share", "share certified by the surrogate (calibration set)"),
        ("violation_rate", "rate of calibrated radius > reference (calibration set, in-sample)"),
        (
            "violation_rate_among_certified",
            "the same among certified calibration points (in-sample; the issued guarantee's rate)",
        ),
        ("mean_certified_radius", "mean calibrated radius of certified inputs"),
        ("surrogate_agrees_with_counts", "surrogate class = MC argmax (calibration set)"),
        ("mapie_interval_coverage", "MAPIE interval coverage (calibration set)"),
    ):
        if key in diag:
            params.append([text, _fmt(diag[key], 4)])
    out["calibration"] = (["parameter", "value"], params)
    out["groups"] = (
        ["group", "q^", "calibration images", "too small: never certified by the surrogate"],
        _group_rows(cal),
    )
    check = cal.get("check")
    if check:
        out["check"] = (
            [
                "test images",
                "calibrated radius > MC reference",
                "empirical rate",
                "bound (epsilon)",
                "binomial 0.999 allowance",
                "within bound",
                "certified by surrogate",
            ],
            [
                [
                    _fmt(check["num_images"]),
                    _fmt(check["num_above"]),
                    _fmt(check["rate_above"], 4),
                    _fmt(check["bound"], 4),
                    _fmt(check["allowance"]),
                    str(check["within_bound"]),
                    _pct(check["share_certified"]),
                ]
            ],
        )
    return out


def _monitor_tables(mon: dict) -> dict[str, Table]:
    """The drift monitor's run and, with one, the certificate audit's."""
    out: dict[str, Table] = {}
    alarm = f"yes, at query {mon['drift_alarm_at']:,}" if mon["drift_alarm"] else "no"
    out["monitor"] = (
        ["drift monitor", "value"],
        [
            ["queries", _fmt(mon["queries"])],
            ["reference (calibration images)", _fmt(mon["reference_size"])],
            ["false-alarm probability delta (whole stream)", _fmt(mon["delta"], 4)],
            ["alarm level log(1/delta)", _fmt(mon["log_threshold"])],
            [
                "log martingale: final / largest",
                f"{_fmt(mon['log_martingale'])} / {_fmt(mon['max_log_martingale'])}",
            ],
            ["drift alarm", alarm],
            ["one-pass certificates issued", _fmt(mon["one_pass_certificates"])],
        ]
        + [[f"route {k}", _fmt(v)] for k, v in mon["routes"].items()],
    )
    audit = mon.get("audit")
    if audit:
        out["audit"] = (
            [
                "audit rate",
                "audited",
                "re-checked (R^ > 0)",
                "R^ > reference",
                "rate",
                "confidence sequence",
                "threshold",
                "alarm",
                "base-model evaluations",
            ],
            [
                [
                    _fmt(audit["rate"], 4),
                    _fmt(audit["audited"]),
                    _fmt(audit["sampled"]),
                    _fmt(audit["exceedances"]),
                    _fmt(audit["rate_observed"], 4),
                    f"[{_fmt(audit['lower'], 4)}, {_fmt(audit['upper'], 4)}]",
                    _fmt(audit["threshold"], 4),
                    f"yes, at query {audit['alarm_at']:,}" if audit["alarm"] else "no",
                    _fmt(audit["base_model_evaluations"]),
                ]
            ],
        )
    return out


def _environment_table(env: dict) -> Table:
    """Where the report was made: device, Python, platform, versions, and each results file's settings."""
    return (
        ["item", "value"],
        [
            ["device (this report)", _fmt(env["device"])],
            ["python", env["python"]],
            ["platform", env["platform"]],
            ["CPU cores / torch threads", f"{env['cpu_count']} / {env['torch_threads']}"],
        ]
        + [[name, _fmt(v)] for name, v in env["versions"].items()]
        + [
            [f"{label}: seed / device / sigma", f"{_fmt(f['seed'])} / {_fmt(f['device'])} / {_fmt(f['sigma'])}"]
            for label, f in env["files"].items()
        ],
    )


def _group_rows(cal: dict) -> list[list[str]]:
    q_hat = cal["q_hat"] or {}
    sizes = cal["group_sizes"] or {}
    pooled = {str(g) for g in (cal["fallback_groups"] or [])}
    rows = [
        [
            str(g),
            "inf (never certifies)" if q is None or str(g) in pooled else _fmt(float(q), 4),
            _fmt(sizes.get(g)),
            "yes" if str(g) in pooled else "no",
        ]
        for g, q in q_hat.items()
    ]
    if len(q_hat) != 1 or cal["groups"] not in (None, "none"):
        q = cal["pooled_q_hat"]
        rows.append(
            [
                "pooled (all)",
                "inf (never certifies)" if q is None else _fmt(float(q), 4),
                _fmt(cal["calibration_size"]),
                "",
            ]
        )
    return rows
