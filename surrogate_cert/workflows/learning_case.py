"""Learning from the fallback, measured on a stream: ``benchmarks/fallback_learning_mnist.py``.

The pretrained case's base model (every training image seen) and calibration counts; the initial surrogate
trained on pools that hold no stream image (``initial_pools`` of ``workflows.pretrained_case``); a stream of
the ``test`` split's images in the split's (random) order, disjoint from the calibration images, each asking
for a required radius (``required_sigma``; the thresholds first, the fallback in target mode for the rest). The
hybrid runs with a drift monitor and an audit attached, through a
``FallbackLearner`` that logs what its fallback samples and retrains every ``retrain_every`` queries. A
control runs the same stream without learning (and without the audit, which never changes a certificate),
so a drop in evaluations can be told from a stream that merely gets easier.

Reported per block of queries: evaluations per query on the certification path (the fallback's samples)
and the audit's separately, the share answered in one pass, the surrogate in use (its q^), the watchers;
and the targets: evaluations over the last 1,000 queries at most half those over the first 1,000, the
one-pass share rising, the audited over-radius rate within epsilon + alpha_mc.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from data_gen.datasets import load_split
from data_gen.models import load_model

from ..core.files import check_outputs, write_text_atomic
from ..core.one_pass import SurrogateCertifier
from ..core.sequential import EProcessCertifier
from ..core.smoothing import SmoothedClassifier
from ..core.stats import beta_binomial_cs
from ..deploy.hybrid import HybridCertifier
from ..deploy.monitor import CertificateAudit, DriftMonitor
from .bench import json_safe
from .learning import FallbackLearner, LearningConfig
from .onepass_case import OnePassBench
from .pretrained_case import PRETRAINED_MNIST, PRETRAINED_TINY, PretrainedConfig, pool_counts

__all__ = ["LearningCaseConfig", "LEARNING_MNIST", "LEARNING_TINY", "run_learning_case", "learning_markdown"]


@dataclass(frozen=True)
class LearningCaseConfig:
    """The stream measurement: the pretrained case it builds on, the stream and the learner's settings."""

    pretrained: PretrainedConfig = dataclasses.replace(
        PRETRAINED_MNIST, case=dataclasses.replace(PRETRAINED_MNIST.case, sigma=0.5)
    )
    initial_pools: tuple[str, ...] = ("seen", "augmented")
    required_sigma: float | None = 2.0
    """Each query asks for this radius (sigma units; the thresholds, then the fallback in target mode); None:
    best radius. Learning moves the work the surrogate's quality decides: in best-radius mode the fallback
    holds only queries the surrogate cannot certify at all (about 2 % on MNIST, most of them unfixable)."""
    max_samples: int | None = 2000
    stream: int = 5000
    block: int = 250
    retrain_every: int = 1000
    audit_rate: float = 0.1
    drift_delta: float = 0.01
    control: bool = True


LEARNING_MNIST = LearningCaseConfig()
"""MNIST at sigma 0.5: 5,000 test-split queries asking for 2 sigma (fallback budget 2,000), retraining every
1,000, a tenth of the queries audited."""

LEARNING_TINY = LearningCaseConfig(
    pretrained=PRETRAINED_TINY,
    initial_pools=("seen",),
    stream=120,
    block=40,
    retrain_every=60,
    audit_rate=0.2,
    required_sigma=1.0,
    max_samples=300,
)
"""Test-only: digits, seconds."""


def _hybrid(surrogate, calibration, base, cfg, lc: LearningCaseConfig, watched: bool) -> HybridCertifier:
    smooth = SmoothedClassifier(
        base, surrogate.num_classes, cfg.sigma, device=cfg.device, batch_size=cfg.batch_size, seed=cfg.seed
    )
    sequential = EProcessCertifier(
        smooth, cfg.alpha, max_samples=lc.max_samples or cfg.max_samples, tolerance=cfg.tolerance
    )
    monitor = DriftMonitor.from_calibration(calibration, delta=lc.drift_delta, seed=cfg.seed) if watched else None
    audit = (
        CertificateAudit(calibration, smooth, rate=lc.audit_rate, delta=lc.drift_delta, seed=cfg.seed)
        if watched and lc.audit_rate
        else None
    )
    return HybridCertifier(SurrogateCertifier(surrogate, calibration), sequential, monitor, audit)


def _block_row(certs, hybrid, audit_before, lo: int) -> dict:
    """One block of the stream: evaluations (certification path / audit), routes, the surrogate, the watchers."""
    samples = np.array([c.n_samples for c in certs], dtype=float)
    audit = hybrid.audit
    audit_evals = 0 if audit is None else audit.evaluations - audit_before
    routes = [c.route for c in certs]
    row = dict(
        first_query=lo,
        queries=len(certs),
        evaluations=float((samples.sum() - audit_evals) / len(certs)),
        audit_evaluations=float(audit_evals / len(certs)),
        one_pass_share=float(np.mean([r == "surrogate" for r in routes])),
        routes={r: routes.count(r) for r in sorted(set(routes))},
        q_hat=hybrid.calibration.pooled_offset,
        surrogate=hybrid.calibration.surrogate_sha256[:12],
    )
    if hybrid.monitor is not None:
        row["drift"] = dict(log_martingale=hybrid.monitor.log_martingale, alarm=hybrid.monitor.alarm)
    if audit is not None:
        row["audit"] = dict(audited=audit.audited, exceedances=audit.exceedances, alarm=audit.alarm)
    return row


def _stream(hybrid, certify, x, indices, lc: LearningCaseConfig, say) -> list[dict]:
    blocks, audits = [], {}
    for lo in range(0, len(x), lc.block):
        hi = min(lo + lc.block, len(x))
        audit = hybrid.audit
        before = 0 if audit is None else audit.evaluations
        certs = certify(x[lo:hi], indices[lo:hi])
        # The audit of the calibration in force for this block (a retraining after it starts a new one).
        if audit is not None:
            audits[id(audit)] = audit
        blocks.append(_block_row(certs, hybrid if hybrid.audit is audit else _Was(hybrid, audit), before, lo))
        say(
            f"      queries {lo}-{hi}: {blocks[-1]['evaluations']:.0f} evals/query, one-pass "
            f"{100 * blocks[-1]['one_pass_share']:.0f}%, q^ {blocks[-1]['q_hat']:.3f}"
        )
    return blocks, list(audits.values())


class _Was:
    """The hybrid as it was during a block that ended in a retraining (its audit and calibration then)."""

    def __init__(self, hybrid, audit):
        self.audit, self.monitor = audit, hybrid.monitor
        self.calibration = audit.calibration if audit is not None else hybrid.calibration


def _window(blocks, first: bool, size: int) -> dict:
    rows = blocks if first else blocks[::-1]
    take, n = [], 0
    for r in rows:
        if n >= size:
            break
        take.append(r)
        n += r["queries"]
    q = sum(r["queries"] for r in take)
    return dict(
        queries=q,
        evaluations=sum(r["evaluations"] * r["queries"] for r in take) / q,
        audit_evaluations=sum(r["audit_evaluations"] * r["queries"] for r in take) / q,
        one_pass_share=sum(r["one_pass_share"] * r["queries"] for r in take) / q,
    )


def learning_targets(blocks, audits, epsilon: float, alpha_mc: float, window: int = 1000) -> dict:
    """The issue's three targets on a learning stream."""
    first, last = _window(blocks, True, window), _window(blocks, False, window)
    audited = sum(a.audited for a in audits)
    exceed = sum(a.exceedances for a in audits)
    lower, upper = beta_binomial_cs(exceed, audited, 0.05) if audited else (0.0, 1.0)
    bound = epsilon + alpha_mc
    return dict(
        evaluations=dict(
            rule="evaluations per query over the last 1,000 queries <= half those over the first 1,000 "
            "(certification path; the audit's reported beside)",
            first=first,
            last=last,
            ratio=last["evaluations"] / first["evaluations"] if first["evaluations"] else None,
            met=last["evaluations"] <= 0.5 * first["evaluations"],
        ),
        one_pass_share=dict(
            rule="the one-pass share rising",
            first=first["one_pass_share"],
            last=last["one_pass_share"],
            met=last["one_pass_share"] > first["one_pass_share"],
        ),
        audited_over_radius=dict(
            rule="over-radius rate of audited queries <= epsilon + alpha_mc",
            audited=audited,
            exceedances=exceed,
            rate=exceed / audited if audited else None,
            confidence_sequence_95=[lower, upper],
            bound=bound,
            alarms=sum(bool(a.alarm) for a in audits),
            met=bool(audited) and exceed / audited <= bound,
        ),
    )


def run_learning_case(
    lc: LearningCaseConfig = LEARNING_MNIST,
    workdir="surrogate-cert-learning",
    *,
    out=None,
    cache_dir=None,
    progress: bool = False,
    quiet: bool = False,
) -> dict:
    """The stream with and without learning; returns (and writes to ``out``) the JSON."""
    if out is not None:
        check_outputs([out], overwrite=True)
    started = time.perf_counter()
    pcfg = lc.pretrained
    cfg = pcfg.case
    bench = OnePassBench(cfg, workdir, cache_dir, (), progress, quiet)
    say = bench.say
    model = bench.base_model()
    cal = bench.counts(model, "cal", cfg.cal_n, limit=cfg.cal_limit)
    files = [pool_counts(bench, pcfg, model, p) for p in lc.initial_pools]
    surrogate = bench.surrogate(model, files, "-".join(lc.initial_pools))
    calibration = bench.calibrations(surrogate, cal, cfg.epsilons[0], files[0], schemes=("pooled",))["pooled"]
    base = load_model(model, device=cfg.device).model
    test = load_split(cfg.dataset, "test", data_root=cfg.data_root, limit=lc.stream)
    content: dict = dict(
        stream=len(test), initial_pools=list(lc.initial_pools), initial_q_hat=calibration.pooled_offset
    )
    required = None if lc.required_sigma is None else lc.required_sigma * cfg.sigma
    if lc.control:
        say("      control: the same stream, no learning")
        hybrid = _hybrid(surrogate, calibration, base, cfg, dataclasses.replace(lc, audit_rate=0.0), watched=False)
        blocks, _ = _stream(
            hybrid, lambda x, i: hybrid.certify(x, required_radius=required, indices=i), test.x, test.indices, lc, say
        )
        content["control"] = dict(blocks=blocks, first=_window(blocks, True, 1000), last=_window(blocks, False, 1000))
    say("      learning from the fallback")
    hybrid = _hybrid(surrogate, calibration, base, cfg, lc, watched=True)
    learner = FallbackLearner(
        hybrid,
        bench.workdir / f"queries-{time.strftime('%Y%m%d-%H%M%S')}.h5",
        files,
        cal,
        bench.workdir / "learned",
        init_from_base=model,
        source_dataset=cfg.dataset,
        config=LearningConfig(
            retrain_every=lc.retrain_every,
            epsilon=cfg.epsilons[0],
            alpha_mc=cfg.alpha_mc,
            epochs=cfg.surrogate_epochs,
            batch_size=cfg.surrogate_batch_size,
            seed=cfg.seed,
            data_root=cfg.data_root,
            device=cfg.device,
        ),
    )
    blocks, audits = _stream(
        hybrid, lambda x, i: learner.certify(x, indices=i, required_radius=required), test.x, test.indices, lc, say
    )
    content["learning"] = dict(blocks=blocks, retrainings=learner.history, logged_rows=learner.log.rows)
    content["targets"] = learning_targets(blocks, audits, cfg.epsilons[0], cfg.alpha_mc)
    content["setup"] = dict(
        dataset=cfg.dataset,
        sigma=cfg.sigma,
        alpha=cfg.alpha,
        alpha_mc=cfg.alpha_mc,
        epsilon=cfg.epsilons[0],
        base_model=model,
        base_splits=list(cfg.base_splits),
        config=dataclasses.asdict(lc),
        torch_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()),
    )
    content["seconds"] = dict(bench.seconds, total=time.perf_counter() - started)
    content["markdown"] = learning_markdown(content)
    if out is not None:
        write_text_atomic(out, json.dumps(json_safe(content), indent=2, allow_nan=False), overwrite=True)
    return content


def learning_markdown(content: dict) -> str:
    """The stream table (docs/one-pass.md): per block, with and without learning."""
    control = {b["first_query"]: b for b in content.get("control", {}).get("blocks", [])}
    lines = [
        "| queries | evals/query (learning) | audit evals/query | one-pass share | q^ | evals/query (no "
        "learning) | one-pass share (no learning) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in content["learning"]["blocks"]:
        c = control.get(b["first_query"])
        lines.append(
            f"| {b['first_query']}-{b['first_query'] + b['queries']} | {b['evaluations']:,.0f} | "
            f"{b['audit_evaluations']:,.0f} | {100 * b['one_pass_share']:.1f}% | {b['q_hat']:.3f} | "
            + (f"{c['evaluations']:,.0f} | {100 * c['one_pass_share']:.1f}% |" if c else " | |")
        )
    t = content["targets"]
    lines += [
        "",
        f"first 1,000: {t['evaluations']['first']['evaluations']:,.0f} evals/query; last 1,000: "
        f"{t['evaluations']['last']['evaluations']:,.0f} (ratio {t['evaluations']['ratio']:.2f}); one-pass "
        f"share {100 * t['one_pass_share']['first']:.1f}% -> {100 * t['one_pass_share']['last']:.1f}%; "
        f"audited over-radius {t['audited_over_radius']['exceedances']}/{t['audited_over_radius']['audited']}",
    ]
    return "\n".join(lines)
