"""Reading ``torch.export`` archives (``.pt2``) as data: nothing stored in the archive is run.

``torch.export.load`` is not safe on a file from untrusted hands, and its own documentation says so.
An archive can make it run code in four places: weights and tensor constants marked ``use_pickle``
(read with ``torch.load(weights_only=False)``), pickled custom objects among the constants, the
``sample_inputs`` record (``weights_only=True`` first, then a silent fallback to
``weights_only=False``), and two strings of the program itself: ``guards_code`` (``exec``-ed when
the program becomes a module) and the shape expressions (parsed by ``sympy.sympify``, which evaluates
Python). ``load_exported_program`` reads the archive itself and hands torch's deserializer only what
it has checked:

- weights and constants are built from the archive's raw tensor records (``torch.frombuffer``);
  an entry stored as a pickle is read with ``torch.load(weights_only=True)`` only, and refused unless
  that gives a plain tensor; custom objects (pickles by construction) are refused;
- ``sample_inputs`` is never loaded: its pickle opcodes are only scanned (``pickletools``, no
  execution), and an archive whose sample inputs name anything beyond the tensor-rebuilding functions
  ``torch.load(weights_only=True)`` allows is refused as crafted;
- the program JSON is checked against an allowlist before deserialization: every node calls a
  registered ATen-style operator (``torch.ops.<namespace>.<op>.<overload>``) or symbolic-shape
  arithmetic; every shape expression is a literal sympy constructor call (names from a fixed list,
  no attribute access, no subscripts); every other name is identifier-like; ``guards_code`` and node
  metadata (stack traces) are dropped; higher-order operators, custom objects and operator arguments
  are refused. After deserialization every call in the graph is checked again.

What is not defended: resource exhaustion by a pathological archive beyond the bounds checked here
(record sizes, expression length); and the operators themselves, which are PyTorch's own.
"""

from __future__ import annotations

import io
import json
import operator
import pickletools
import re
import sys
import zipfile

import torch

from .errors import ModelError

__all__ = ["load_exported_program", "ALLOWED_EXPR_NAMES"]

_MODEL = "models/model.json"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_EXTRA = "extra/"
_LEGACY = ("data/weights/model.pt", "data/constants/model.pt")

_NAME = re.compile(r"[A-Za-z0-9_.]*")
"""Every other string of the program (value names, parameter paths, device types, verifier names)."""
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
    r"|(?P<string>'[A-Za-z0-9_.+\-]*')|(?P<op>//|==|!=|<=|>=|[-+*/%(),=<>]))"
)
_SYMBOL = re.compile(r"[a-z]+\d+")
MAX_EXPR_CHARS = 2000

ALLOWED_EXPR_NAMES = frozenset(
    {
        # sympy's own constructors, as sympy.srepr prints shape expressions, and their assumptions
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Mod",
        "Abs",
        "floor",
        "ceiling",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "BooleanTrue",
        "BooleanFalse",
        "true",
        "false",
        "True",
        "False",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "NaN",
        "Half",
        "One",
        "Zero",
        "NegativeOne",
        "IntInfinity",
        "NegativeIntInfinity",
        "positive",
        "negative",
        "integer",
        "real",
        "nonnegative",
        "nonpositive",
        "finite",
        "infinite",
        "zero",
        "nonzero",
        "even",
        "odd",
        "precision",
        "evaluate",
        "commutative",
        "rational",
        "extended_real",
        # the functions torch's deserializer defines for shape arithmetic
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    }
)
"""Names a shape expression may use: with literals and operators only, sympify can build an expression, nothing else."""

_FORBIDDEN_KEYS = {
    "as_graph": "a higher-order operator (a nested graph)",
    "as_operator": "an operator argument",
    "as_custom_obj": "a custom object",
    "as_custom_objs": "custom objects",
}
_FREE_TEXT = {"as_string", "as_strings"}
"""Strings the program passes to operators: FX writes them with repr(), so any text is harmless."""


def _sym_ops() -> set:
    """Symbolic-shape arithmetic a graph may call besides ATen operators (and ``operator.getitem``)."""
    try:
        from torch._export.serde.serialize import _SYM_OPS

        ops = {fn for fn in _SYM_OPS if getattr(fn, "__module__", None) in ("_operator", "math", "torch")}
    except ImportError:  # pragma: no cover - an older or newer torch layout
        ops = {
            operator.add,
            operator.sub,
            operator.mul,
            operator.floordiv,
            operator.mod,
            operator.eq,
            operator.ne,
            operator.lt,
            operator.le,
            operator.gt,
            operator.ge,
            operator.neg,
            torch.sym_int,
            torch.sym_float,
            torch.sym_max,
            torch.sym_min,
            torch.sym_not,
        }
    return ops | {operator.getitem}


_ALLOWED_CALLS = _sym_ops()
_ALLOWED_CALL_NAMES = {f"{fn.__module__}.{fn.__name__}" for fn in _ALLOWED_CALLS}


def _refuse(path: str, why: str) -> ModelError:
    return ModelError(
        f"{path}: torch.export archive {why}; it is refused (a model file must be data, never code), "
        "re-export the model with torch.export.save from plain tensors"
    )


# --------------------------------------------------------------------------- the program JSON
def _operator_target(name: str) -> bool:
    """Whether a node target names an allowed call, resolved without importing anything."""
    if name in _ALLOWED_CALL_NAMES:
        return True
    parts = name.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"]:
        return False
    if not all(_IDENTIFIER.fullmatch(p) and not p.startswith("__") for p in parts[2:]):
        return False
    try:
        target = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
    except (AttributeError, RuntimeError):
        return False
    return isinstance(target, torch._ops.OpOverload)


def _expression_ok(text: str) -> bool:
    """A shape expression made of literal sympy constructor calls only (what ``sympy.srepr`` prints)."""
    if len(text) > MAX_EXPR_CHARS:
        return False
    pos, end = 0, len(text.rstrip())
    while pos < end:
        match = _EXPR_TOKEN.match(text, pos)
        if match is None:
            return False
        pos = match.end()
        name, number = match.group("name"), match.group("number")
        if name is not None and name not in ALLOWED_EXPR_NAMES and not _SYMBOL.fullmatch(name):
            return False
        if number is not None and len(number) > 40:
            return False
    return True


def _spec_ok(text: str) -> bool:
    """A pytree spec of the program's inputs or outputs: tuples, lists, dicts and leaves only."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False

    def walk(node) -> bool:
        if isinstance(node, list):
            return all(walk(v) for v in node)
        if not isinstance(node, dict):
            return isinstance(node, (int, type(None)))
        if node.get("type") not in (None, "builtins.tuple", "builtins.list", "builtins.dict"):
            return False
        context = node.get("context")
        if context is not None:
            try:
                keys = json.loads(context)
            except (TypeError, ValueError):
                return False
            if keys is not None and not (
                isinstance(keys, list) and all(isinstance(k, str) and _NAME.fullmatch(k) for k in keys)
            ):
                return False
        return all(walk(v) for v in node.get("children_spec", []))

    return walk(doc)


def _check_program(node, path: str, key: str | None = None) -> None:
    """Walk the program JSON; ModelError at the first string or construct that could run code."""
    if isinstance(node, dict):
        for k, value in node.items():
            if not (isinstance(k, str) and _NAME.fullmatch(k)):
                raise _refuse(path, f"names {k!r} in its program, which is not a plain name")
            if k in _FORBIDDEN_KEYS:
                raise _refuse(path, f"uses {_FORBIDDEN_KEYS[k]}, which this loader does not run")
            if k in ("custom_obj_values", "treespec_namedtuple_fields") and value:
                raise _refuse(path, f"holds {k}, which this loader does not run")
            if k in _FREE_TEXT:
                continue
            _check_program(value, path, k)
    elif isinstance(node, list):
        for value in node:
            _check_program(value, path, key)
    elif isinstance(node, str):
        if key == "target":
            if not _operator_target(node):
                raise _refuse(path, f"calls {node[:80]!r}, which is not a registered torch operator")
        elif key == "expr_str":
            if not _expression_ok(node):
                raise _refuse(
                    path,
                    f"holds the shape expression {node[:80]!r}, which is not a plain sympy "
                    "expression (sympy would evaluate it as Python)",
                )
        elif key in ("in_spec", "out_spec"):
            if not _spec_ok(node):
                raise _refuse(path, f"holds an input/output structure ({key}) other than tuples, lists and dicts")
        elif key == "torch_version":
            if not re.fullmatch(r"[\w.+\-]*", node):
                raise _refuse(path, f"records the torch version {node[:40]!r}")
        elif not _NAME.fullmatch(node):
            raise _refuse(path, f"holds the string {node[:80]!r} where a plain name belongs ({key})")


def _sanitized_program(doc: dict, path: str) -> dict:
    """The program JSON without what is never needed to run it (guards code, stack traces), checked."""
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise _refuse(path, "has no program (models/model.json is not an exported program)")
    doc = dict(doc, guards_code=[])
    module = dict(doc["graph_module"], metadata={})
    graph = dict(module.get("graph") or {})
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise _refuse(path, "has a program without a node list")
    graph["nodes"] = [dict(n, metadata={}) if isinstance(n, dict) else n for n in nodes]
    module["graph"] = graph
    doc["graph_module"] = module
    _check_program(doc, path)
    return doc


# --------------------------------------------------------------------------- weights and constants
def _weights_only_globals() -> set[str]:
    """``module.name`` of every global ``torch.load(weights_only=True)`` accepts (tensor rebuilding, dtypes)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        names = set(_get_allowed_globals())
    except ImportError:  # pragma: no cover
        names = set()
    return names | {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch.FloatStorage",
        "collections.OrderedDict",
    }


def _pickle_globals(data: bytes) -> list[str]:
    """The globals a pickle would import, read from its opcodes without running it (``pickletools``).

    ``STACK_GLOBAL`` operands are followed through string pushes and the memo; an operand that cannot be
    read that way is reported as ``"?"`` (fail closed).
    """
    found, strings, memo = [], [], {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            found.append(f"{'builtins' if module == '__builtin__' else module}.{attr}")
        elif name in (
            "SHORT_BINUNICODE",
            "BINUNICODE",
            "BINUNICODE8",
            "UNICODE",
            "SHORT_BINSTRING",
            "BINSTRING",
            "STRING",
        ):
            strings.append(arg if isinstance(arg, str) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = strings[-1] if strings else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            strings.append(memo.get(int(arg)))
        elif name == "STACK_GLOBAL":
            module, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
            found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
            strings = strings[:-2]
        elif name in ("REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"):
            strings.append(None)
    return found


def _torch_save_globals(data: bytes) -> list[str]:
    """The globals of the ``data.pkl`` of a ``torch.save`` zip (``["?"]`` if it is not one)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            pickles = [n for n in inner.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                return ["?"]
            return _pickle_globals(inner.read(pickles[0]))
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        try:
            return _pickle_globals(data)
        except (ValueError, EOFError):
            return ["?"]


def _check_sample_inputs(archive: _Archive) -> None:
    """Refuse sample inputs whose pickle names more than tensor rebuilding (they are never loaded)."""
    data = archive.read(_SAMPLE_INPUTS, required=False)
    if not data:
        return
    allowed = _weights_only_globals()
    crafted = [g for g in _torch_save_globals(data) if g not in allowed]
    if crafted:
        raise _refuse(
            archive.path,
            f"holds sample inputs whose pickle would import {crafted[0]} (only tensors "
            "belong there: the archive was built to run code)",
        )


def _tensor_meta(meta, path: str, fqn: str):
    from torch._export.serde import schema
    from torch._export.serde.serialize import (
        _dict_to_dataclass,
        deserialize_scalar_type,
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
    )

    try:
        tm = _dict_to_dataclass(schema.TensorMeta, meta)
        return (
            deserialize_scalar_type(tm.dtype),
            deserialize_size(tm.sizes),
            deserialize_stride(tm.strides),
            deserialize_storage_offset(tm.storage_offset),
            bool(tm.requires_grad),
        )
    except Exception as exc:  # noqa: BLE001 - a malformed record, whatever the type
        raise _refuse(path, f"describes tensor {fqn!r} badly ({type(exc).__name__})") from None


def _raw_tensor(archive: _Archive, record: str, fqn: str, meta) -> torch.Tensor:
    dtype, size, stride, offset, _ = _tensor_meta(meta, archive.path, fqn)
    data = archive.read(record)
    numel = 1
    for v in size:
        numel *= int(v)
    if not data:
        if numel:
            raise _refuse(archive.path, f"gives tensor {fqn!r} of {numel} elements an empty record")
        return torch.empty(size, dtype=dtype)
    element = torch.empty((), dtype=dtype).element_size()
    if len(data) % element:
        raise _refuse(archive.path, f"stores tensor {fqn!r} in {len(data)} bytes, not whole {dtype} elements")
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    try:
        return torch.as_strided(flat, size, stride, offset)
    except RuntimeError:
        raise _refuse(archive.path, f"gives tensor {fqn!r} a shape its record does not hold") from None


def _pickled_tensor(archive: _Archive, record: str, fqn: str) -> torch.Tensor:
    """A tensor stored with ``use_pickle``: ``torch.load(weights_only=True)`` of a plain tensor, or nothing."""
    data = archive.read(record)
    crafted = [g for g in _torch_save_globals(data) if g not in _weights_only_globals()]
    if crafted:
        raise _refuse(archive.path, f"stores {fqn!r} as a pickle that would import {crafted[0]}")
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError and many others on a crafted record
        raise _refuse(
            archive.path, f"stores {fqn!r} as a pickle that weights-only loading refuses ({type(exc).__name__})"
        ) from None
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise _refuse(archive.path, f"stores {fqn!r} as a pickle of {type(value).__name__}, not a plain tensor")
    return value


def _payload(archive: _Archive, config_name: str, folder: str, prefix: str, what: str) -> dict:
    """Weights or constants: ``{fqn: tensor}`` from the archive's config and records."""
    raw = archive.read(config_name, required=False)
    if raw is None:
        raise _refuse(archive.path, f"lacks {config_name}")
    try:
        config = json.loads(raw)["config"]
    except (ValueError, KeyError, TypeError):
        raise _refuse(archive.path, f"has an unreadable {config_name}") from None
    if not isinstance(config, dict):
        raise _refuse(archive.path, f"has an unreadable {config_name}")
    out = {}
    for fqn, entry in config.items():
        if not (isinstance(fqn, str) and _NAME.fullmatch(fqn) and isinstance(entry, dict)):
            raise _refuse(archive.path, f"names a {what} {str(fqn)[:80]!r} that is not a plain name")
        record = entry.get("path_name")
        if not (isinstance(record, str) and re.fullmatch(re.escape(prefix) + r"\d+", record)):
            raise _refuse(
                archive.path,
                f"stores {what} {fqn!r} as {str(record)[:60]!r} (a custom object or unknown "
                "payload, which only a pickle could rebuild)",
            )
        if entry.get("use_pickle"):
            tensor = _pickled_tensor(archive, folder + record, fqn)
        else:
            tensor = _raw_tensor(archive, folder + record, fqn, entry.get("tensor_meta"))
        if entry.get("is_param"):
            requires_grad = bool((entry.get("tensor_meta") or {}).get("requires_grad", True))
            tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())
        out[fqn] = tensor
    return out


# --------------------------------------------------------------------------- the archive
class _Archive:
    """The records of a ``.pt2`` zip, by name below its root folder."""

    def __init__(self, path: str, data: bytes | None = None):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path if data is None else io.BytesIO(data))
            names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelError(f"{path}: not a readable torch.export archive ({exc})") from None
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or not all("/" in n for n in names):
            raise _refuse(path, "does not keep its records in one root folder")
        self.root = roots.pop() + "/"
        self.names = {n[len(self.root) :] for n in names}

    def read(self, name: str, required: bool = True) -> bytes | None:
        if name not in self.names:
            if required:
                raise _refuse(self.path, f"lacks the record {name}")
            return None
        try:
            return self.zip.read(self.root + name)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ModelError(f"{self.path}: cannot read record {name} of the archive ({exc})") from None

    def text(self, name: str, required: bool = True) -> str | None:
        data = self.read(name, required)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(self.path, f"holds {name} that is not UTF-8 text") from None

    def close(self) -> None:
        self.zip.close()


def _check_layout(archive: _Archive) -> None:
    from torch.export.pt2_archive.constants import ARCHIVE_VERSION_VALUE

    if (archive.text("archive_format", required=False) or "").strip() != "pt2":
        raise _refuse(archive.path, "is not of the pt2 archive format")
    version = (archive.text("archive_version", required=False) or "").strip()
    if version != ARCHIVE_VERSION_VALUE:
        raise ModelError(
            f"{archive.path}: torch.export archive version {version!r} is not the one this torch reads "
            f"({ARCHIVE_VERSION_VALUE}); re-export the model with this torch"
        )
    order = (archive.text("byteorder", required=False) or "little").strip()
    if order != sys.byteorder:
        raise ModelError(
            f"{archive.path}: the archive's tensors are {order}-endian and this machine is "
            f"{sys.byteorder}-endian; export the model on this kind of machine"
        )
    models = sorted(n for n in archive.names if n.startswith("models/") and n.endswith(".json"))
    if models != [_MODEL]:
        raise _refuse(
            archive.path,
            f"holds the programs {models or 'none'}; exactly one, models/model.json "
            "(torch.export.save of one program), is read",
        )
    legacy = [n for n in _LEGACY if n in archive.names]
    if legacy:
        raise _refuse(archive.path, f"stores its weights in the legacy pickle {legacy[0]}")


def load_exported_program(path: str, data: bytes | None = None) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """Read a ``torch.export.save`` archive without running anything in it.

    Parameters
    ----------
    path : str
        The ``.pt2`` file (with ``data``: only the name the messages give it).
    data : bytes, optional
        The archive's bytes, when it is held in memory (a program carried inside a surrogate checkpoint).

    Returns
    -------
    program : torch.export.ExportedProgram
        The program, its weights and constants (on the CPU), without sample inputs.
    extra_files : dict of str to str
        The archive's extra files (``extra_files`` of ``torch.export.save``), as text.

    Raises
    ------
    ModelError
        If the archive is not a readable pt2 archive of this torch version, or anything in it would need
        code to run to be read: a pickled weight or constant that is not a weights-only plain tensor, a
        custom object, sample inputs that import more than tensor rebuilding, a node that calls anything
        but a registered operator or shape arithmetic, a shape expression that is not a literal sympy
        expression, a name that is not plain, or a higher-order operator.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    archive = _Archive(path, data)
    try:
        _check_layout(archive)
        _check_sample_inputs(archive)
        try:
            doc = json.loads(archive.text(_MODEL))
        except (ValueError, RecursionError):
            raise _refuse(path, f"holds an unreadable {_MODEL}") from None
        doc = _sanitized_program(doc, path)
        state_dict = _payload(archive, _WEIGHTS_CONFIG, "data/weights/", "weight_", "weight")
        constants = _payload(archive, _CONSTANTS_CONFIG, "data/constants/", "tensor_", "constant")
        extra = {
            name[len(_EXTRA) :]: archive.text(name)
            for name in sorted(archive.names)
            if name.startswith(_EXTRA) and not name.endswith("/")
        }
    finally:
        archive.close()
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, doc)
        program = ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, None)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a program it cannot rebuild
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ModelError(f"cannot load torch.export program {path} ({type(exc).__name__}: {first})") from None
    _check_calls(program, path)
    return program, extra


def _check_calls(program, path: str) -> None:
    """Every call of every graph of the rebuilt program is an operator or shape arithmetic."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in getattr(graph, "nodes", ()):
            if node.op in ("call_module", "call_method"):
                raise _refuse(path, f"calls {node.op} {str(node.target)[:60]!r}")
            if node.op == "call_function" and not (
                isinstance(node.target, torch._ops.OpOverload) or node.target in _ALLOWED_CALLS
            ):
                raise _refuse(path, f"calls {str(node.target)[:80]!r}, which is not a registered torch operator")
