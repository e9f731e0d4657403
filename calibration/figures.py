"""The report's figures (matplotlib, Agg backend): each returns a base64 PNG for embedding.

``figures(report)`` draws every figure a ``calibration.summary.build_report`` dict calls for.
"""

from __future__ import annotations

import base64
import io

import matplotlib
import numpy as np

matplotlib.use("Agg", force=True)  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _png(fig) -> str:
    """A matplotlib figure as a base64 PNG (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure_certified_accuracy(curves: dict, sigma: float | None) -> str:
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


def figure_monitor(monitor: dict) -> str:
    """Left: the drift monitor's log martingale per query with its alarm level log(1/delta);
    right (with an audit): the audited rate's confidence sequence against the audit's threshold."""
    audit = monitor.get("audit")
    points = monitor.get("_audit_path") or []
    panels = 2 if audit and points else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels + 1.6, 4.0), squeeze=False)
    left = axes[0, 0]
    path = np.asarray(monitor.get("_path") or [], dtype=float)
    left.plot(np.arange(len(path)), path, linewidth=1.0, label="log martingale")
    left.axhline(
        monitor["log_threshold"],
        color="crimson",
        linestyle="--",
        linewidth=1.0,
        label=f"alarm level log(1/delta), delta = {monitor['delta']:g}",
    )
    if monitor.get("drift_alarm_at") is not None:
        left.axvline(
            monitor["drift_alarm_at"], color="grey", linewidth=0.8, label=f"alarm at query {monitor['drift_alarm_at']}"
        )
    left.set_xlabel("query")
    left.set_ylabel("log martingale (drift evidence)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if panels == 2:
        right = axes[0, 1]
        t = np.array([p["audited"] for p in points], dtype=float)
        rate = np.array([p["exceedances"] for p in points], dtype=float) / np.maximum(t, 1)
        right.fill_between(
            t,
            [p["lower"] for p in points],
            [p["upper"] for p in points],
            alpha=0.25,
            step="post",
            label=f"confidence sequence (level {audit['delta_sequence']:g})",
        )
        right.plot(t, rate, linewidth=1.0, label="audited rate of R^ > reference")
        right.axhline(audit["threshold"], color="crimson", linestyle="--", linewidth=1.0, label="threshold")
        right.set_xlabel("audited queries")
        right.set_ylabel("rate")
        right.set_ylim(0, min(1.0, max(0.05, 1.5 * max(audit["threshold"], float(rate.max(initial=0))))))
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    return _png(fig)


def figures(report: dict) -> dict[str, str]:
    """Every figure the report calls for, by section key, as base64 PNG."""
    figures = {}
    if report["_curves"]:
        figures["certified_accuracy"] = figure_certified_accuracy(report["_curves"], report.get("sigma"))
    if report["_samples"]:
        figures["samples_histogram"] = figure_samples_histogram(report["_samples"])
    cal = report.get("calibration")
    if cal and cal.get("check") and cal["check"].get("points"):
        figures["calibration_scatter"] = figure_calibration_scatter(cal["check"])
    if report.get("monitor"):
        figures["monitor"] = figure_monitor(report["monitor"])
    return figures
