"""Comparison and calibration reports: one self-contained HTML file, plus Markdown and JSON beside it.

``write_report(results, out, ...)`` reads results TSVs (one per certifier run) and writes ``out``
(HTML, plots embedded as base64 PNG data URIs from matplotlib's Agg backend, so it opens offline),
``out`` with suffix ``.md`` and ``out`` with suffix ``.json``. Sections:

- certified accuracy vs radius (one curve per file) and a table at fixed radii, average certified
  radius (ACR: mean over all inputs of the radius of correct certificates, 0 otherwise);
- cost: base-model evaluations per query over all inputs / certified inputs / the rest (the table
  format of the Halt Fast paper: method, certified accuracy, ACR, mean samples all / certified /
  rest), medians, wall time per query, share certified by each path, a histogram of samples;
- calibration (when a calibration JSON is given): its parameters, q^ per group and group sizes; with
  the test split's MC counts and the surrogate, the empirical rate of calibrated surrogate radii
  above the MC reference against its bound, and a scatter of surrogate vs MC probability;
- amortisation: offline evaluations, evaluations saved per query against the costliest run
  (normally Cohen), and the number of queries after which the offline stage has paid for itself;
- environment: versions, device, seeds and the command that produced each file.

All numbers are computed by ``build_report`` (a plain dict, also the JSON), so the HTML and Markdown
renderers only format.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from surrogate_cert.certificate import certified_accuracy, read_tsv, read_tsv_comments
from surrogate_cert.errors import InvalidInputError, InvalidParameterError

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


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Each results TSV as ``{"label", "path", "rows", "comments", "header"}``; labels are file stems."""
    if not paths:
        raise InvalidParameterError("give at least one results TSV, e.g. --results cohen.tsv hybrid.tsv")
    stems = [Path(p).stem for p in paths]
    runs = []
    for path, stem in zip(paths, stems):
        rows = read_tsv(path)
        if not rows:
            raise InvalidInputError(f"{path} has no result rows; re-run the certifier that wrote it")
        comments = read_tsv_comments(path)
        label = stem if stems.count(stem) == 1 else os.fspath(path)
        runs.append(dict(label=label, path=os.fspath(path), rows=rows, comments=comments,
                         header=parse_header(comments)))
    return runs


def load_calibration(path: str | os.PathLike) -> dict:
    """The calibration JSON as a dict, after ``artifact.load_calibration`` has checked its integrity.

    A tampered file is refused (``CalibrationError``) rather than reported as if it were valid.
    """
    from .artifact import load_calibration as load_artifact

    return load_artifact(path).to_dict()


def offline_evaluations_from_counts(paths: Sequence[str | os.PathLike]) -> int:
    """Base-model evaluations spent to make counts files: committed rows x (n + n0), summed."""
    from data_gen.store import read_attrs

    total = 0
    for path in paths:
        attrs = read_attrs(path)
        total += int(attrs["rows"]) * (int(attrs["n"]) + int(attrs.get("n0") or 0))
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
            break_even_queries=(offline_evaluations / saved)
            if offline_evaluations is not None and saved > 0 else None,
        )
    return dict(offline_evaluations=offline_evaluations, baseline=baseline,
                baseline_mean_evaluations_per_query=base_mean, per_run=per_run)


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
        diagnostics=cal.get("diagnostics") or {},
        raw=cal,
    )


def build_report(
    results: Sequence[str | os.PathLike],
    calibration: str | os.PathLike | None = None,
    counts: str | os.PathLike | None = None,
    surrogate: str | os.PathLike | None = None,
    offline_evaluations: int | None = None,
    baseline: str | None = None,
    data_root: str | None = None,
) -> dict:
    """All numbers of the report as one JSON-ready dict (see the module docstring)."""
    runs = load_results(results) if results else []
    cal = load_calibration(calibration) if calibration is not None else None
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
    )
    if cal is not None:
        section = calibration_summary(cal)
        section["path"] = os.fspath(calibration)
        if counts is not None and surrogate is not None:
            section["check"] = calibration_check(calibration, counts, surrogate, data_root)
        report["calibration"] = section
    report["_curves"] = {r["label"]: _curve(r["rows"]) for r in runs}
    report["_samples"] = {r["label"]: [x["n_samples"] for x in r["rows"]] for r in runs
                          if summaries[r["label"]]["samples"]["all"] is not None}
    return report


def _curve(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Certified accuracy as a step function of the radius: (radii, accuracy at each radius)."""
    radius = np.sort(np.array([r["radius"] for r in rows if r["correct"] and r["predict"] >= 0], dtype=float))
    n = len(rows)
    top = float(radius.max()) if radius.size else 1.0
    grid = np.linspace(0.0, top * 1.05 + 1e-9, 400)
    # accuracy(r) = #{correct with radius >= r} / n
    acc = (radius.size - np.searchsorted(radius, grid, side="left")) / n
    return grid, acc


def calibration_check(calibration: str | os.PathLike, counts: str | os.PathLike,
                      surrogate: str | os.PathLike, data_root: str | None = None) -> dict:
    """Calibrated surrogate radii on a held-out split against that split's MC reference.

    For each image of ``counts`` (normally the test split; never the calibration counts): the
    surrogate's class A, probability p~ and calibrated radius R^ (``calibration.conformal.
    deployed_radius``); the reference y from the counts of A (``check_against_reference``).
    """
    from data_gen.datasets import load_split
    from data_gen.store import read_counts
    from surrogate_cert.errors import CalibrationError
    from surrogate_cert.hashing import sha256_file
    from surrogate_cert.surrogate import Surrogate

    from .artifact import load_calibration as load_artifact
    from .conformal import deployed_radius

    model = Surrogate.load(surrogate)
    cal = load_artifact(calibration, surrogate=model)
    held_out = read_counts(counts)
    attrs = held_out.attrs
    if cal.counts_sha256 and cal.counts_sha256 == sha256_file(counts):
        raise CalibrationError(f"{counts} is the calibration split itself; check on the test split's counts")
    if int(attrs["num_classes"]) != cal.num_classes or not math.isclose(float(attrs["sigma"]), cal.sigma):
        raise CalibrationError(f"{counts} was made at sigma={attrs['sigma']} with {attrs['num_classes']} classes, "
                               f"the calibration at sigma={cal.sigma} with {cal.num_classes}; use matching counts")
    images = load_split(str(attrs["dataset"]), str(attrs["split"]), data_root=data_root).take(held_out.indices).x
    predicted, p_tilde = model.predict(images)
    predicted = np.asarray(predicted)
    calibrated = deployed_radius(cal, predicted, p_tilde)
    counts_top = held_out.counts[np.arange(len(predicted)), predicted]
    check = check_against_reference(p_tilde, calibrated, counts_top, int(attrs["n"]), cal.sigma,
                                    cal.epsilon, cal.alpha_mc)
    check.update(counts_path=os.fspath(counts), split=str(attrs["split"]), n=int(attrs["n"]))
    return check


def check_against_reference(p_surrogate, calibrated_radius, counts_top, n: int, sigma: float,
                            epsilon: float, alpha_mc: float) -> dict:
    """The held-out check on numbers: calibrated radii ``R^`` against the MC reference radii ``y``.

    ``counts_top[i]`` is how often the base model returned the surrogate's class among ``n`` noisy
    evaluations of image ``i``. ``y = max(sigma Phi^-1(pL), 0)``, ``pL`` the one-sided
    Clopper-Pearson bound at ``alpha_mc`` (DESIGN.md). Calibration promises ``P(R^ > y) <= epsilon``
    marginally, so the count of ``R^ > y`` should not exceed the 0.999-quantile of
    ``Binomial(images, epsilon)`` (the allowance) but in one time out of a thousand.
    """
    from scipy import stats as st

    from surrogate_cert import stats

    p_surrogate = np.asarray(p_surrogate, dtype=float)
    calibrated_radius = np.asarray(calibrated_radius, dtype=float)
    counts_top = np.asarray(counts_top, dtype=float)
    reference = np.maximum(stats.radius(stats.lower_confidence_bound(counts_top, n, alpha_mc), sigma), 0.0)
    above = (calibrated_radius > 0) & (calibrated_radius > reference)
    m = int(above.size)
    allowance = int(st.binom.ppf(0.999, m, epsilon)) if m else 0
    return dict(
        num_images=m,
        num_above=int(above.sum()),
        rate_above=float(above.mean()) if m else None,
        bound=float(epsilon),
        allowance=allowance,
        within_bound=bool(above.sum() <= allowance),
        share_certified=float((calibrated_radius > 0).mean()) if m else None,
        points=dict(p_surrogate=p_surrogate.tolist(), p_mc=(counts_top / n).tolist(),
                    calibrated_radius=calibrated_radius.tolist(), reference_radius=np.atleast_1d(reference).tolist(),
                    above_reference=above.tolist()),
    )


# --------------------------------------------------------------------------- environment

def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed: reported as None
        return None


def environment(runs: Sequence[dict] = (), cal: dict | None = None) -> dict:
    """Versions, the device of this machine, and per results file its seed, device and command."""
    try:
        import torch

        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
        threads = torch.get_num_threads()
    except Exception:  # torch missing or broken: the report still renders
        device, threads = None, None
    env = dict(
        python=sys.version.split()[0],
        platform=platform.platform(),
        device=device,
        cpu_count=os.cpu_count(),
        torch_threads=threads,
        versions={name: _version(dist) for name, dist in (
            ("surrogate-cert", "surrogate-cert"), ("torch", "torch"), ("torchvision", "torchvision"),
            ("mapie", "mapie"), ("h5py", "h5py"), ("numpy", "numpy"), ("scipy", "scipy"),
            ("scikit-learn", "scikit-learn"), ("matplotlib", "matplotlib"))},
        files={r["label"]: dict(path=r["path"], seed=r["header"].get("seed"),
                                device=r["header"].get("device"), sigma=r["header"].get("sigma"),
                                header=r["comments"]) for r in runs},
    )
    if cal is not None:
        env["calibration_file"] = {k: cal[k] for k in cal
                                   if any(s in k for s in ("sha", "version", "seed", "command", "created"))}
    return env


# --------------------------------------------------------------------------- figures

def _png(fig) -> str:
    """A matplotlib figure as a base64 PNG (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def figure_certified_accuracy(curves: dict, sigma: float | None) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (grid, acc) in curves.items():
        ax.step(grid, acc, where="post", label=label)
    ax.set_xlabel("radius (l2, input units)" + (f"; sigma = {sigma:g}" if sigma else ""))
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def figure_samples_histogram(samples: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    top = max(max(v) for v in samples.values()) if samples else 1
    bins = np.concatenate([[0, 1], np.geomspace(1, max(top, 2) * 1.01, 40)[1:]])
    for label, values in samples.items():
        ax.hist(np.asarray(values, dtype=float), bins=bins, histtype="step", linewidth=1.5, label=label)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("base-model evaluations for one input (0 = surrogate only)")
    ax.set_ylabel("inputs")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def figure_calibration_scatter(check: dict) -> str:
    """Left: surrogate probability vs MC estimate; right: calibrated vs MC reference radius."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.4))
    points = check["points"]
    p_mc = np.asarray(points["p_mc"], dtype=float)
    p_sur = np.asarray(points["p_surrogate"], dtype=float)
    above = np.asarray(points["above_reference"], dtype=bool)
    calibrated = np.asarray(points["calibrated_radius"], dtype=float)
    reference = np.asarray(points["reference_radius"], dtype=float)
    for ax, xs, ys in ((left, p_mc, p_sur), (right, reference, calibrated)):
        ax.scatter(xs[~above], ys[~above], s=8, alpha=0.6, label="calibrated radius <= reference")
        ax.scatter(xs[above], ys[above], s=14, color="crimson", label="calibrated radius > reference")
        ax.grid(alpha=0.3)
    left.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    left.set_xlabel("MC estimate of p_A (test counts)")
    left.set_ylabel("surrogate probability p~_A")
    left.set_xlim(0, 1.01)
    left.set_ylim(0, 1.01)
    left.legend(fontsize=8)
    top = max(float(np.max(reference, initial=0)), float(np.max(calibrated, initial=0)), 1e-3) * 1.05
    right.plot([0, top], [0, top], color="grey", linewidth=0.8)
    right.axhline(0, color="black", linewidth=0.6)
    right.set_xlabel("MC reference radius y (Clopper-Pearson at alpha_mc)")
    right.set_ylabel("calibrated surrogate radius R^ (certified if > 0)")
    right.set_xlim(0, top)
    return _png(fig)


# --------------------------------------------------------------------------- rendering

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
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.2e}"
    return str(value)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:,.3f}" if seconds < 0.01 else f"{1000 * seconds:,.1f}"


def _m(stat: dict | None, key: str = "mean") -> str:
    return "n/a" if stat is None or stat[key] is None else f"{stat[key]:,.1f}"


def tables(report: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every table of the report as (header, rows) of strings: the one source for HTML and Markdown."""
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    runs = report["runs"]
    if runs:
        radii = report["radii"]
        out["accuracy"] = (
            ["results"] + [f"r = {r:g}" for r in radii] + ["ACR"],
            [[label] + [_pct(a) for a in s["certified_accuracy"]] + [_fmt(s["acr"])] for label, s in runs.items()],
        )
        out["cost"] = (
            ["method", "certified accuracy", "ACR", "mean samples (all)", "mean samples (certified)",
             "mean samples (rest)"],
            [[label, _pct(s["certified_accuracy"][0]), _fmt(s["acr"]), _m(s["samples"]["all"]),
              _m(s["samples"]["certified"]), _m(s["samples"]["rest"])] for label, s in runs.items()],
        )
        methods = sorted({m for s in runs.values() for m in s["share_by_method"]})
        out["per_query"] = (
            ["results", "inputs", "median samples (all / certified / rest)", "mean ms / query",
             "median ms / query", "images / s"] + [f"share {m}" for m in methods],
            [[label, _fmt(s["num_inputs"]),
              " / ".join(_m(s["samples"][k], "median") for k in ("all", "certified", "rest")),
              _ms(s["seconds_per_query"]["mean"]), _ms(s["seconds_per_query"]["median"]),
              _fmt(s["images_per_second"], 1)]
             + [_pct(s["share_by_method"].get(m, 0.0)) for m in methods] for label, s in runs.items()],
        )
    am = report.get("amortisation")
    if am and am.get("per_run"):
        out["amortisation"] = (
            ["results", "evaluations / query", f"saved / query vs {am['baseline']}", "speed-up",
             "break-even queries"],
            [[label, _fmt(v["mean_evaluations_per_query"], 1), _fmt(v["saved_per_query"], 1),
              "n/a" if v["speedup"] is None else f"{v['speedup']:,.1f}x",
              _fmt(v["break_even_queries"], 0) if v["break_even_queries"] is not None else "n/a"]
             for label, v in am["per_run"].items()],
        )
    cal = report.get("calibration")
    if cal:
        params = [["epsilon", _fmt(cal["epsilon"], 4)], ["alpha_mc", _fmt(cal["alpha_mc"], 4)],
                  ["delta", _fmt(cal["delta"], 4)], ["guarantee", _fmt(cal["guarantee"])],
                  ["method", _fmt(cal["method"])], ["groups", _fmt(cal["groups"])],
                  ["sigma", _fmt(cal["sigma"], 4)], ["calibration size (images)", _fmt(cal["calibration_size"])],
                  ["noisy samples per calibration image", _fmt(cal["n_cal"])],
                  ["smallest group with its own q^", _fmt(cal["min_group_size"])],
                  ["radius cap before the offset (largest reference radius n_cal samples can show)",
                   _fmt(cal["radius_cap"], 4)],
                  ["bound on wrong surrogate certificates (epsilon + alpha_mc)", _fmt(cal["bound"], 4)]]
        diag = cal["diagnostics"]
        for key, text in (("certified_share", "share certified by the surrogate (calibration set)"),
                          ("violation_rate", "rate of calibrated radius > reference (calibration set, in-sample)"),
                          ("mean_certified_radius", "mean calibrated radius of certified inputs"),
                          ("surrogate_agrees_with_counts", "surrogate class = MC argmax (calibration set)"),
                          ("mapie_interval_coverage", "MAPIE interval coverage (calibration set)")):
            if key in diag:
                params.append([text, _fmt(diag[key], 4)])
        out["calibration"] = (["parameter", "value"], params)
        out["groups"] = (["group", "q^", "calibration images", "uses pooled q^"], _group_rows(cal))
        check = cal.get("check")
        if check:
            out["check"] = (
                ["test images", "calibrated radius > MC reference", "empirical rate", "bound (epsilon)",
                 "binomial 0.999 allowance", "within bound", "certified by surrogate"],
                [[_fmt(check["num_images"]), _fmt(check["num_above"]), _fmt(check["rate_above"], 4),
                  _fmt(check["bound"], 4), _fmt(check["allowance"]), str(check["within_bound"]),
                  _pct(check["share_certified"])]],
            )
    env = report["environment"]
    out["environment"] = (
        ["item", "value"],
        [["device (this report)", _fmt(env["device"])], ["python", env["python"]], ["platform", env["platform"]],
         ["CPU cores / torch threads", f"{env['cpu_count']} / {env['torch_threads']}"]]
        + [[name, _fmt(v)] for name, v in env["versions"].items()]
        + [[f"{label}: seed / device / sigma",
            f"{_fmt(f['seed'])} / {_fmt(f['device'])} / {_fmt(f['sigma'])}"] for label, f in env["files"].items()],
    )
    return out


def _group_rows(cal: dict) -> list[list[str]]:
    q_hat = cal["q_hat"] or {}
    sizes = cal["group_sizes"] or {}
    pooled = {str(g) for g in (cal["fallback_groups"] or [])}
    rows = [[str(g), "inf (never certifies)" if q is None else _fmt(float(q), 4), _fmt(sizes.get(g)),
             "yes" if str(g) in pooled else "no"] for g, q in q_hat.items()]
    if len(q_hat) != 1 or cal["groups"] not in (None, "none"):
        q = cal["pooled_q_hat"]
        rows.append(["pooled (all)", "inf (never certifies)" if q is None else _fmt(float(q), 4),
                     _fmt(cal["calibration_size"]), ""])
    return rows


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "| " + " | ".join("---" for _ in header) + " |"] + [line(r) for r in rows])


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:.5em 0}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.note{color:#555;font-size:.92em}
"""

_NOTES = {
    "accuracy": "Share of all inputs whose certified class is correct with certified radius at least r "
                "(l2, input units). ACR: mean over all inputs of the radius of correct certificates (0 otherwise).",
    "cost": "Base-model evaluations per input, in the format of the Halt Fast tables: over all inputs, over "
            "certified inputs (a class and a radius > 0), over the rest (abstained). Certified accuracy at r = 0.",
    "per_query": "Medians of the same evaluations; wall time per query from each file's time column; "
                 "share of inputs decided by each path (surrogate: one pass, 0 evaluations; eprocess: "
                 "sequential; cohen: fixed sample; abstain: no certificate).",
    "amortisation": "Offline evaluations (counts for the surrogate's train and calibration splits) divided "
                    "by evaluations saved per query against the costliest run: the number of queries after "
                    "which the offline stage has paid for itself.",
    "check": "On the test split's MC counts (never used for calibration): how often the calibrated surrogate "
             "radius exceeds the Clopper-Pearson reference radius. Calibration bounds this rate by epsilon "
             "(marginally); the allowance is the 0.999-quantile of Binomial(images, epsilon).",
}


def render_html(report: dict, figures: dict[str, str], title: str = "surrogate-cert report") -> str:
    """The report as one HTML string; ``figures`` maps a section to a base64 PNG."""
    t = tables(report)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    sigma = report.get("sigma")
    if report["runs"]:
        parts.append("<p class='note'>Results: " + ", ".join(
            f"<code>{html.escape(f['path'])}</code>" for f in report["environment"]["files"].values())
            + (f"; sigma = {sigma:g}" if sigma else "") + ".</p>")

    def section(title_: str, keys: Sequence[str], figure_keys: Sequence[str] = ()):
        if not any(k in t for k in keys) and not any(k in figures for k in figure_keys):
            return
        parts.append(f"<h2>{html.escape(title_)}</h2>")
        for key in figure_keys:
            if key in figures:
                parts.append(f"<img alt='{key}' src='data:image/png;base64,{figures[key]}'>")
        for key in keys:
            if key in t:
                if key in _NOTES:
                    parts.append(f"<p class='note'>{html.escape(_NOTES[key])}</p>")
                parts.append(_html_table(*t[key]))

    section("Certified accuracy", ["accuracy"], ["certified_accuracy"])
    section("Cost", ["cost", "per_query"], ["samples_histogram"])
    cal = report.get("calibration")
    if cal:
        section("Calibration", ["calibration", "groups", "check"], ["calibration_scatter"])
        if cal.get("check") is None:
            parts.append("<p class='note'>No held-out check: pass the test split's counts and the surrogate "
                         "(--counts test.h5 --surrogate surrogate.pt) to measure calibrated radii against MC.</p>")
    am = report.get("amortisation")
    if am and am.get("per_run"):
        parts.append("<h2>Amortisation</h2>")
        parts.append(f"<p>Offline base-model evaluations: <b>{_fmt(am['offline_evaluations'])}</b>"
                     + ("" if am["offline_evaluations"] is not None else
                        " (pass --offline-evaluations N or --offline-counts train.h5 cal.h5)") + ".</p>")
        parts.append(f"<p class='note'>{html.escape(_NOTES['amortisation'])}</p>")
        parts.append(_html_table(*t["amortisation"]))
    parts.append("<h2>Environment</h2>")
    parts.append(_html_table(*t["environment"]))
    for label, f in report["environment"]["files"].items():
        if f["header"]:
            parts.append(f"<p><b>{html.escape(label)}</b> (<code>{html.escape(f['path'])}</code>)</p>"
                         f"<pre>{html.escape(chr(10).join(f['header']))}</pre>")
    if cal:
        parts.append(f"<p><b>calibration</b> (<code>{html.escape(cal['path'])}</code>)</p>"
                     f"<pre>{html.escape(json.dumps(_jsonable(cal['raw']), indent=1)[:20000])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(report: dict, title: str = "surrogate-cert report") -> str:
    """The report's tables as Markdown (the plots are in the HTML)."""
    t = tables(report)
    lines = [f"# {title}", ""]
    headings = [("accuracy", "Certified accuracy"), ("cost", "Cost"), ("per_query", "Per query"),
                ("calibration", "Calibration"), ("groups", "Calibration groups"),
                ("check", "Held-out check of the calibration"), ("amortisation", "Amortisation"),
                ("environment", "Environment")]
    for key, heading in headings:
        if key in t:
            lines += [f"## {heading}", ""]
            if key in _NOTES:
                lines += [_NOTES[key], ""]
            if key == "amortisation":
                lines += [f"Offline base-model evaluations: {_fmt(report['amortisation']['offline_evaluations'])}.", ""]
            lines += [_md_table(*t[key]), ""]
    for label, f in report["environment"]["files"].items():
        if f["header"]:
            lines += [f"`{label}` ({f['path']}):", "", "```"] + f["header"] + ["```", ""]
    return "\n".join(lines)


def _jsonable(value):
    """Replace inf/nan by None and NumPy scalars/arrays by Python ones, so json.dumps is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _figures(report: dict) -> dict[str, str]:
    figures = {}
    if report["_curves"]:
        figures["certified_accuracy"] = figure_certified_accuracy(report["_curves"], report.get("sigma"))
    if report["_samples"]:
        figures["samples_histogram"] = figure_samples_histogram(report["_samples"])
    cal = report.get("calibration")
    if cal and cal.get("check") and cal["check"].get("points"):
        figures["calibration_scatter"] = figure_calibration_scatter(cal["check"])
    return figures


def _write_all(report: dict, out: str | os.PathLike, title: str, inputs: Sequence, beside: str = "") -> dict[str, str]:
    out = Path(out)
    if not out.parent.is_dir():
        raise InvalidParameterError(f"output folder {out.parent} does not exist; create it first or choose another --out")
    if out.suffix.lower() not in (".html", ".htm"):
        raise InvalidParameterError(f"--out {out} must end in .html (the .md and .json are written beside it)")
    stem = out.with_suffix("")
    paths = dict(html=str(out), md=f"{stem}{beside}.md", json=f"{stem}{beside}.json")
    taken = {os.path.realpath(p) for p in inputs if p is not None}
    clash = [p for p in paths.values() if os.path.realpath(p) in taken]
    if clash:
        raise InvalidParameterError(f"writing the report would overwrite its input {clash[0]}; choose another --out")
    figures = _figures(report)
    contents = dict(html=render_html(report, figures, title), md=render_markdown(report, title),
                    json=json.dumps(_jsonable(report), indent=2, allow_nan=False))
    for key, path in paths.items():
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(contents[key])
        os.replace(tmp, path)
    return paths


def write_report(
    results: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    calibration: str | os.PathLike | None = None,
    counts: str | os.PathLike | None = None,
    surrogate: str | os.PathLike | None = None,
    offline_evaluations: int | None = None,
    baseline: str | None = None,
    title: str = "surrogate-cert report",
    data_root: str | None = None,
) -> dict[str, str]:
    """Write the comparison report for ``results`` to ``out`` (HTML) and ``.md`` / ``.json`` beside it.

    Returns the three paths. ``counts`` and ``surrogate`` (both or neither) add the held-out check of
    the calibration (images read from the dataset the counts file names, under ``data_root`` for
    torchvision sets); ``offline_evaluations`` the amortisation figures.
    """
    if (counts is None) != (surrogate is None):
        raise InvalidParameterError("the calibration check needs both --counts (test split) and --surrogate")
    if counts is not None and calibration is None:
        raise InvalidParameterError("--counts and --surrogate check a calibration: pass --calibration too")
    report = build_report(results, calibration, counts, surrogate, offline_evaluations, baseline, data_root)
    return _write_all(report, out, title, [*results, calibration, counts, surrogate])


def write_calibration_report(
    calibration_path: str | os.PathLike,
    out: str | os.PathLike,
    counts: str | os.PathLike | None = None,
    surrogate: str | os.PathLike | None = None,
    data_root: str | None = None,
) -> dict[str, str]:
    """The calibration section alone (``surrogate-cert calibrate --report``); returns the paths written.

    Beside ``out`` (``calibration.html``) go ``calibration.report.md`` and ``calibration.report.json``,
    so the report never replaces the calibration file it describes.
    """
    if (counts is None) != (surrogate is None):
        raise InvalidParameterError("the calibration check needs both the test counts and the surrogate")
    report = build_report([], calibration_path, counts, surrogate, data_root=data_root)
    return _write_all(report, out, "surrogate-cert calibration report", [calibration_path, counts, surrogate],
                      beside=".report")
