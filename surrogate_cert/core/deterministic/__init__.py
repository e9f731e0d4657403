"""Deterministic l2 certificates: interval bound propagation (IBP) and CROWN on PyTorch models.

Beside the probabilistic certifiers (randomized smoothing), this package bounds the logits of the
*base network itself* over a whole l2 ball, with no sampling and no failure probability:

- IBP (Gowal et al. 2018, "On the effectiveness of interval bound propagation"): push a box through
  the network layer by layer. For an l2 ball the first affine layer is exact per neuron:
  ``w.x0 + b +- r * ||w||_2`` (the l2 dual norm of each row; rows of a convolution are computed
  exactly, zero padding included). Elementwise affine layers before it (normalisation) are folded
  in, so the first box is the tightest box around the image of the ball.
- CROWN (Zhang et al. 2018, "Efficient neural network robustness certification with general
  activation functions"): linear relaxations of every ReLU (the chord above, ``z`` or ``0`` below:
  CROWN-Ada), propagated backwards from a specification matrix ``C`` to the input and concretised
  over the ball as ``lam.x0 + c - r*||lam||_2``. Margins ``z_pred - z_j`` are bounded directly with
  ``C = e_pred - e_j`` (not by subtracting logit intervals). Intermediate (pre-activation) bounds
  come from backward passes too (full CROWN), but only for the neurons that cheaper valid bounds
  cannot already prove stable; all bounds of a neuron are intersected.

CROWN work-savers (none changes what is certified; each only skips work or tightens a bound):
interval bounds and, when the input is smaller than the ReLU layers (small images, wide convs),
forward-mode linear bounds prune the neurons that need backward passes; the rows of those passes
stay sparse (index lists) through elementwise layers, ReLUs and the max-pool tournament and become
dense at the first convolution (built from the kernel, not by a transposed convolution); the
transposed convolution (``conv_transpose2d``) does the rest, batched over inputs and rows in
chunks; a small first convolution is kept as a dense matrix. Convolutions are never converted to
dense matrices otherwise, so large inputs only cost memory in proportion to the rows.

Guarantee (all functions): for every input ``x0`` (a batch row, pixels) and every ``x`` with
``||x - x0||_2 <= r`` (Euclidean norm over all ``C*H*W`` input values, in input units, i.e. pixels
before any normalisation layer of the model), the logits ``z(x)`` of the network *in exact real
arithmetic* satisfy the returned bounds. The ball is not intersected with the pixel cube [0, 1]:
the statement holds for the whole ball, which is stronger.

Numerics. Bounds are computed in float32 by default; floating-point rounding can move a bound by
about 1e-6 of the magnitudes involved, so float32 bounds are exact up to that rounding
(``dtype=torch.float64`` makes it ~1e-15; no directed rounding is used, as in other verifiers).
:func:`certified_radius` searches in float32, where a radius counts as certified only when every
margin bound exceeds ``1e-5 * (1 + |margin|)``, and then re-checks each returned radius in float64
near the boundary, where it matters: the final backward pass is recomputed in float64 from the
float32 intermediate bounds widened outward by 1e-5 of their magnitude (about 100 times float32
rounding), and the radius is cut to the largest one that this float64 bound certifies with a
strict ``> 0``. The model's own float32 evaluation (a flip where the true margin is within ~1e-6
of 0) is outside any such bound.

Supported models: a straight chain (as read by ``torch.fx.symbolic_trace``; nested ``nn.Sequential``
and custom modules whose ``forward`` just calls submodules in order, like
:class:`surrogate_cert.core.architectures.SmallCNN`, are fine) of ``nn.Linear``, ``nn.Conv2d`` (zero
padding, any stride, dilation and groups), ``nn.ReLU`` (also ``F.relu``/``torch.relu``/``x.relu()``),
``nn.MaxPool2d``, ``nn.AvgPool2d`` (``ceil_mode=False``; padding only with
``count_include_pad=True``), ``nn.AdaptiveAvgPool2d`` (only when it is a uniform average pooling for
the input size, e.g. 8x8 -> 4x4), ``nn.BatchNorm1d/2d`` in eval mode (running statistics),
``nn.Flatten`` / ``flatten`` / ``view`` / ``reshape`` (keeping the batch dimension), ``nn.Identity``,
``nn.Dropout*`` (eval mode: identity) and a normalisation layer. Anything else (residual adds,
concatenations, other activations, torchvision ResNets, TorchScript modules) raises
:class:`~surrogate_cert.core.errors.ModelError` naming the first unsupported layer or operation.

Normalisation layers. A module is read as ``(x - mean) / std`` when it has attributes ``mean`` and
``std`` (tensors, buffers, numbers or sequences of numbers), e.g. ``torchvision.transforms.Normalize``
used as a module, or your own ``Normalize(nn.Module)`` with ``self.mean`` / ``self.std`` (the module
is treated as one leaf: its ``forward`` is not traced). A 1-D ``mean``/``std`` is per channel (as in
torchvision: shape ``(C, 1, 1)`` on ``N x C x H x W`` inputs); other shapes broadcast against one
input sample (a leading batch dimension of size 1 is allowed). The reading is checked numerically:
if the module's output differs from ``(x - mean) / std`` on random inputs, ModelError.

Every model is also checked end to end: the layer chain read from it must reproduce ``model(x)``
on random inputs, or ModelError. BatchNorm and Dropout layers must be in eval mode (``model.eval()``).

Max pooling in CROWN is rewritten exactly as linear and ReLU layers, ``max(a, b) = b + relu(a - b)``
applied as a tournament over the pooling window (padding cells are replaced by a copy of a real
cell of the same window), so CROWN bounds the differences ``a - b`` with its own backward passes;
IBP pools the lower and upper bounds directly (max is monotone), which is exact for boxes.

Modules, by what each does: ``reading`` (a model read into a chain of layers, ``read_network``),
``network`` (that chain in one dtype, and its CROWN form), ``sets``, ``layers`` and ``nonlinear`` (the
layers and their bound rules), ``ibp`` (interval bounds), ``crown`` (linear relaxation bounds),
``bounds`` (logit and margin bounds), ``radius`` (the certified-radius search and its float64
re-check), ``certifier`` (``DeterministicCertifier`` and its Certificate records), ``support`` (the
methods and supported layers). The work-saving settings below are read from this package at run time.

Public API: :func:`interval_bounds`, :func:`margin_lower_bounds`, :func:`certified_radius`,
:class:`DeterministicCertifier` (``certify(x) -> list[Certificate]``).
"""

from __future__ import annotations

from .bounds import interval_bounds, margin_lower_bounds
from .certifier import DeterministicCertifier
from .radius import certified_radius
from .reading import read_network
from .support import METHODS
from .support import SUPPORTED as SUPPORTED  # the text every ModelError ends with

# Work-saving settings. They live here, on the package, and the modules read them when they run,
# so that setting one on ``surrogate_cert.core.deterministic`` takes effect everywhere.
CHUNK_ELEMENTS = 2**24
"""Largest backward-pass tensor (elements) built at once; rows and inputs are processed in chunks."""
FORWARD_MODE = True
"""Whether CROWN first tightens intermediate boxes with forward-mode linear bounds (where the input
is smaller than the ReLU layers), so that fewer neurons need backward passes. Sound either way."""
FORWARD_MODE_ELEMENTS = 2**26
"""Forward-mode bounds of one input take (1 + input size) x (largest layer) values; above this, none."""
DENSE_FIRST_LAYER = 2**22
"""A first convolution with (input size x output size) up to this many entries is also kept dense."""
SPARSE_ENTRIES = 64
"""Rows of intermediate bounds stay sparse (index, coefficient lists) while they have at most this
many entries; then they are made dense."""
REFINE_MAXPOOL = True
"""Whether CROWN computes its own bounds of the max-pool differences ``a - b`` (tighter, slower)
instead of interval bounds for them. Both are sound."""

__all__ = [
    "METHODS",
    "interval_bounds",
    "margin_lower_bounds",
    "certified_radius",
    "DeterministicCertifier",
    "read_network",
]
