"""Reading a PyTorch model into a chain of supported layers (torch.fx), with one-line ModelErrors."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError, ModelError
from .layers import _Conv, _Elementwise, _Layer, _Linear, _Reshape
from .network import _Network
from .nonlinear import _MaxPool, _ReLU
from .support import SUPPORTED


def _is_normalize(m: nn.Module) -> bool:
    """A normalisation layer: any module with ``mean`` and ``std`` attributes (not a container)."""
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.modules.batchnorm._NormBase)):
        return False
    return all(_as_number_tensor(getattr(m, a, None)) is not None for a in ("mean", "std"))


def _as_number_tensor(value):
    if isinstance(value, torch.Tensor):
        return None if value.is_complex() else value.detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return torch.tensor([float(v) for v in value], dtype=torch.float64)
    return None


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that keeps normalisation modules as single leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_normalize(m) or super().is_leaf_module(m, module_qualified_name)


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_PROBE_BATCH = 3


def _describe(node: torch.fx.Node, gm=None) -> str:
    """How a graph node reads in an error message: the function, method or layer, and where."""
    target = node.target
    stack = node.meta.get("nn_module_stack") or {}
    inside = f" in {list(stack.values())[-1][0]!r} ({list(stack.values())[-1][1].__name__})" if stack else ""
    if node.op == "call_function":
        name = getattr(target, "__name__", str(target))
        hint = ", a residual connection" if name in ("add", "iadd", "cat", "concat") else ""
        return f"function '{name}'{inside}{hint}"
    if node.op == "call_method":
        return f"method '.{target}()'{inside}"
    if node.op == "get_attr":
        return f"tensor attribute '{target}' used in forward"
    if node.op == "call_module" and gm is not None:
        return f"layer '{target}' ({type(gm.get_submodule(target)).__name__})"
    return f"'{target}'"


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def read_network(model: nn.Module, input_shape: Sequence[int], dtype=torch.float32) -> _Network:
    """Read ``model`` as a chain of supported layers for inputs of shape ``input_shape`` (C, H, W).

    Raises ModelError (one line) naming the first unsupported layer or operation. The result is
    checked against ``model`` itself on random inputs.
    """
    _check_readable(model)
    device = _model_device(model)
    gm = _trace(model)
    chain = _layer_chain(gm)  # checked before running anything
    in_shape = tuple(int(v) for v in input_shape)
    probe, shapes = _probe_shapes(model, gm, in_shape, device)
    layers, out_shape = _chain_layers(chain, gm, shapes, in_shape, device)
    if len(out_shape) != 1 or out_shape[0] < 2:
        raise ModelError(f"model output must be N x K logits with K >= 2, got N x {' x '.join(map(str, out_shape))}")
    network = _Network(layers, in_shape, out_shape[0], device, dtype)
    _check_reproduces(model, network, probe, dtype)
    return network


def _check_readable(model) -> None:
    """ModelError unless ``model`` is an nn.Module (not TorchScript) with BatchNorm and Dropout in eval mode."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            "cannot analyse a TorchScript model (its layers are compiled away); load the model as "
            "an nn.Module (architecture + state dict) for deterministic certificates"
        )
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ModelError(f"BatchNorm layer '{name}' is in training mode; call model.eval() first")
        if isinstance(m, _DROPOUT) and m.training and m.p > 0:
            raise ModelError(f"Dropout layer '{name}' is in training mode; call model.eval() first")


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model's graph by torch.fx (normalisation modules as leaves); ModelError when it cannot be traced."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: not a static chain
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx ({first}); {SUPPORTED}") from None
    return torch.fx.GraphModule(tracer.root, graph)


def _layer_chain(gm) -> list[tuple[torch.fx.Node, str, nn.Module | None]]:
    """The graph as a straight chain of supported nodes ``(node, kind, module)``, from the input to the
    output; shape queries that feed reshapes are set aside. ModelError for anything else."""
    chain: list[tuple[torch.fx.Node, str, nn.Module | None]] = []
    current, aux = None, set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise ModelError(f"model forward takes more than one input ('{node.name}'); {SUPPORTED}")
            current = node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise ModelError(
                    f"model output is not the last layer's tensor (it returns {node.args[0]!r}); "
                    "return the logits tensor only"
                )
            break
        if _is_aux(node, aux):
            aux.add(node)
            continue
        kind, module = _node_kind(gm, node)  # ModelError naming an unsupported layer or operation
        layer_input = [a for a in node.all_input_nodes if a not in aux]
        if layer_input != [current] or not node.args or node.args[0] is not current:
            names = ", ".join(a.name for a in layer_input)
            raise ModelError(
                f"model is not a straight chain: {_describe(node, gm)} takes [{names}] "
                f"(residual or branching graphs are not supported); {SUPPORTED}"
            )
        chain.append((node, kind, module))
        current = node
    _check_shape_queries(gm, aux)
    return chain


def _check_shape_queries(gm, aux: set) -> None:
    """ModelError when a shape query (``x.size(0)``, ...) is used by anything but a reshape or another query."""
    for node in aux:
        for user in node.users:
            if user not in aux and not (
                user.op in ("call_method", "call_function") and _node_kind(gm, user)[0] == "reshape"
            ):
                raise ModelError(f"the shape of a tensor is used by '{user.name}' ({_describe(user)}); {SUPPORTED}")


def _probe_shapes(model: nn.Module, gm, in_shape: tuple[int, ...], device):
    """One run of the traced model on a random probe batch: the probe and the shape of every tensor a
    node produces. InvalidInputError when the model cannot run on inputs of ``in_shape``."""
    probe = torch.rand(_PROBE_BATCH, *in_shape, generator=torch.Generator().manual_seed(0)).to(device)
    probe = probe.to(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))
    shapes = _ShapeRecorder(gm)
    try:
        with torch.no_grad():
            shapes.run(probe)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InvalidInputError(
            f"the model cannot run on inputs of shape N x {' x '.join(map(str, in_shape))} ({first})"
        ) from None
    return probe, shapes.shapes


def _sample_shape(node, gm, shapes: dict) -> tuple[int, ...]:
    """The shape of one sample of a node's output; ModelError when the batch dimension is not kept first."""
    shape = shapes.get(node, ())
    if len(shape) < 2 or shape[0] != _PROBE_BATCH:
        raise ModelError(
            f"{_describe(node, gm)} does not keep the batch dimension first "
            f"(output shape {shape} for a batch of {_PROBE_BATCH}); {SUPPORTED}"
        )
    return shape[1:]


def _chain_layers(chain, gm, shapes: dict, in_shape: tuple[int, ...], device) -> tuple[list[_Layer], tuple[int, ...]]:
    """The layers that compute the chain, and the shape of one sample of its output."""
    layers: list[_Layer] = []
    shape = in_shape
    for node, kind, module in chain:
        out = _sample_shape(node, gm, shapes)
        layers.extend(_make_layers(kind, module, node, shape, out, device))
        shape = out
    return layers, shape


def _check_reproduces(model: nn.Module, network: _Network, probe: torch.Tensor, dtype) -> None:
    """ModelError unless the layer chain, plain and in its CROWN form, reproduces ``model(probe)``."""
    with torch.no_grad():
        expected = model(probe).to(dtype)
        for crown in (False, True):
            got = network.forward(probe.to(dtype), crown=crown)
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * (1 + float(expected.abs().max()))):
                raise ModelError(
                    f"the layers read from {type(model).__name__} do not reproduce its output (max difference "
                    f"{float((got - expected).abs().max()):.3g}); it computes something else than its layer chain; "
                    f"{SUPPORTED}"
                )


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the traced model once and records the shape of every tensor a node produces (like
    torch.fx's ShapeProp, without importing its symbolic-shape machinery)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, tuple[int, ...]] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _is_aux(node: torch.fx.Node, aux: set) -> bool:
    """Shape queries (``x.size(0)``, ``x.shape[1]``) that only feed ``view``/``reshape`` arguments."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in ("shape", "ndim")
    ):
        return True
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in aux


def _node_kind(gm, node) -> tuple[str, nn.Module | None]:
    """Classify a graph node: ('reshape' | 'relu' | 'module' | 'skip', module); ModelError otherwise."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.Identity, *_DROPOUT)):
            return "skip", module
        if isinstance(module, nn.Flatten):
            return "reshape", module
        if isinstance(module, nn.ReLU):
            return "relu", module
        if isinstance(
            module,
            (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d),
        ) or _is_normalize(module):
            return "module", module
        raise ModelError(f"unsupported layer '{node.target}' ({type(module).__name__}); {SUPPORTED}")
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu", None
    if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return "reshape", None
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", None
    if node.op == "call_method" and node.target in _RESHAPE_METHODS:
        return "reshape", None
    raise ModelError(f"unsupported operation: {_describe(node)}; {SUPPORTED}")


def _make_layers(kind, module, node, in_shape, out_shape, device) -> list[_Layer]:
    """The layers (usually one) that compute ``node``; ModelError for unsupported settings."""
    if kind == "skip":
        return []
    if kind == "reshape":
        return [] if in_shape == out_shape else [_Reshape(in_shape, out_shape)]
    if kind == "relu":
        return [_ReLU(in_shape)]
    name = f"'{node.target}' ({type(module).__name__})"

    def param(t):
        return None if t is None else t.detach()

    if isinstance(module, nn.Linear):
        return [_Linear(param(module.weight), param(module.bias), in_shape, out_shape)]
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ModelError(f"layer {name} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported")
        padding = module.padding
        if isinstance(padding, str):
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            if padding == "valid":
                padding = (0, 0)
            elif all(t % 2 == 0 for t in total):
                padding = (total[0] // 2, total[1] // 2)
            else:
                raise ModelError(
                    f"layer {name} uses padding='same' with an even kernel (asymmetric padding); use explicit padding"
                )
        return [
            _Conv(
                param(module.weight),
                param(module.bias),
                _pair(module.stride),
                _pair(padding),
                _pair(module.dilation),
                module.groups,
                in_shape,
                out_shape,
            )
        ]
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return _average_pool(module, name, in_shape, out_shape, device)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise ModelError(f"layer {name} returns indices; use return_indices=False")
        return [
            _MaxPool(
                _pair(module.kernel_size),
                _pair(module.stride or module.kernel_size),
                _pair(module.padding),
                _pair(module.dilation),
                bool(module.ceil_mode),
                in_shape,
                out_shape,
            )
        ]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.running_mean is None or module.running_var is None:
            raise ModelError(
                f"layer {name} has track_running_stats=False (it normalises with batch statistics); "
                "only BatchNorm with running statistics is supported"
            )
        channels = module.num_features  # folded in float64, rounded to the computation's dtype later
        scale = torch.rsqrt(param(module.running_var).double() + module.eps)
        if module.weight is not None:
            scale = scale * param(module.weight).double()
        shift = -param(module.running_mean).double() * scale
        if module.bias is not None:
            shift = shift + param(module.bias).double()
        view = (channels,) + (1,) * (len(in_shape) - 1)
        return [_Elementwise(scale.reshape(view), shift.reshape(view), in_shape, type(module).__name__)]
    return [_normalize(module, name, in_shape, device)]


def _average_pool(module, name, in_shape, out_shape, device) -> list[_Layer]:
    """Average pooling as a depthwise convolution with weights 1 / (window size)."""
    c, h, w = in_shape
    if isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        oh, ow = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
        if h % oh or w % ow:
            raise ModelError(
                f"layer {name} maps {h}x{w} to {oh}x{ow}, which is not a uniform average pooling "
                f"(supported when the input size is a multiple of the output size)"
            )
        kernel, stride, padding, divisor = (h // oh, w // ow), (h // oh, w // ow), (0, 0), None
    else:
        kernel, padding = _pair(module.kernel_size), _pair(module.padding)
        stride = _pair(module.stride or module.kernel_size)
        divisor = module.divisor_override
        if module.ceil_mode:
            raise ModelError(f"layer {name} uses ceil_mode=True; only ceil_mode=False is supported")
        if any(padding) and not module.count_include_pad:
            raise ModelError(
                f"layer {name} pads with count_include_pad=False (border windows average fewer "
                "cells); use count_include_pad=True or no padding"
            )
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0) and divisor is None:
        return []  # the identity
    weight = torch.full((c, 1, *kernel), 1.0 / (divisor or kernel[0] * kernel[1]), device=device)
    return [_Conv(weight, None, stride, padding, (1, 1), c, in_shape, out_shape)]


def _normalize(module, name, in_shape, device) -> _Layer:
    """``(x - mean) / std`` as an elementwise layer, checked against the module on random inputs."""
    # folded in float64 (exact for Python numbers), rounded to the computation's dtype later
    mean = _as_number_tensor(module.mean).to(device=device, dtype=torch.float64)
    std = _as_number_tensor(module.std).to(device=device, dtype=torch.float64)
    shapes = []
    for t in (mean, std):
        if t.dim() == 1 and len(in_shape) == 3:
            t = t.reshape(-1, 1, 1)  # per channel, as torchvision.transforms.Normalize
        elif t.dim() == len(in_shape) + 1 and t.shape[0] == 1:
            t = t[0]
        shapes.append(t)
    mean, std = shapes
    try:
        torch.broadcast_shapes(mean.shape, std.shape, in_shape)
        if torch.broadcast_shapes(mean.shape, std.shape, in_shape) != tuple(in_shape):
            raise RuntimeError
    except RuntimeError:
        raise ModelError(
            f"normalisation layer {name} has mean {tuple(mean.shape)} / std {tuple(std.shape)} that "
            f"do not broadcast to one input of shape {tuple(in_shape)}"
        ) from None
    if not bool(torch.isfinite(mean).all()) or not bool((std.abs() > 0).all() and torch.isfinite(std).all()):
        raise ModelError(f"normalisation layer {name} has a zero or non-finite std / mean")
    layer = _Elementwise(1.0 / std, -mean / std, in_shape, "Normalize")
    probe = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        try:
            out = module(probe.clone())
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"normalisation layer {name} fails on a batch ({str(exc)[:120]})") from None
    if (
        not isinstance(out, torch.Tensor)
        or out.shape != probe.shape
        or not torch.allclose(out.double(), layer.forward(probe.double()), rtol=1e-4, atol=1e-5)
    ):
        raise ModelError(f"layer {name} has mean/std attributes but does not compute (x - mean) / std; {SUPPORTED}")
    return layer
