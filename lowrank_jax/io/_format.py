"""Shared plumbing of the file formats: safetensors bytes, JSON descriptions of adapter nodes, atomic writes.

Nothing here is pickled or ``eval``-ed: arrays travel as raw little-endian bytes in the safetensors
layout, everything else as JSON whose values are re-validated by the method classes' own
constructors on load.

Every file is untrusted input. :func:`load_json` parses JSON refusing repeated keys, ``NaN`` /
``Infinity`` and nesting deeper than :data:`MAX_JSON_DEPTH`; ``json_bool`` / ``json_int`` /
``json_number`` / ``json_str`` / ``json_shape`` check one value each and raise a ``ValueError``
``"<file>: <key> must be <expected>, got <value> (<type>)"`` (a JSON ``"false"`` is not a boolean,
``8.0`` or ``"8"`` not an integer). Method fields are checked against their annotations before the
constructor runs.

safetensors layout (https://github.com/huggingface/safetensors). Written here without the library:
``safetensors.numpy.load`` / ``safetensors.flax.load`` of bytes raise ``KeyError: 'BF16'`` in
safetensors 0.8 (bfloat16 adapters over bf16 bases must round-trip), and every defect of a file must
be reported precisely. Files written here are read by the library (and PEFT) unchanged::

    [8 bytes: N, little-endian uint64][N bytes: JSON header, space-padded][data bytes]
    header = {"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}

``data_offsets`` are relative to the start of the data section; the tensors tile it exactly, without
gaps or overlaps, and the file ends with the last tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import types
import typing
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lowrank_jax.adapter import AdapterParams
from lowrank_jax.layout import Layout

# ------------------------------------------------------------------------------------ untrusted JSON

MAX_JSON_DEPTH = 64


def _short(v: Any) -> str:
    text = repr(v)
    return (text[:120] + "…") if len(text) > 120 else text


def json_error(where: str, key: str, expected: str, got: Any) -> ValueError:
    """The ``ValueError`` of a bad value in a file: ``"<where>: <key> must be <expected>, got <value> (<type>)"``."""
    return ValueError(f"{where}: {key} must be {expected}, got {_short(got)} ({type(got).__name__})")


def check_json_depth(obj: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when ``obj`` nests deeper than :data:`MAX_JSON_DEPTH` levels."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refusing it")
        if isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)


def load_json(data: bytes | str, where: str) -> Any:
    """Parse the JSON text of a file as untrusted input.

    Raises ``ValueError`` naming ``where`` for: invalid UTF-8 or JSON ("corrupt or truncated"),
    a key repeated in one object (JSON parsers silently keep the last one), ``NaN``/``Infinity`` or
    numbers that overflow to infinity, and nesting deeper than :data:`MAX_JSON_DEPTH` levels (no
    ``RecursionError`` ever escapes).
    """
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"{where}: key {k!r} appears twice in one JSON object")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{where}: {name} is not a JSON number (non-finite values are refused)")

    def number(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise ValueError(f"{where}: number {text[:40]} overflows to infinity")
        return v

    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        obj = json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_float=number)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: corrupt or truncated: not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: corrupt or truncated: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refusing it") from None
    check_json_depth(obj, where)
    return obj


def json_bool(v: Any, where: str, key: str) -> bool:
    """``v`` if it is a JSON boolean (the string ``"false"`` is not), else :func:`json_error`."""
    if not isinstance(v, bool):
        raise json_error(where, key, "true or false", v)
    return v


def json_int(v: Any, where: str, key: str, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` if it is a JSON integer (not a bool, not ``8.0``, not ``"8"``) in ``[lo, hi]``."""
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = (f" in [{lo}, {hi}]" if lo is not None and hi is not None else
                  f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")
        raise json_error(where, key, f"an integer{bounds}", v)
    return v


def json_number(v: Any, where: str, key: str, *, positive: bool = False, below_one: bool = False) -> float:
    """``float(v)`` for a finite JSON number (not a bool or string); ``positive``: ``> 0``;
    ``below_one``: in ``[0, 1)`` (a probability such as dropout)."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and positive and not v > 0:
        ok = False
    if ok and below_one and not 0 <= v < 1:
        ok = False
    if not ok:
        what = "a finite number" + (" > 0" if positive else "") + (" in [0, 1)" if below_one else "")
        raise json_error(where, key, what, v)
    return float(v)


def json_str(v: Any, where: str, key: str) -> str:
    """``v`` if it is a JSON string."""
    if not isinstance(v, str):
        raise json_error(where, key, "a string", v)
    return v


def json_shape(v: Any, where: str, key: str) -> tuple[int, ...]:
    """``tuple(v)`` for a JSON list of integers >= 0 (an array shape)."""
    if not isinstance(v, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in v):
        raise json_error(where, key, "a list of integers >= 0 (a shape)", v)
    return tuple(v)


# ------------------------------------------------------------------------------------ safetensors

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_ST_NAMES = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _st_dtype_name(dtype: np.dtype, name: str) -> str:
    dtype = np.dtype(dtype)
    try:
        return _ST_NAMES[dtype.name]
    except KeyError:
        raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors "
                        f"(supported: {sorted(_ST_NAMES)})") from None


def safetensors_dumps(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize ``{name: array}`` (numpy / jax) to safetensors bytes; tensors laid out in name order."""
    header: dict[str, Any] = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata must map str to str, got {bad!r}")
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dt = _st_dtype_name(arr.dtype, name)
        data = np.ascontiguousarray(arr, dtype=_ST_DTYPES[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": [int(s) for s in arr.shape],
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def safetensors_loads(data: bytes, where: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``({name: numpy array}, metadata)``.

    Raises ``ValueError`` naming ``where`` and the defect (truncation, bad header JSON, a tensor
    name given twice, unknown dtype, a shape or offset that is not a list of non-negative integers,
    non-string metadata, offsets that do not tile the data section, trailing bytes). Every array
    is a copy of a slice of ``data``: nothing is allocated beyond twice the size of the input.
    """
    size = len(data)
    if size < 8:
        raise ValueError(f"{where}: truncated safetensors file: {size} bytes, less than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER or 8 + n > size:
        raise ValueError(f"{where}: corrupt or truncated safetensors file: header length field says {n} bytes "
                         f"but the file has {size} bytes")
    header = load_json(bytes(data[8:8 + n]), f"{where} (safetensors header)")
    if not isinstance(header, dict):
        raise ValueError(f"{where}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: corrupt safetensors header (__metadata__ is not an object)")
    for k, v in metadata.items():
        json_str(v, where, f"__metadata__[{k!r}]")
    body = memoryview(data)[8 + n:]
    entries = []
    for name, info in header.items():
        key = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise json_error(where, key, "an object with dtype, shape and data_offsets", info)
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise json_error(where, f"{key} dtype", f"one of {sorted(_ST_DTYPES)}", dtype)
        dt = _ST_DTYPES[dtype]
        shape = json_shape(info.get("shape"), where, f"{key} shape")
        offsets = info.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise json_error(where, f"{key} data_offsets", "a list [begin, end]", offsets)
        begin, end = (json_int(x, where, f"{key} data_offsets", lo=0) for x in offsets)
        if end - begin != math.prod(shape) * dt.itemsize:
            raise ValueError(f"{where}: tensor {name!r}: shape {list(shape)} of {dtype} needs "
                             f"{math.prod(shape) * dt.itemsize} bytes but its offsets span {end - begin}")
        entries.append((begin, end, name, dt, shape))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            raise ValueError(f"{where}: corrupt safetensors header: tensor {name!r} starts at byte {begin}, "
                             f"expected {pos} (gap or overlap)")
        pos = end
    if pos != len(body):
        what = "truncated" if pos > len(body) else "has trailing bytes"
        raise ValueError(f"{where}: safetensors file {what}: the header describes {pos} data bytes, "
                         f"the file holds {len(body)}")
    arrays = {name: np.frombuffer(body[b:e], dtype=dt).reshape(shape).copy() for b, e, name, dt, shape in entries}
    return arrays, dict(metadata)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    return safetensors_loads(data, str(path))


# ------------------------------------------------------------------------------------ atomic files

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_dir(path: str | os.PathLike, files: Mapping[str, bytes], *, overwrite: bool,
                     replaceable: Iterable[str]) -> None:
    """Create directory ``path`` holding exactly ``files``, atomically.

    The files are written and fsynced in a temporary sibling directory that is then renamed to
    ``path``: a reader sees either no directory or a complete one. When ``path`` already exists
    (and ``overwrite``), it must contain nothing but names in ``replaceable`` (so a wrong ``path``
    never wipes unrelated data); it is renamed aside, the new directory renamed in, and the old one
    deleted — between those two renames ``path`` is briefly absent, never partial.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
        allowed = set(replaceable)
        others = sorted(p.name for p in path.iterdir() if p.name not in allowed)
        if others:
            raise FileExistsError(f"{path} exists and holds files this format does not write ({others[:5]}); "
                                  "refusing to replace it")
    tmp = parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    old = parent / f".{path.name}.old-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        _fsync_dir(tmp)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ JSON of methods

def _method_registry() -> dict[str, type]:
    from lowrank_jax.methods import DoRA, DVoRA, LoRA, VeRA
    from lowrank_jax.quant.config import NF4
    return {"LoRA": LoRA, "DoRA": DoRA, "VeRA": VeRA, "DVoRA": DVoRA, "NF4": NF4, **_EXTRA_CLASSES}


_EXTRA_CLASSES: dict[str, type] = {}


def register_method(cls: type, name: str | None = None) -> type:
    """Allow a custom frozen-dataclass method (or config) class in saved files, under ``name``.

    Saved files record a method as ``{"class": name, "fields": {...}}`` and re-create it with
    ``cls(**fields)`` — only classes registered here (plus LoRA, DoRA, VeRA, NF4) are ever created.
    Usable as a decorator.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_method: {cls!r} is not a dataclass")
    _EXTRA_CLASSES[name or cls.__name__] = cls
    return cls


def _class_name(obj: Any) -> str:
    for name, cls in _method_registry().items():
        if type(obj) is cls:
            return name
    raise TypeError(f"cannot save a {type(obj).__name__} value: not a known method/config class "
                    f"({sorted(_method_registry())}); register it with lowrank_jax.io.register_method")


def value_to_json(v: Any) -> Any:
    """A method field as JSON: tuples → lists, nested dataclasses → ``{"class", "fields"}``."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot save non-finite float {v!r}")
        return v
    if isinstance(v, (tuple, list)):
        return [value_to_json(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return method_to_json(v)
    raise TypeError(f"cannot save a field value of type {type(v).__name__}: {v!r}")


def method_to_json(method: Any) -> dict[str, Any]:
    """``{"class": "LoRA", "fields": {"rank": 8, "alpha": 16.0, "targets": [...], "quant": None, ...}}``."""
    name = _class_name(method)
    return {"class": name,
            "fields": {f.name: value_to_json(getattr(method, f.name)) for f in dataclasses.fields(method)}}


def _value_from_json(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_value_from_json(x) for x in v)
    if isinstance(v, dict):
        return method_from_json(v)
    return v


def _hint_matches(value: Any, hint: Any) -> bool:
    """Does the JSON-decoded ``value`` (lists already tuples) fit the field annotation ``hint``?

    Understood: ``bool``, ``int`` (not bool), ``float`` (int or float, not bool), ``str``, ``None``,
    unions, ``tuple[X, ...]`` and dataclasses; anything else (``Any``, …) is left to the
    class's constructor.
    """
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_hint_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_hint_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_hint_matches(v, a) for v, a in zip(value, args))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def method_from_json(d: Any) -> Any:
    """Inverse of :func:`method_to_json`.

    Each field value must fit the field's annotation (``"rslora": "false"`` is not a bool,
    ``"rank": 8.0`` not an int: see :func:`_hint_matches`), then the class's constructor
    re-validates every field; failures raise ``ValueError`` naming the class and field.
    """
    if not isinstance(d, dict) or set(d) != {"class", "fields"} or not isinstance(d["fields"], dict):
        raise ValueError(f"not a method description: {_short(d)}")
    registry = _method_registry()
    cls = registry.get(d["class"]) if isinstance(d["class"], str) else None
    if cls is None:
        raise ValueError(f"unknown method class {d['class']!r} (known: {sorted(registry)}; custom classes "
                         "must be registered with lowrank_jax.io.register_method)")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d["fields"]) - names
    if unknown:
        raise ValueError(f"{d['class']}: unknown fields {sorted(unknown)} (this version has {sorted(names)})")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolvable annotations: the constructor alone validates
        hints = {}
    values = {k: _value_from_json(v) for k, v in d["fields"].items()}
    for k, v in values.items():
        if k in hints and not _hint_matches(v, hints[k]):
            want = hints[k].__name__ if isinstance(hints[k], type) else str(hints[k])
            raise ValueError(f"{d['class']}: field {k!r} must be {want}, got {_short(d['fields'][k])} "
                             f"({type(d['fields'][k]).__name__})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {d['class']} description {_short(d['fields'])}: {e}") from None


def layout_to_json(layout: Layout) -> dict[str, Any]:
    return {"in_axes": list(layout.in_axes), "out_axes": list(layout.out_axes), "stack": layout.stack}


def layout_from_json(d: Any) -> Layout:
    """A :class:`~lowrank_jax.Layout` from ``{"in_axes": [ints], "out_axes": [ints], "stack": int}`` (strict types)."""
    if not isinstance(d, dict) or set(d) != {"in_axes", "out_axes", "stack"}:
        raise ValueError(f"invalid layout description {_short(d)}: expected keys in_axes, out_axes, stack")
    try:
        return Layout(in_axes=json_shape(d["in_axes"], "layout", "in_axes"),
                      out_axes=json_shape(d["out_axes"], "layout", "out_axes"),
                      stack=json_int(d["stack"], "layout", "stack", lo=0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid layout description {_short(d)}: {e}") from None


# ------------------------------------------------------------------------------------ adapter <-> JSON

FORMAT_VERSION = 1


def _key_parts(path: tuple) -> list[str | int]:
    out: list[str | int] = []
    for k in path:
        if hasattr(k, "key"):
            k = k.key
        elif hasattr(k, "idx"):
            k = k.idx
        else:
            raise TypeError(f"adapter: unsupported container key {k!r}; adapters are nested dicts")
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise TypeError(f"adapter: dict key {k!r} is a {type(k).__name__}; only str and int keys can be saved")
        out.append(k)
    return out


def describe_adapter(adapter: Any, *, with_arrays: bool = True) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """``(nodes, tensors)``: the JSON description of every adapter node and its arrays by tensor name.

    Tensor names are the ``/``-joined node path plus the array name (``enc/layer_0/query/kernel/a``);
    two arrays whose names would coincide (keys holding ``/``, or ``0`` and ``"0"``) raise
    ``ValueError`` naming both. The adapter must be a nested dict (as :func:`lowrank_jax.init` makes) with
    :class:`~lowrank_jax.AdapterParams` leaves.
    """
    import jax

    def walk(tree: Any, prefix: tuple) -> Iterable[tuple[tuple, AdapterParams]]:
        if isinstance(tree, AdapterParams):
            yield prefix, tree
        elif isinstance(tree, dict):
            for k in tree:  # insertion order; JSON keeps it
                yield from walk(tree[k], prefix + (jax.tree_util.DictKey(k),))
        else:
            where = "/".join(str(x) for x in _key_parts(prefix)) or "<root>"
            raise TypeError(f"adapter: {where} is a {type(tree).__name__}; expected nested dicts of AdapterParams")

    nodes: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, tuple[list, str]] = {}
    for path, node in walk(adapter, ()):
        parts = _key_parts(path)
        base = "/".join(str(p) for p in parts)
        arrays = {}
        for name, value in node.params.items():
            tname = f"{base}/{name}" if base else name
            if tname in owner:
                raise ValueError(f"adapter: array {owner[tname][1]!r} of node {owner[tname][0]!r} and array "
                                 f"{name!r} of node {parts!r} both map to the tensor name {tname!r} (a key "
                                 "holding '/', or an int and a str key that print alike); rename one of the keys")
            owner[tname] = (parts, name)
            arr = np.asarray(value) if with_arrays else value
            tensors[tname] = arr
            arrays[name] = {"tensor": tname, "shape": [int(s) for s in arr.shape], "dtype": np.dtype(arr.dtype).name}
        nodes.append({
            "path": parts,
            "method": method_to_json(node.method),
            "layout": layout_to_json(node.layout),
            "shape": list(node.shape),
            "dtype": node.dtype,
            "shared": node.shared,
            "arrays": arrays,
        })
    if not nodes:
        raise ValueError("adapter: no AdapterParams nodes to save")
    return nodes, tensors


def check_node_arrays(path: str, node: AdapterParams, where: str) -> None:
    """Raise ``ValueError`` when ``node``'s arrays do not have the shapes its method implies."""
    n_in, n_out = node.layout.matrix_shape(node.shape)
    stack = node.layout.stack_shape(node.shape)
    want = {k: stack + tuple(v) for k, v in node.method.param_shapes(n_in, n_out).items()}
    if set(want) != set(node.params):
        raise ValueError(f"{where}: {path}: arrays {sorted(node.params)} do not match "
                         f"{type(node.method).__name__}'s {sorted(want)}")
    for k, v in node.params.items():
        if tuple(v.shape) != want[k]:
            raise ValueError(f"{where}: {path}: array {k!r} has shape {tuple(v.shape)} but a "
                             f"{type(node.method).__name__} on a kernel of shape {node.shape} needs {want[k]}")


def node_from_json(d: Any, where: str) -> tuple[list, AdapterParams | None, dict[str, dict]]:
    """``(path keys, AdapterParams with no arrays yet, array specs)`` from one node description.

    Every value is type-checked (path: non-empty list of str/int keys; shape: list of ints >= 0;
    dtype: a dtype name; shared: str or null; arrays: ``{name: {"tensor": str, "shape": [...],
    "dtype": str}}``); errors are ``ValueError`` naming ``where`` and the key.
    """
    if not isinstance(d, dict):
        raise json_error(where, "node", "an object", d)
    missing = sorted({"path", "method", "layout", "shape", "dtype", "shared", "arrays"} - set(d))
    if missing:
        raise ValueError(f"{where}: malformed node description (missing {missing}): {_short(d)}")
    parts = d["path"]
    if not isinstance(parts, list) or not parts or any(isinstance(p, bool) or not isinstance(p, (str, int))
                                                        for p in parts):
        raise json_error(where, "node path", "a non-empty list of string or integer keys", parts)
    pstr = "/".join(map(str, parts))
    shape = json_shape(d["shape"], where, f"{pstr}: shape")
    dtype = json_str(d["dtype"], where, f"{pstr}: dtype")
    try:
        import jax.numpy as jnp
        jnp.dtype(dtype)
    except TypeError:
        raise json_error(where, f"{pstr}: dtype", "a dtype name", dtype) from None
    shared = d["shared"]
    if shared is not None:
        json_str(shared, where, f"{pstr}: shared")
    arrays = d["arrays"]
    if not isinstance(arrays, dict):
        raise json_error(where, f"{pstr}: arrays", "an object", arrays)
    for name, spec in arrays.items():
        key = f"{pstr}: arrays[{name!r}]"
        if not isinstance(spec, dict):
            raise json_error(where, key, "an object with tensor, shape and dtype", spec)
        json_str(spec.get("tensor"), where, f"{key}.tensor")
        json_shape(spec.get("shape"), where, f"{key}.shape")
        json_str(spec.get("dtype"), where, f"{key}.dtype")
    try:
        method = method_from_json(d["method"])
        layout = layout_from_json(d["layout"])
        layout.check(shape, pstr)
    except ValueError as e:
        raise ValueError(f"{where}: {pstr}: {e}") from None
    return list(parts), AdapterParams({}, method, layout, shape, dtype, shared), dict(arrays)


def build_adapter(nodes: list[Any], fetch, where: str) -> dict:
    """Re-create the adapter dict from node descriptions; ``fetch(tensor_name, spec, path, name)`` returns each array.

    Names must be unambiguous: two nodes whose paths read alike (``["a", 0]`` and ``["a", "0"]``,
    ``["a/b"]`` and ``["a", "b"]``) and two arrays naming one tensor are refused with a ``ValueError``.
    """
    if not isinstance(nodes, list) or not nodes:
        raise ValueError(f"{where}: the description lists no adapter nodes")
    adapter: dict = {}
    seen_paths: dict[str, list] = {}
    seen_tensors: dict[str, str] = {}
    for d in nodes:
        parts, empty, specs = node_from_json(d, where)
        pstr = "/".join(map(str, parts))
        if pstr in seen_paths:
            raise ValueError(f"{where}: node paths {seen_paths[pstr]!r} and {parts!r} both read as {pstr!r}; "
                             "two adapter nodes cannot share a path")
        seen_paths[pstr] = parts
        arrays = {}
        for name, spec in specs.items():
            tname = spec["tensor"]
            if tname in seen_tensors:
                raise ValueError(f"{where}: tensor {tname!r} is named by both {seen_tensors[tname]} and "
                                 f"{pstr}/{name}; every array needs its own tensor")
            seen_tensors[tname] = f"{pstr}/{name}"
            arrays[name] = fetch(tname, spec, pstr, name)
        node = AdapterParams(arrays, empty.method, empty.layout, empty.shape, empty.dtype, empty.shared)
        check_node_arrays(pstr, node, where)
        cur = adapter
        for k in parts[:-1]:
            nxt = cur.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"{where}: node paths overlap at {pstr}")
            cur = nxt
        if parts[-1] in cur:
            raise ValueError(f"{where}: node paths overlap at {pstr}")
        cur[parts[-1]] = node
    return adapter


def canonical_sha256(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name
