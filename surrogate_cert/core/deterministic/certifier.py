"""DeterministicCertifier: one Certificate record per input, like the other certifiers."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..certificate import Certificate, abstention
from ..errors import ModelError
from ..smoothing import check_images, noise_indices
from .bounds import _check_method
from .radius import _integer, _positive, certified_radius


class DeterministicCertifier:
    """Deterministic l2 certificates (IBP or CROWN) for a PyTorch classifier.

    ``certify(x)`` returns one :class:`~surrogate_cert.core.certificate.Certificate` per input with
    ``prediction = argmax model(x)``, ``radius`` from :func:`certified_radius` (the prediction of the
    network itself provably does not change within that l2 distance, input units), ``method`` =
    ``"ibp"`` or ``"crown"``, ``n_samples = 0`` (no sampling) and ``p_lower = nan``: the certificate is
    deterministic and about the base network, not a smoothed classifier, so no bound on ``p_A(x)``
    exists; nan keeps formulas such as ``sigma * Phi^{-1}(p_lower)`` from turning it into a radius.
    Radius 0 gives the abstain certificate (class -1). ``seconds`` is the batch time divided evenly.

    The model is read (and checked) again on every call, so it may change between calls. Work runs on
    the model's device (CPU or CUDA), in float32 with a float64 re-check of every radius.

    Parameters
    ----------
    model : nn.Module
        A supported classifier (see :mod:`surrogate_cert.core.deterministic`), in eval mode.
    method : {"crown", "ibp"}
    max_radius, tol, iterations, verify_float64
        As in :func:`certified_radius`.
    batch_size : int
        Inputs per batched radius search (bounds memory; each batch is one search).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "crown",
        *,
        max_radius: float | None = None,
        tol: float = 1e-3,
        iterations: int = 40,
        batch_size: int = 256,
        verify_float64: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.method = model, _check_method(method)
        self.max_radius = None if max_radius is None else _positive("max_radius", max_radius)
        self.tol = _positive("tol", tol)
        self.iterations = _integer("iterations", iterations)
        self.batch_size = _integer("batch_size", batch_size)
        self.verify_float64 = bool(verify_float64)

    def certify(self, x: torch.Tensor, indices=None) -> list[Certificate]:
        """One certificate per row of ``x`` (N x C x H x W, pixels in [0, 1]).

        ``indices`` is accepted so every certifier has the same call, and checked (one per input);
        no noise is drawn.
        """
        check_images(x)
        noise_indices(indices, x.shape[0])
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            t0 = time.perf_counter()
            batch = x[start : start + self.batch_size]
            preds, radii = certified_radius(
                self.model,
                batch,
                self.method,
                max_radius=self.max_radius,
                tol=self.tol,
                iterations=self.iterations,
                verify_float64=self.verify_float64,
            )
            seconds = (time.perf_counter() - t0) / max(1, batch.shape[0])
            for c, r in zip(preds, radii):
                if r > 0:
                    out.append(Certificate(int(c), float(r), self.method, 0, float("nan"), seconds))
                else:
                    out.append(abstention(0, float("nan"), seconds))
        return out
