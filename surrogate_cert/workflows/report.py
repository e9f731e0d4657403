"""Rendering of the comparison and calibration reports: one self-contained HTML file (a Jinja2
template, figures embedded as base64 PNG so it opens offline), plus Markdown and JSON beside it.

The numbers and tables come from ``calibration.summary.build_report`` / ``tables`` and the figures
from ``calibration.figures``; this module only lays them out and writes the three files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from calibration.figures import figures as draw_figures
from calibration.summary import build_report, tables

from ..core.errors import InvalidParameterError
from ..core.files import commit_outputs

__all__ = [
    "write_report",
    "write_calibration_report",
    "write_monitor_report",
    "report_paths",
    "render_html",
    "render_markdown",
    "report_warnings",
    "NOTES",
]

NOTES = {
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
    "radius exceeds the Clopper-Pearson reference radius. A marginal or PAC calibration bounds this "
    "rate by epsilon over all test images, certified or not; the issued guarantee bounds it among the "
    "certified ones. The allowance is the 0.999-quantile of Binomial(images, epsilon), over certified "
    "images for the issued guarantee.",
    "monitor": "Drift monitor: a conformal test martingale on the surrogate's class and confidence of each query, "
    "against the calibration images and every earlier query. If the queries are exchangeable with the "
    "calibration images, the probability that it ever reaches the alarm level is at most delta.",
    "audit": "Audit: a random share of the queries re-checked with n_cal base-model samples; the rate at which the "
    "one-pass radius exceeds the audit's reference radius, with a confidence sequence valid at all times. "
    "The alarm is raised when the sequence lies above the threshold (the upper quantile of the rate a "
    "correct calibration can show).",
}
"""What each table shows, printed above it in HTML and Markdown."""

_SECTIONS = (
    # (title, table keys, figure keys)
    ("Certified accuracy", ("accuracy",), ("certified_accuracy",)),
    ("Cost", ("cost", "per_query"), ("samples_histogram",)),
    ("Calibration", ("calibration", "groups", "check"), ("calibration_scatter",)),
    ("Amortisation", ("amortisation",), ()),
    ("Deployment monitor", ("monitor", "audit"), ("monitor",)),
    ("Environment", ("environment",), ()),
)

_MARKDOWN_HEADINGS = (
    ("accuracy", "Certified accuracy"),
    ("cost", "Cost"),
    ("per_query", "Per query"),
    ("calibration", "Calibration"),
    ("groups", "Calibration groups"),
    ("check", "Held-out check of the calibration"),
    ("amortisation", "Amortisation"),
    ("monitor", "Deployment monitor"),
    ("audit", "Audit of one-pass certificates"),
    ("environment", "Environment"),
)

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("surrogate_cert.workflows", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)


def _offline_line(report: dict) -> str:
    offline = report["amortisation"]["offline_evaluations"]
    if offline is None:
        return (
            "Offline base-model evaluations: not given (pass --offline-evaluations N or --offline-counts "
            "train.h5 cal.h5)."
        )
    return f"Offline base-model evaluations: {offline:,}."


def _sections(report: dict, figures: dict[str, str]) -> list[dict]:
    """The report as the template's sections: paragraphs, figures, tables with their notes."""
    t = tables(report)
    cal = report.get("calibration")
    out = []
    for title, table_keys, figure_keys in _SECTIONS:
        section = dict(
            title=title,
            paragraphs=[_offline_line(report)] if title == "Amortisation" and "amortisation" in t else [],
            figures=[(k, figures[k]) for k in figure_keys if k in figures],
            tables=[dict(note=NOTES.get(k), header=t[k][0], rows=t[k][1]) for k in table_keys if k in t],
            notes=[],
            preformatted=[],
        )
        if title == "Calibration" and cal and cal.get("check") is None:
            section["notes"].append(
                "No held-out check: pass the test split's counts and the surrogate "
                "(--counts test.h5 --surrogate surrogate.pt) to measure calibrated radii "
                "against MC."
            )
        if title == "Environment":
            section["preformatted"] = [
                dict(label=label, path=f["path"], text="\n".join(f["header"]))
                for label, f in report["environment"]["files"].items()
                if f["header"]
            ]
            if cal:
                raw = dict(cal["raw"])
                if raw.get("monitor_reference"):  # thousands of numbers: summarised
                    raw["monitor_reference"] = (
                        f"{len(raw['monitor_reference'].get('p_tilde') or [])} calibration images"
                    )
                section["preformatted"].append(
                    dict(label="calibration", path=cal["path"], text=json.dumps(_jsonable(raw), indent=1)[:20000])
                )
        if section["figures"] or section["tables"]:
            out.append(section)
    return out


def report_warnings(report: dict) -> list[str]:
    """Sentences the report puts above its tables (and ``surrogate-cert report`` prints): runs on different images."""
    warning = (report.get("image_sets") or {}).get("warning")
    return [warning] if warning else []


def render_html(report: dict, figures: dict[str, str], title: str = "surrogate-cert report") -> str:
    """The report as one HTML string (Jinja2 template ``report.html.j2``, autoescaped)."""
    return _TEMPLATES.get_template("report.html.j2").render(
        title=title,
        sigma=report.get("sigma"),
        files=list(report["environment"]["files"].values()) if report["runs"] else [],
        sections=_sections(report, figures),
        warnings=report_warnings(report),
    )


def render_markdown(report: dict, title: str = "surrogate-cert report") -> str:
    """The report's tables as Markdown (the plots are in the HTML)."""
    t = tables(report)

    def row(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [f"# {title}", ""]
    lines += [line for warning in report_warnings(report) for line in (f"**Warning:** {warning}", "")]
    for key, heading in _MARKDOWN_HEADINGS:
        if key in t:
            header, rows = t[key]
            lines += [f"## {heading}", ""]
            if key in NOTES:
                lines += [NOTES[key], ""]
            if key == "amortisation":
                lines += [_offline_line(report), ""]
            lines += [row(header), "| " + " | ".join("---" for _ in header) + " |"] + [row(r) for r in rows] + [""]
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


def report_paths(out: str | os.PathLike, beside: str = "") -> dict[str, str]:
    """The three files of a report written to ``out``: ``html`` (``out``), ``md`` and ``json`` beside it.

    Parameters
    ----------
    out : str or os.PathLike
        The HTML file; must end in ``.html``.
    beside : str, optional
        Inserted before the ``.md`` / ``.json`` suffixes (``".report"`` for the calibration report).

    Returns
    -------
    dict of str to str
        Keyed ``html``, ``md`` and ``json``.

    Raises
    ------
    InvalidParameterError
        If ``out`` does not end in ``.html``.
    """
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise InvalidParameterError(f"--out {out} must end in .html (the .md and .json are written beside it)")
    stem = out.with_suffix("")
    return dict(html=str(out), md=f"{stem}{beside}.md", json=f"{stem}{beside}.json")


def _write_all(
    report: dict, out: str | os.PathLike, title: str, inputs: Sequence, beside: str = "", overwrite: bool = True
) -> dict[str, str]:
    out = Path(out)
    if not out.parent.is_dir():
        raise InvalidParameterError(
            f"output folder {out.parent} does not exist; create it first or choose another --out"
        )
    paths = report_paths(out, beside)
    taken = {os.path.realpath(p) for p in inputs if p is not None}
    clash = [p for p in paths.values() if os.path.realpath(p) in taken]
    if clash:
        raise InvalidParameterError(f"writing the report would overwrite its input {clash[0]}; choose another --out")
    contents = dict(
        html=render_html(report, draw_figures(report), title),
        md=render_markdown(report, title),
        json=json.dumps(_jsonable(report), indent=2, allow_nan=False),
    )
    # One output: the HTML (named by --out) is renamed into place last.
    commit_outputs({paths[k]: contents[k] for k in ("json", "md", "html")}, overwrite=overwrite)
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
    *,
    key: bytes | None = None,
    overwrite: bool = True,
    monitor: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the comparison report for ``results`` to ``out`` (HTML) and ``.md`` / ``.json`` beside it.

    ``counts`` and ``surrogate`` (both or neither) add the held-out check of the calibration
    (images read from the dataset the counts file names, under ``data_root`` for torchvision sets);
    ``offline_evaluations`` the amortisation figures.

    Parameters
    ----------
    results : sequence of str or os.PathLike
        Results TSVs, one run each (labelled by file stem).
    out : str or os.PathLike
        The HTML file; must end in ``.html`` and its folder must exist.
    calibration : str or os.PathLike, optional
        calibration.json, for the calibration section (refused if tampered).
    counts : str or os.PathLike, optional
        A held-out (test) counts file, for the calibration check.
    surrogate : str or os.PathLike, optional
        The surrogate checkpoint, for the calibration check.
    offline_evaluations : int, optional
        Base-model evaluations spent offline, for the amortisation figures.
    baseline : str, optional
        Label of the run the others are compared with.
    title : str, optional
        Title of the report.
    data_root : str, optional
        Folder of the torchvision datasets.
    key : bytes, optional
        Signing key the calibration must be signed with (default: the environment's, if any).
    overwrite : bool, optional
        Replace existing report files (default); if false, ``OutputExistsError`` when any of the
        three exists, and nothing is written.
    monitor : str or os.PathLike, optional
        A ``surrogate-cert monitor`` JSON, for the deployment-monitor section.

    Returns
    -------
    dict
        Paths written, keyed ``html``, ``md`` and ``json``; and ``warnings``, the sentences printed above
        the report's tables (``report_warnings``: runs that certified different images).

    Raises
    ------
    InvalidParameterError
        If only one of ``counts`` / ``surrogate`` is given, they come without ``calibration``,
        ``out`` is not an ``.html`` in an existing folder, an output would overwrite an input, or
        no results are given.
    InvalidInputError
        If a results file is unreadable or empty.
    CalibrationError
        If the calibration file is tampered with or does not match the surrogate or counts.
    """
    if (counts is None) != (surrogate is None):
        raise InvalidParameterError("the calibration check needs both --counts (test split) and --surrogate")
    if counts is not None and calibration is None:
        raise InvalidParameterError("--counts and --surrogate check a calibration: pass --calibration too")
    report = build_report(
        results, calibration, counts, surrogate, offline_evaluations, baseline, data_root, key=key, monitor=monitor
    )
    paths = _write_all(report, out, title, [*results, calibration, counts, surrogate, monitor], overwrite=overwrite)
    return {**paths, "warnings": report_warnings(report)}


def write_calibration_report(
    calibration_path: str | os.PathLike,
    out: str | os.PathLike,
    counts: str | os.PathLike | None = None,
    surrogate: str | os.PathLike | None = None,
    data_root: str | None = None,
    *,
    key: bytes | None = None,
    overwrite: bool = True,
) -> dict[str, str]:
    """The calibration section alone (``surrogate-cert calibrate --report``); returns the paths written.

    Beside ``out`` (``calibration.html``) go ``calibration.report.md`` and ``calibration.report.json``,
    so the report never replaces the calibration file it describes.

    Parameters
    ----------
    calibration_path : str or os.PathLike
        calibration.json (refused if tampered).
    out : str or os.PathLike
        The HTML file; must end in ``.html`` and its folder must exist.
    counts : str or os.PathLike, optional
        A held-out (test) counts file, for the calibration check (with ``surrogate``).
    surrogate : str or os.PathLike, optional
        The surrogate checkpoint, for the calibration check (with ``counts``).
    data_root : str, optional
        Folder of the torchvision datasets.
    key : bytes, optional
        Signing key the calibration must be signed with (default: the environment's, if any).
    overwrite : bool, optional
        Replace existing report files (default).

    Returns
    -------
    dict of str to str
        Paths written, keyed ``html``, ``md`` and ``json``.

    Raises
    ------
    InvalidParameterError
        If only one of ``counts`` / ``surrogate`` is given, ``out`` is not an ``.html`` in an
        existing folder, or an output would overwrite an input.
    CalibrationError
        If the calibration file is tampered with or does not match the surrogate or counts.
    """
    if (counts is None) != (surrogate is None):
        raise InvalidParameterError("the calibration check needs both the test counts and the surrogate")
    report = build_report([], calibration_path, counts, surrogate, data_root=data_root, key=key)
    return _write_all(
        report, out, "surrogate-cert calibration report", [calibration_path, counts, surrogate], beside=".report"
    )


def write_monitor_report(
    monitor: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = True
) -> dict[str, str]:
    """The deployment-monitor section alone (``surrogate-cert monitor --report``); returns the paths written.

    Beside ``out`` (``monitor.html``) go ``monitor.report.md`` and ``monitor.report.json``, so the
    report never replaces the monitor file it describes.

    Parameters
    ----------
    monitor : str or os.PathLike
        A ``surrogate-cert monitor`` JSON.
    out : str or os.PathLike
        The HTML file; must end in ``.html`` and its folder must exist.

    Returns
    -------
    dict of str to str
        Paths written, keyed ``html``, ``md`` and ``json``.

    Raises
    ------
    InvalidInputError
        If ``monitor`` is not a monitor JSON.
    InvalidParameterError
        If ``out`` is not an ``.html`` in an existing folder, or an output would overwrite the input.
    """
    report = build_report([], monitor=monitor)
    return _write_all(
        report, out, "surrogate-cert deployment monitor", [monitor], beside=".report", overwrite=overwrite
    )
