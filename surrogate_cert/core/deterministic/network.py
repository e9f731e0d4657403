"""A model read as a chain of layers, for one input shape, device and dtype (and its CROWN form)."""

from __future__ import annotations

import math

import torch

from .. import deterministic as _package  # its work-saving settings, read when a network is built
from .layers import _Conv, _Layer
from .nonlinear import _MaxPool, _ReLU


class _Network:
    """The layer chain of a model for one input shape, on one device, in one dtype."""

    def __init__(self, source: list[_Layer], in_shape, num_classes: int, device, dtype):
        self.source = source  # layers in the model's own precision; ``layers`` in ``dtype``
        self.layers = [layer.to(dtype) for layer in source]
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.device, self.dtype = device, dtype
        self.crown_layers: list[_Layer] = []
        for layer in self.layers:
            if isinstance(layer, _MaxPool):
                self.crown_layers.extend(layer.relaxation_layers(device, dtype))
            else:
                self.crown_layers.append(layer)
        # largest sample size among layer shapes up to each layer (for chunking backward passes)
        sizes = [math.prod(self.in_shape)]
        for layer in self.crown_layers:
            sizes.append(max(sizes[-1], math.prod(layer.out_shape)))
        self.max_size = sizes
        # forward-mode linear bounds cost (1 + input size) per neuron: worth it when the input is
        # smaller than the ReLU layers whose CROWN rows they save (small images, wide conv layers)
        relu_sizes = [math.prod(layer.in_shape) for layer in self.crown_layers if isinstance(layer, _ReLU)]
        # the first layer as a dense matrix when small (a convolution of a small image): backward
        # passes end with one matmul instead of a transposed convolution with few output channels
        self.first_dense = None
        first = self.crown_layers[0] if self.crown_layers else None
        d_in = math.prod(self.in_shape)
        if isinstance(first, _Conv) and d_in * math.prod(first.out_shape) <= _package.DENSE_FIRST_LAYER:
            eye = torch.eye(d_in, dtype=dtype, device=device).reshape(1, d_in, *self.in_shape)
            self.first_dense = first.apply(eye, None).reshape(d_in, -1).t().contiguous()  # D_out x D_in
        self.forward_mode = (
            _package.FORWARD_MODE
            and bool(relu_sizes)
            and math.prod(self.in_shape) < max(relu_sizes)
            and (1 + math.prod(self.in_shape)) * max(self.max_size) <= _package.FORWARD_MODE_ELEMENTS
        )

    def to(self, dtype) -> _Network:
        if dtype == self.dtype:
            return self
        return _Network(self.source, self.in_shape, self.num_classes, self.device, dtype)

    def forward(self, x: torch.Tensor, crown: bool = False) -> torch.Tensor:
        for layer in self.crown_layers if crown else self.layers:
            x = layer.forward(x)
        return x
