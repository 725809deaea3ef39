"""convcore.io: saving and loading models as safetensors files.

Round trips, interchange with the `safetensors` package and PyTorch, and a
catalogue of corrupt files that must each raise a ValueError (never a crash
or another exception), plus a small fuzz of random byte flips."""

import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convcore
import convcore.nn as nn
from convcore import io as cio
from convcore.nn import init


# ------------------------------------------------------------------------ models

def plain_net():
    """Every simple layer type: input (3, 8, 8)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.LocalResponseNorm(5, alpha=1e-3, beta=0.75, k=2.0),
        nn.Conv2d(8, 4, 3, bias=False), nn.ReLU(), nn.AvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.5), nn.Linear(4 * 2 * 2, 10))


def residual_net():
    """A stem, two BasicBlocks (one with a projection shortcut) and a
    Bottleneck: input (3, 8, 8)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.BasicBlock(8, 8), nn.BasicBlock(8, 16, stride=2), nn.Bottleneck(16, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def tiny_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 2 * 2, 3))


def trained_state(model, shape, seed=0):
    """Runs a few training-mode forward passes so that batch-norm running
    statistics and num_batches_tracked are not their initial values."""
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(3):
        model(rng.standard_normal((4,) + shape).astype(model.dtype))
    return model


MODELS = {
    "plain": (plain_net, (3, 8, 8)),
    "residual": (residual_net, (3, 8, 8)),
    "tiny": (tiny_net, (1, 4, 4)),
}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert sa[k].shape == sb[k].shape, k
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


# ------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_gives_identical_state_and_outputs(tmp_path, name, dtype):
    init.manual_seed(1)
    build, shape = MODELS[name]
    model = trained_state(build().to(dtype), shape)
    model.eval()
    path = tmp_path / "model.safetensors"
    cio.save(model, path)
    loaded = cio.load(path)
    assert type(loaded) is type(model)
    assert loaded.architecture() == model.architecture()
    assert loaded.dtype == np.dtype(dtype)
    assert_same_state(model, loaded)
    assert not loaded.training  # the eval/train mode is restored
    x = np.random.default_rng(2).standard_normal((3,) + shape).astype(dtype)
    np.testing.assert_array_equal(model(x), loaded(x))
    # and the loaded model trains: forward and backward run
    loaded.train()
    out = loaded(x)
    loaded.backward(np.ones_like(out))


def _as_format_1(src, dst):
    """A copy of a saved file as convcore wrote it before the network graph
    existed (format 1): the same tensors and architecture, no convcore_graph."""
    tensors, metadata = cio.load_state_dict_file(src)
    del metadata["convcore_graph"]
    cio.save_state_dict_file(tensors, dst, metadata)


@pytest.mark.parametrize("name", list(MODELS))
def test_files_of_format_1_still_load_and_compile(tmp_path, name):
    """Nothing a user saved is lost: a format-1 file loads in Python (from its
    module tree) and in the C++ reader (its tree lowered to a graph), and
    both compute what the saved model computed."""
    init.manual_seed(1)
    build, shape = MODELS[name]
    model = trained_state(build(), shape).eval()
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    cio.save(model, new)
    _as_format_1(new, old)
    assert "convcore_graph" not in cio.load_state_dict_file(old)[1]
    loaded = cio.load(old)
    assert_same_state(model, loaded)
    x = np.random.default_rng(2).standard_normal((3,) + shape).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
    # the C++ reader lowers the module tree to the graph Python writes: the
    # same engine, bit for bit
    from_file = convcore._core.CompiledNet(str(old))
    np.testing.assert_array_equal(from_file.forward(x), convcore.compile(model)(x))


def test_training_mode_is_restored(tmp_path):
    model = tiny_net().train()
    cio.save(model, tmp_path / "m.safetensors")
    assert cio.load(tmp_path / "m.safetensors").training


def test_file_layout(tmp_path):
    model = trained_state(plain_net(), (3, 8, 8))
    path = tmp_path / "m.safetensors"
    cio.save(model, str(path), metadata={"epoch": "12", "note": "héllo"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:9] == b"{"
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__")
    assert meta["format"] == "convcore"
    assert meta["convcore_version"] == convcore.__version__
    assert json.loads(meta["convcore_architecture"]) == model.architecture()
    assert json.loads(meta["convcore_graph"]) == model.to_graph()
    assert meta["epoch"] == "12" and meta["note"] == "héllo"
    assert list(header) == list(model.state_dict())
    assert header["1.num_batches_tracked"]["dtype"] == "I64"
    assert header["1.num_batches_tracked"]["shape"] == []
    ends = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert ends[0][0] == 0 and ends[-1][1] == len(raw) - 8 - n
    for e in header.values():  # each tensor starts at a multiple of its item size
        assert e["data_offsets"][0] % (8 if e["dtype"] in ("I64", "F64") else 4) == 0
    tensors, metadata = cio.load_state_dict_file(path)
    assert metadata == meta
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(tensors[k], v)
        assert tensors[k].dtype == v.dtype and tensors[k].flags.writeable


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "m.safetensors"
    cio.save(tiny_net(), path)
    first = path.read_bytes()

    def failing_chunks():
        yield b"partial data"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        cio._atomic_write(str(path), failing_chunks())
    assert path.read_bytes() == first  # the old file is untouched
    assert os.listdir(tmp_path) == ["m.safetensors"]  # and the temporary file is gone
    cio.save(plain_net(), path)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert path.read_bytes() != first


def test_save_argument_errors(tmp_path):
    model = tiny_net()
    with pytest.raises(TypeError, match="model"):
        cio.save({"w": np.zeros(3)}, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="path"):
        cio.save(model, 42)
    with pytest.raises(TypeError, match="metadata"):
        cio.save(model, tmp_path / "m.safetensors", metadata={"epoch": 3})
    with pytest.raises(TypeError, match="metadata"):
        cio.save(model, tmp_path / "m.safetensors", metadata=["epoch"])
    with pytest.raises(ValueError, match="reserved"):
        cio.save(model, tmp_path / "m.safetensors", metadata={"format": "pt"})
    with pytest.raises(TypeError, match="tensors"):
        cio.save_state_dict_file({"a": np.array(["x"])}, tmp_path / "t.safetensors")
    with pytest.raises(TypeError, match="tensors"):
        cio.save_state_dict_file({"a": np.zeros(2, np.complex64)}, tmp_path / "t.safetensors")
    assert not os.listdir(tmp_path)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        cio.load(tmp_path / "nope.safetensors")


def test_state_dict_file_round_trip_of_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((2, 3)), "f32": rng.standard_normal(5).astype(np.float32),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": np.array(7, dtype=np.int64), "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "i16": np.arange(3, dtype=np.int16), "i8": np.array([-1, 2], dtype=np.int8),
        "u8": np.arange(9, dtype=np.uint8), "u16": np.arange(3, dtype=np.uint16),
        "u32": np.arange(3, dtype=np.uint32), "u64": np.arange(3, dtype=np.uint64),
        "bool": np.array([True, False, True]), "empty": np.zeros((0, 4), np.float32),
        "big_endian": np.arange(4, dtype=">f8"), "strided": np.arange(20.0)[::3],
    }
    path = tmp_path / "t.safetensors"
    cio.save_state_dict_file(tensors, path, metadata={"k": "v"})
    loaded, meta = cio.load_state_dict_file(path)
    assert meta == {"k": "v"}
    assert list(loaded) == list(tensors)
    for k, v in tensors.items():
        assert loaded[k].shape == v.shape, k
        assert loaded[k].dtype == v.dtype.newbyteorder("="), k
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)


# ------------------------------------------------- the safetensors package, PyTorch

def test_readable_by_the_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip(
        "safetensors.numpy", reason="the safetensors package is not installed")
    from safetensors import safe_open
    model = trained_state(residual_net(), (3, 8, 8))
    path = tmp_path / "m.safetensors"
    cio.save(model, path, metadata={"epoch": "5"})
    theirs = st_numpy.load_file(str(path))
    ours = model.state_dict()
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype and theirs[k].shape == ours[k].shape, k
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "convcore" and meta["epoch"] == "5"
    assert json.loads(meta["convcore_architecture"]) == model.architecture()
    assert json.loads(meta["convcore_graph"]) == model.to_graph()


def test_reads_files_written_by_the_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip(
        "safetensors.numpy", reason="the safetensors package is not installed")
    rng = np.random.default_rng(3)
    tensors = {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
               "conv.bias": rng.standard_normal(4).astype(np.float32),
               "steps": np.array(11, dtype=np.int64),
               "table": rng.standard_normal((3, 5)),
               "half": rng.standard_normal(7).astype(np.float16),
               "mask": np.array([True, False]), "bytes": np.arange(5, dtype=np.uint8),
               "empty": np.zeros((2, 0), np.float32)}
    path = tmp_path / "theirs.safetensors"
    st_numpy.save_file(tensors, str(path), metadata={"source": "safetensors"})
    loaded, meta = cio.load_state_dict_file(path)
    assert meta == {"source": "safetensors"}
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
    # a file with no metadata at all
    st_numpy.save_file({"x": np.ones(3, np.float32)}, str(path))
    loaded, meta = cio.load_state_dict_file(path)
    assert meta == {} and loaded["x"].tolist() == [1, 1, 1]
    # ... is not a model file
    with pytest.raises(ValueError, match="architecture"):
        cio.load(path)


def torch_plain_net(torch):
    tnn = torch.nn
    return tnn.Sequential(
        tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.LocalResponseNorm(5, alpha=1e-3, beta=0.75, k=2.0),
        tnn.Conv2d(8, 4, 3, bias=False), tnn.ReLU(), tnn.AvgPool2d(1), tnn.Flatten(),
        tnn.Dropout(0.5), tnn.Linear(4 * 2 * 2, 10))


def _torch_model(torch):
    torch.manual_seed(0)
    tm = torch_plain_net(torch)
    tm.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            tm(torch.randn(4, 3, 8, 8))
    return tm.eval()


def test_pytorch_state_dict_gives_the_same_outputs():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    tm = _torch_model(torch)
    model = plain_net()
    model.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    model.eval()
    x = np.random.default_rng(4).standard_normal((5, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_pytorch_safetensors_file_both_ways(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    st_torch = pytest.importorskip("safetensors.torch",
                                   reason="the safetensors package is not installed")
    tm = _torch_model(torch)
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = tm(torch.from_numpy(x)).numpy()

    # PyTorch -> file -> convcore
    path = tmp_path / "torch.safetensors"
    st_torch.save_file(tm.state_dict(), str(path), metadata={"format": "pt"})
    tensors, meta = cio.load_state_dict_file(path)
    assert meta == {"format": "pt"}
    assert tensors["1.num_batches_tracked"].dtype == np.int64
    model = plain_net()
    model.load_state_dict(tensors)
    model.eval()
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)

    # convcore -> file -> PyTorch (strict)
    ours = tmp_path / "ours.safetensors"
    cio.save(model, ours)
    tm2 = torch_plain_net(torch)
    tm2.load_state_dict(st_torch.load_file(str(ours)), strict=True)
    tm2.eval()
    with torch.no_grad():
        np.testing.assert_allclose(tm2(torch.from_numpy(x)).numpy(), expected,
                                   rtol=1e-6, atol=1e-6)


def test_bfloat16_tensors_are_widened_to_float32(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    st_torch = pytest.importorskip("safetensors.torch",
                                   reason="the safetensors package is not installed")
    t = torch.randn(3, 4).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    st_torch.save_file({"w": t}, str(path))
    tensors, _ = cio.load_state_dict_file(path)
    assert tensors["w"].dtype == np.float32
    np.testing.assert_array_equal(tensors["w"], t.float().numpy())


# ------------------------------------------------------------------ corrupt files

def _good_bytes():
    init.manual_seed(7)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.safetensors")
        cio.save(trained_state(tiny_net(), (1, 4, 4)), p)
        with open(p, "rb") as f:
            return f.read()


GOOD = _good_bytes()


def _split(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n].decode("utf-8")), raw[8 + n:]


def _assemble(header, data, header_bytes=None, length=None):
    head = header_bytes if header_bytes is not None else json.dumps(header).encode("utf-8")
    n = len(head) if length is None else length
    return struct.pack("<Q", n) + head + data


def _with_header(mutate, data_prefix=b""):
    """GOOD with its header changed in place by mutate(header, data) (its
    return value is ignored) and optional bytes put before its data."""
    header, data = _split(GOOD)
    mutate(header, data)
    return _assemble(header, data_prefix + data)


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _set(header, name, field, value):
    header[name][field] = value


def _arch_edit(edit):
    def mutate(header, data):
        arch = json.loads(header["__metadata__"]["convcore_architecture"])
        edit(arch)
        header["__metadata__"]["convcore_architecture"] = json.dumps(arch)
    return mutate


def _deep_arch(header, data):
    node = {"type": "Identity", "config": {}}
    for _ in range(200):
        node = {"type": "Sequential", "config": {}, "children": {"0": node}}
    header["__metadata__"]["convcore_architecture"] = json.dumps(node)


def _overlap(header, data):
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]  # 0.weight (18 floats), 0.bias (2 floats)
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + 8]


def _two_tensors_same_bytes(header, data):
    header["copy"] = dict(header[_first_tensor(header)])


def _hole(header, data):
    for k, e in header.items():
        if k != "__metadata__":
            e["data_offsets"] = [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4]


_N = struct.unpack("<Q", GOOD[:8])[0]

CORRUPT = {
    # truncation at many points
    **{f"truncated_at_{cut}": GOOD[:cut] for cut in
       (0, 1, 4, 7, 8, 9, 8 + _N // 2, 8 + _N - 1, 8 + _N, 8 + _N + 1, len(GOOD) - 8,
        len(GOOD) - 1)},
    # the header length
    "header_length_past_the_end": struct.pack("<Q", len(GOOD)) + GOOD[8:],
    "header_length_minus_one": struct.pack("<q", -1) + GOOD[8:],
    "header_length_minus_huge": struct.pack("<q", -(2 ** 62)) + GOOD[8:],
    "header_length_over_the_limit": struct.pack("<Q", cio.MAX_HEADER_BYTES + 1) + GOOD[8:],
    "header_length_zero": struct.pack("<Q", 0) + GOOD[8:],
    "header_length_one_short": struct.pack("<Q", _N - 1) + GOOD[8:],
    "header_length_one_long": struct.pack("<Q", _N + 1) + GOOD[8:],
    # the JSON
    "garbage_json": _assemble(None, b"", header_bytes=b"{this is not json}   "),
    "json_array": _assemble(None, b"", header_bytes=b"[1, 2, 3]"),
    "json_string": _assemble(None, b"", header_bytes=b'"abc"'),
    "invalid_utf8": _assemble(None, b"", header_bytes=b'{"\xff\xfe": 1}'),
    "json_nan": _assemble(None, b"", header_bytes=b'{"a": NaN}'),
    "json_duplicate_key": _assemble(
        None, b"\0" * 4,
        header_bytes=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
    "json_deeply_nested": _assemble(None, b"", header_bytes=b'{"a": ' + b"[" * 100000 +
                                    b"]" * 100000 + b"}"),
    "random_bytes": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
    "empty_file": b"",
    # tensor entries
    "entry_not_an_object": _with_header(lambda h, d: h.__setitem__(_first_tensor(h), [1, 2])),
    "entry_missing_dtype": _with_header(lambda h, d: h[_first_tensor(h)].pop("dtype")),
    "entry_missing_offsets": _with_header(lambda h, d: h[_first_tensor(h)].pop("data_offsets")),
    "unknown_dtype": _with_header(lambda h, d: _set(h, _first_tensor(h), "dtype", "F128")),
    "dtype_not_a_string": _with_header(lambda h, d: _set(h, _first_tensor(h), "dtype", 4)),
    "shape_negative": _with_header(lambda h, d: _set(h, _first_tensor(h), "shape", [-2, 9])),
    "shape_float": _with_header(lambda h, d: _set(h, _first_tensor(h), "shape", [2.0, 9])),
    "shape_bool": _with_header(lambda h, d: _set(h, "1.num_batches_tracked", "shape", [True])),
    "shape_not_a_list": _with_header(lambda h, d: _set(h, _first_tensor(h), "shape", 18)),
    "shape_too_many_dims": _with_header(lambda h, d: _set(h, _first_tensor(h), "shape",
                                                          [1] * 100)),
    "shape_byte_size_mismatch": _with_header(lambda h, d: _set(h, _first_tensor(h), "shape",
                                                               [2, 1, 3, 2])),
    "shape_huge_overflowing": _with_header(lambda h, d: _set(h, _first_tensor(h), "shape",
                                                             [2 ** 40, 2 ** 40, 2 ** 40])),
    "shape_wraps_int64_to_match": _with_header(
        # 2**62 * 4 bytes wraps to 0 in 64-bit arithmetic; with an empty range it would match
        lambda h, d: (_set(h, _first_tensor(h), "shape", [2 ** 62]),
                      _set(h, _first_tensor(h), "data_offsets", [0, 0]))),
    "empty_shape_with_a_huge_dimension": _with_header(
        lambda h, d: h.__setitem__("extra", {"dtype": "F32", "shape": [0, 2 ** 70],
                                             "data_offsets": [0, 0]})),
    "shape_very_long_list": _with_header(lambda h, d: _set(h, _first_tensor(h), "shape",
                                                           [1] * 100000 + [-1])),
    "offsets_past_the_end": _with_header(lambda h, d: _set(h, _first_tensor(h), "data_offsets",
                                                           [0, len(d) + 72])),
    "offsets_far_past_the_end": _with_header(
        lambda h, d: _set(h, _first_tensor(h), "data_offsets", [2 ** 62, 2 ** 62 + 72])),
    "offsets_reversed": _with_header(lambda h, d: _set(h, _first_tensor(h), "data_offsets",
                                                       [72, 0])),
    "offsets_negative": _with_header(lambda h, d: _set(h, _first_tensor(h), "data_offsets",
                                                       [-8, 64])),
    "offsets_one_value": _with_header(lambda h, d: _set(h, _first_tensor(h), "data_offsets",
                                                        [72])),
    "offsets_strings": _with_header(lambda h, d: _set(h, _first_tensor(h), "data_offsets",
                                                      ["0", "72"])),
    "offsets_overlapping": _with_header(_overlap),
    "two_tensors_one_range": _with_header(_two_tensors_same_bytes),
    "hole_in_the_data": _with_header(_hole, data_prefix=b"\0" * 4),
    "trailing_bytes": GOOD + b"\0" * 8,
    # metadata and architecture
    "no_metadata": _with_header(lambda h, d: h.pop("__metadata__")),
    "metadata_without_architecture": _with_header(
        lambda h, d: h["__metadata__"].pop("convcore_architecture")),
    "metadata_not_an_object": _with_header(lambda h, d: h.__setitem__("__metadata__", [1])),
    "metadata_value_not_a_string": _with_header(
        lambda h, d: h["__metadata__"].__setitem__("epoch", 3)),
    "architecture_not_json": _with_header(
        lambda h, d: h["__metadata__"].__setitem__("convcore_architecture", "{nope")),
    "architecture_not_a_node": _with_header(
        lambda h, d: h["__metadata__"].__setitem__("convcore_architecture", "[1, 2]")),
    "architecture_too_deep": _with_header(_deep_arch),
    "unknown_layer_type": _with_header(_arch_edit(
        lambda a: a["children"]["2"].__setitem__("type", "Softmax9000"))),
    "layer_type_not_a_string": _with_header(_arch_edit(
        lambda a: a["children"]["2"].__setitem__("type", ["ReLU"]))),
    "children_not_an_object": _with_header(_arch_edit(
        lambda a: a.__setitem__("children", [1, 2]))),
    "config_not_an_object": _with_header(_arch_edit(
        lambda a: a["children"]["0"].__setitem__("config", "3x3"))),
    "config_unknown_argument": _with_header(_arch_edit(
        lambda a: a["children"]["0"]["config"].__setitem__("colour", "red"))),
    "config_kernel_zero": _with_header(_arch_edit(
        lambda a: a["children"]["0"]["config"].__setitem__("kernel_size", [0, 3]))),
    "config_kernel_string": _with_header(_arch_edit(
        lambda a: a["children"]["0"]["config"].__setitem__("kernel_size", "big"))),
    "config_dropout_p_string": _with_header(_arch_edit(
        lambda a: a["children"].__setitem__("9", {"type": "Dropout", "config": {"p": "x"}}))),
    "config_needs_terabytes": _with_header(_arch_edit(
        lambda a: a["children"]["4"]["config"].update(in_features=10 ** 7,
                                                      out_features=10 ** 7))),
    "config_needs_more_than_addressable": _with_header(_arch_edit(
        lambda a: a["children"]["4"]["config"].update(in_features=2 ** 40,
                                                      out_features=2 ** 40))),
    "architecture_shape_mismatch": _with_header(_arch_edit(
        lambda a: a["children"]["0"]["config"].__setitem__("out_channels", 3))),
    "architecture_kernel_mismatch": _with_header(_arch_edit(
        lambda a: a["children"]["0"]["config"].__setitem__("kernel_size", [3, 1]))),
    "architecture_missing_a_layer": _with_header(_arch_edit(
        lambda a: a["children"].pop("1"))),
    "architecture_extra_layer": _with_header(_arch_edit(
        lambda a: a["children"].__setitem__("9", {"type": "Linear", "config": {
            "in_features": 2, "out_features": 2}}))),
    "tensor_missing_leaving_a_hole": _with_header(lambda h, d: h.pop("1.running_var")),
    "tensor_extra": _with_header(lambda h, d: (h.__setitem__(
        "extra", {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}))),
    "weight_stored_as_int": _with_header(lambda h, d: _set(h, _first_tensor(h), "dtype", "I32")),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_raises_value_error(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(CORRUPT[case])
    with pytest.raises(ValueError) as info:
        cio.load(path)
    assert str(path) in str(info.value)  # names the file


def test_missing_and_extra_tensors_in_well_formed_files(tmp_path):
    tensors, meta = cio.load_state_dict_file(_write(tmp_path, GOOD))
    del tensors["1.running_var"]
    path = tmp_path / "missing.safetensors"
    cio.save_state_dict_file(tensors, path, meta)
    with pytest.raises(ValueError, match="missing.*running_var"):
        cio.load(path)
    tensors, meta = cio.load_state_dict_file(_write(tmp_path, GOOD))
    tensors["head.weight"] = np.zeros((2, 2), np.float32)
    cio.save_state_dict_file(tensors, path, meta)
    with pytest.raises(ValueError, match="unexpected.*head.weight"):
        cio.load(path)


def _write(tmp_path, raw, name="f.safetensors"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("case,message", [
    ("truncated_at_4", "truncated"),
    ("header_length_past_the_end", "header length"),
    ("header_length_minus_one", "header length"),
    ("garbage_json", "JSON"),
    ("invalid_utf8", "UTF-8"),
    ("unknown_dtype", "unknown dtype 'F128'"),
    ("offsets_past_the_end", "past the end"),
    ("offsets_overlapping", "overlap"),
    ("shape_byte_size_mismatch", "bytes"),
    ("shape_huge_overflowing", "bytes"),
    ("unknown_layer_type", "unknown module type 'Softmax9000'"),
    ("architecture_shape_mismatch", "shape"),
    ("no_metadata", "architecture"),
    ("architecture_too_deep", "nested"),
    ("config_needs_terabytes", "needs at least"),
    ("hole_in_the_data", "belong to no tensor"),
])
def test_corrupt_file_messages(tmp_path, case, message):
    with pytest.raises(ValueError, match=message):
        cio.load(_write(tmp_path, CORRUPT[case]))


def test_good_file_loads(tmp_path):
    # the corruptions above start from a file that itself loads
    assert isinstance(cio.load(_write(tmp_path, GOOD)), nn.Sequential)
    assert isinstance(cio.load(_write(tmp_path, _with_header(lambda h, d: None), "g2")),
                      nn.Sequential)


def test_state_dict_file_checks_the_same_structure(tmp_path):
    for case in ("truncated_at_9", "offsets_overlapping", "unknown_dtype", "garbage_json"):
        with pytest.raises(ValueError):
            cio.load_state_dict_file(_write(tmp_path, CORRUPT[case]))
    # but a file without a convcore architecture is fine for it
    tensors, meta = cio.load_state_dict_file(_write(tmp_path, CORRUPT["no_metadata"]))
    assert meta == {} and "0.weight" in tensors


# ---------------------------------------------------------------------- fuzzing

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=60, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)),
                      max_size=4),
       cut=st.one_of(st.none(), st.integers(0, len(GOOD))))
def test_fuzz_flips_and_truncations_load_or_raise_value_error(fuzz_dir, flips, cut):
    raw = bytearray(GOOD)
    for pos, xor in flips:
        raw[pos] ^= xor
    if cut is not None:
        raw = raw[:cut]
    path = fuzz_dir / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        model = cio.load(path)
    except ValueError:
        pass
    else:
        assert isinstance(model, nn.Module)
    try:
        cio.load_state_dict_file(path)
    except ValueError:
        pass


@settings(max_examples=60, deadline=None)
@given(pos=st.integers(8, 8 + _N - 1), byte=st.sampled_from(list(b'{}[]",:0123456789-.eE ')))
def test_fuzz_header_structure_characters(fuzz_dir, pos, byte):
    # replacing a header byte with JSON punctuation or digits reaches the
    # deeper checks (offsets, shapes, configs) more often than random bytes
    raw = bytearray(GOOD)
    raw[pos] = byte
    path = fuzz_dir / "fuzz2.safetensors"
    path.write_bytes(bytes(raw))
    try:
        assert isinstance(cio.load(path), nn.Module)
    except ValueError:
        pass
