"""Saving and loading models in the safetensors format (docs/format.md);
the `safetensors` package is not needed at run time.

A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
(padded with spaces to a multiple of 8) and the raw little-endian C-order
tensor bytes::

    {"__metadata__": {"format": "convcore", "convcore_version": "...",
                      "convcore_graph": "<the network graph as JSON>",
                      "convcore_architecture": "<Module.architecture() as JSON>", ...},
     "features.0.weight": {"dtype": "F32", "shape": [64, 3, 11, 11],
                           "data_offsets": [0, 92928]}, ...}

Tensor names are those of Module.state_dict() (PyTorch's), so the files are
readable by the `safetensors` package and by PyTorch, and state dicts saved
from PyTorch load with `load_state_dict_file`.

Reading never trusts the file. The header (its length, the JSON, every
dtype, shape and byte range) and the network graph with its tensors are
checked by the C++ reader that convcore::Net uses (convcore._core), so a
file is refused for the same reasons, in the same words, from Python and
from C++; the architecture (the module tree Python rebuilds to train) is
checked here before anything is built. Every problem is a ValueError naming
the file and the fault.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from ._version import __version__
from .nn.lowering import LoweringError, to_graph
from .nn.module import Module, from_architecture, provide

__all__ = ["save", "load", "save_state_dict_file", "load_state_dict_file", "MAX_HEADER_BYTES"]

# The same bound as the safetensors reference implementation: a header larger
# than this is a corrupt length, not a real file.
MAX_HEADER_BYTES = 100_000_000

# Architecture trees deeper or larger than this are not real networks.
_MAX_ARCH_DEPTH = 64
_MAX_ARCH_NODES = 100_000

_MAX_NDIM = 32

# safetensors dtype name -> numpy dtype of the bytes in the file (little-endian)
_FILE_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 on reading (numpy has no bfloat16)
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}

_NATIVE = {name: np.dtype(dt.kind + str(dt.itemsize)) for name, dt in _FILE_DTYPES.items()}

# numpy dtype -> safetensors name, for writing
_WRITE_NAMES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}

_RESERVED_METADATA = ("format", "convcore_version", "convcore_graph", "convcore_architecture",
                      "convcore_training")


# ----------------------------------------------------------------------- helpers

def _fspath(path, name: str = "path") -> str:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"cannot load {path!r}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(value, limit: int = 120) -> str:
    """repr() cut to a readable length (a corrupt header can hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_object(pairs):
    """object_pairs_hook that rejects duplicate keys (JSON would keep the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_json(text: str):
    return json.loads(text, object_pairs_hook=_json_object, parse_constant=_reject_constant)


# ----------------------------------------------------------------------- writing

def _encode_header(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _atomic_write(path: str, chunks) -> None:
    """Writes the chunks to a temporary file beside `path`, syncs it and renames
    it over `path`, so that `path` is either the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    # os.open with 0o666 lets the umask decide the permissions, as open() would
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _check_metadata(metadata, name: str = "metadata") -> Dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{name} must be a dict of str to str, got {type(metadata).__name__}")
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{name} must map str to str; {k!r}: {v!r} is "
                            f"{type(k).__name__} to {type(v).__name__}")
        out[k] = v
    return out


def save_state_dict_file(tensors: Mapping[str, np.ndarray], path,
                         metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes arrays by name (and optional str metadata) as a safetensors file,
    atomically. Arrays of 8-byte dtypes come first in the data so that every
    tensor starts at a multiple of its item size."""
    path = _fspath(path)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name to array, got {type(tensors).__name__}")
    meta = _check_metadata(metadata)
    arrays = []
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensors: names must be str, got {key!r}")
        if key == "__metadata__":
            raise ValueError("tensors: '__metadata__' is reserved by the format")
        arr = np.asarray(value)
        name = _WRITE_NAMES.get(arr.dtype.newbyteorder("="))
        if name is None:
            raise TypeError(f"tensors[{key!r}] has dtype {arr.dtype}, which safetensors cannot "
                            f"store (use one of {sorted(str(d) for d in _WRITE_NAMES)})")
        # (not np.ascontiguousarray, which turns a 0-d array into a 1-d one)
        arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
        arrays.append((key, name, arr))
    header = {}
    if meta:
        header["__metadata__"] = meta
    order = sorted(range(len(arrays)), key=lambda i: -arrays[i][2].dtype.itemsize)
    offsets = {}
    pos = 0
    for i in order:
        nbytes = arrays[i][2].nbytes
        offsets[i] = (pos, pos + nbytes)
        pos += nbytes
    for i, (key, name, arr) in enumerate(arrays):  # header keys in the caller's order
        header[key] = {"dtype": name, "shape": [int(d) for d in arr.shape],
                       "data_offsets": list(offsets[i])}
    head = _encode_header(header)

    def chunks():
        yield struct.pack("<Q", len(head))
        yield head
        for i in order:
            arr = arrays[i][2]
            if arr.nbytes:
                yield memoryview(arr.reshape(-1)).cast("B")

    _atomic_write(path, chunks())


def save(model, path, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Saves a model: its state dict (PyTorch's key names) and, in the file's
    metadata, its network graph (what the C++ runtime and convcore.compile
    run, docs/format.md) and its architecture, so that `load(path)` rebuilds
    it. A model that cannot be written as a graph (a Module subclass with its
    own forward and no `lower` method) is saved without one, with a
    UserWarning. `metadata` adds str -> str entries of your own (e.g.
    {"epoch": "12"})."""
    if not isinstance(model, Module):
        raise TypeError(f"model must be a convcore.nn.Module, got {type(model).__name__}")
    path = _fspath(path)
    user = _check_metadata(metadata)
    clash = [k for k in user if k in _RESERVED_METADATA]
    if clash:
        raise ValueError(f"metadata: keys {clash} are reserved by convcore")
    try:
        arch = json.dumps(model.architecture(), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: its architecture() is not JSON-serialisable ({e})") from None
    meta = {"format": "convcore", "convcore_version": str(__version__)}
    try:
        graph = to_graph(model)
    except LoweringError as e:
        # Python rebuilds the model from its architecture; only the graph's
        # readers need the lowering.
        graph = None
        warnings.warn(f"{e}. Saved without a network graph: the file loads in Python "
                      f"(convcore.load) but the C++ runtime and convcore.compile cannot run it",
                      UserWarning, stacklevel=2)
    if graph is not None:
        try:
            meta["convcore_graph"] = json.dumps(graph, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model: its network graph is not JSON-serialisable ({e})") from None
    meta.update({"convcore_architecture": arch,
                 "convcore_training": "true" if model.training else "false"})
    meta.update(user)
    save_state_dict_file(model.state_dict(), path, meta)


# ----------------------------------------------------------------------- reading

def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _parse(buf: bytes, path: str):
    """Checks a whole safetensors file in memory with the C++ reader (the one
    convcore::Net uses: the same checks and messages) and returns its tensors
    (native-endian copies), its metadata and each tensor's (name, file dtype,
    shape)."""
    from . import _core

    entries, metadata, data_start = _core.safetensors_header(buf, path)
    tensors = OrderedDict()
    infos = []
    for name, dtype_name, shape, begin, end in entries:
        file_dtype = _FILE_DTYPES[dtype_name]
        count = (end - begin) // file_dtype.itemsize
        if count == 0:
            flat = np.zeros(0, dtype=file_dtype)
        else:
            flat = np.frombuffer(buf, dtype=file_dtype, count=count, offset=data_start + begin)
        if dtype_name == "BF16":
            arr = (flat.astype(np.uint32) << 16).view(np.float32)
        elif dtype_name == "BOOL":
            arr = flat != 0
        else:
            # a writable copy in numpy's canonical native dtype (the core's
            # bindings recognise dtypes by identity, so not a byte-order variant)
            arr = flat.astype(_NATIVE[dtype_name])
        tensors[name] = arr.reshape(shape)
        infos.append((name, dtype_name, list(shape)))
    return tensors, dict(metadata), infos


def load_state_dict_file(path) -> Tuple["OrderedDict[str, np.ndarray]", Dict[str, str]]:
    """Reads any safetensors file (one from `save`, from the `safetensors`
    package, from PyTorch's state dicts) and returns (OrderedDict of arrays by
    name in the header's order, metadata dict, empty when the file has none).
    BF16 tensors are widened to float32. Raises ValueError for a malformed file."""
    path = _fspath(path)
    tensors, metadata, _ = _parse(_read_file(path), path)
    return tensors, metadata


def _check_tree(node, path: str, depth: int = 0, count=None) -> int:
    """Bounds the depth and size of an architecture tree before anything is built."""
    count = count if count is not None else [0]
    count[0] += 1
    if depth > _MAX_ARCH_DEPTH:
        raise _bad(path, f"the architecture is nested more than {_MAX_ARCH_DEPTH} levels deep")
    if count[0] > _MAX_ARCH_NODES:
        raise _bad(path, f"the architecture has more than {_MAX_ARCH_NODES} modules")
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise _bad(path, f"bad architecture node (needs a dict with a string 'type'): "
                         f"{_short(node)}")
    if not isinstance(node.get("config", {}), dict):
        raise _bad(path, f"architecture node {_short(node['type'])}: 'config' is not an object")
    children = node.get("children", {})
    if not isinstance(children, dict):
        raise _bad(path, f"architecture node {_short(node['type'])}: 'children' is not an object")
    for child in children.values():
        _check_tree(child, path, depth + 1, count)
    return count[0]


def _ints(config: dict, *names):
    values = []
    for name in names:
        v = config.get(name)
        if isinstance(v, list) and v and all(_is_int(x) for x in v):
            values.extend(v)
        elif _is_int(v):
            values.append(v)
        else:
            return None
    return values if all(x > 0 for x in values) else None


def _min_values(node: dict) -> int:
    """A lower bound on the parameter and buffer values the architecture's
    known layers will allocate, computed from their configs alone (unknown
    types count their listed children). Lets `load` refuse an architecture
    that asks for far more memory than the file holds values, before any
    allocation."""
    kind, config = node["type"], node.get("config", {})
    if kind == "Conv2d":
        v = _ints(config, "in_channels", "out_channels", "kernel_size")
        if v is not None:
            groups = config.get("groups", 1)
            groups = groups if _is_int(groups) and groups > 0 else 1
            prod = 1
            for x in v[2:]:
                prod *= x
            return v[0] * v[1] // groups * prod
        return 0
    if kind == "Linear":
        v = _ints(config, "in_features", "out_features")
        return v[0] * v[1] if v is not None else 0
    if kind == "BatchNorm2d":
        v = _ints(config, "num_features")
        return v[0] if v is not None else 0
    if kind == "BasicBlock":  # conv1 (inplanes -> planes, 3x3) and conv2 (planes -> planes)
        v = _ints(config, "inplanes", "planes")
        return 9 * v[1] * (v[0] + v[1]) if v is not None else 0
    if kind == "Bottleneck":  # conv1 (inplanes -> width) and conv3 (width -> 4 * planes), 1x1
        v = _ints(config, "inplanes", "planes", "groups", "base_width")
        if v is None:
            return 0
        width = max(0, v[1] * v[3] // 64 - 1) * v[2]
        return width * (v[0] + 4 * v[1])
    return sum(_min_values(c) for c in node.get("children", {}).values())


def load(path):
    """Loads a model saved by `save`: rebuilds it from the architecture in the
    file's metadata and loads its tensors (strictly: every name and shape must
    match). A float64 file gives a float64 model. Raises ValueError, naming the
    file and the fault, for anything malformed or inconsistent."""
    from . import _core

    path = _fspath(path)
    tensors, metadata, infos = _parse(_read_file(path), path)
    if "convcore_graph" in metadata:  # the graph and the tensors, checked as C++ checks them
        _core.check_model(metadata, infos, path)
    if "convcore_architecture" not in metadata:
        raise _bad(path, "no convcore architecture in the metadata (not saved by "
                         "convcore.save? read its tensors with load_state_dict_file)")
    try:
        arch = _parse_json(metadata["convcore_architecture"])
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"the architecture in the metadata is not valid JSON ({e})") from None
    _check_tree(arch, path)
    held = sum(a.size for a in tensors.values())
    need = _min_values(arch)
    if need > held:
        raise _bad(path, f"the architecture needs at least {need} parameter values but the "
                         f"file holds {held}")
    try:
        model = from_architecture(arch)
    except MemoryError:
        raise _bad(path, "the architecture asks for more memory than is available") from None
    except Exception as e:  # a config the constructors reject, whatever they raise
        raise _bad(path, f"cannot rebuild the architecture: {type(e).__name__}: {e}") from None

    float_dtypes = {a.dtype for a in tensors.values() if a.dtype.kind == "f"}
    if float_dtypes == {np.dtype(np.float64)}:
        model.to(np.float64)
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        parts = ([f"missing {missing}"] if missing else []) + \
            ([f"unexpected {unexpected}"] if unexpected else [])
        raise _bad(path, f"the tensors do not match the architecture: {'; '.join(parts)}")
    for key, expected in own.items():
        got = tensors[key]
        if got.shape != expected.shape:
            raise _bad(path, f"tensor {key!r} has shape {list(got.shape)} but the architecture "
                             f"needs {list(expected.shape)}")
        ok = (got.dtype.kind == "f") if expected.dtype.kind == "f" else got.dtype.kind in "iu"
        if not ok:
            raise _bad(path, f"tensor {key!r} has dtype {got.dtype}, the model needs "
                             f"{expected.dtype}")
    try:
        model.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError) as e:
        raise _bad(path, f"the tensors do not fit the model: {e}") from None
    training = metadata.get("convcore_training", "true")
    model.train(training != "false")
    return model


provide("save", save)  # Module.save (nn does not import this module)
