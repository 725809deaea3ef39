"""The model-file loaders against hostile files.

* Crafted corruptions of a saved model (every truncation, header lengths,
  offsets past the end, shapes that overflow, wrong dtypes) through the
  Python loader: each is refused with a ValueError naming the file, or
  loads and runs.
* The coverage-guided atheris harness (tests/fuzz/fuzz_loader.py) for a
  bounded time (slow; CI also runs it, then replays its corpus through the
  C++ loader under AddressSanitizer: see .ci/run).
"""
import importlib.util
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import convcore

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "fuzz", "fuzz_loader.py")


def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_loader", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(buf):
    (n,) = struct.unpack_from("<Q", buf, 0)
    return json.loads(buf[8:8 + n]), buf[8 + n:]


def _join(header, data):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory):
    convcore.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    convcore.save(convcore.build("CONV3-4-RELU-POOL2-FC-3", (1, 8, 8)), str(path))
    return path.read_bytes()


def _corruptions(buf):
    header, data = _split(buf)
    name = next(k for k in header if k != "__metadata__")
    for n in range(0, len(buf), 7):  # truncations
        yield f"truncated to {n}", buf[:n]
    for n in (0, 1, len(buf), len(buf) - 7, 2 ** 63, 2 ** 64 - 1, 100_000_001):
        yield f"header length {n}", struct.pack("<Q", n) + buf[8:]
    for offsets in ([0, 2 ** 40], [5, 4], [-1, 3], [0, 2 ** 64], [len(data), len(data) + 4],
                    ["0", 4], [0]):
        h = json.loads(json.dumps(header))
        h[name]["data_offsets"] = offsets
        yield f"data_offsets {offsets}", _join(h, data)
    for shape in ([2 ** 62, 2 ** 62], [2 ** 31, 2 ** 31, 4], [-1, 4], [2 ** 64], [1.5], "4",
                  [1] * 40, [2 ** 32, 0]):
        h = json.loads(json.dumps(header))
        h[name]["shape"] = shape
        yield f"shape {shape}", _join(h, data)
    for dtype in ("F16", "I64", "U8", "BOOL", "F8_E5M2", "float32", 32, None):
        h = json.loads(json.dumps(header))
        h[name]["dtype"] = dtype
        yield f"dtype {dtype}", _join(h, data)
    h = json.loads(json.dumps(header))
    h["__metadata__"]["convcore_architecture"] = '{"type": "Sequential", "children": 5}'
    yield "architecture of the wrong type", _join(h, data)


def test_crafted_corruptions_are_refused_or_load(model_bytes, tmp_path):
    harness = _harness()
    path = tmp_path / "bad.safetensors"
    refused = loaded = 0
    for what, buf in _corruptions(model_bytes):
        path.write_bytes(buf)
        try:
            convcore.load(str(path))
            loaded += 1
        except ValueError as e:
            assert "cannot load" in str(e) or str(path) in str(e), (what, str(e))
            refused += 1
        harness.one_input(buf)  # the fuzz harness accepts it too (no other exception)
    assert refused > 50 and loaded <= 3, (refused, loaded)


@pytest.mark.slow
def test_atheris_fuzzes_the_loader_without_a_crash(tmp_path):
    pytest.importorskip("atheris")
    seconds = int(os.environ.get("CONVCORE_FUZZ_SECONDS", "20"))
    proc = subprocess.run(
        # libFuzzer's memory limit reads the peak resident set, which the
        # child starts with from this pytest process (GBs after the full-size
        # zoo tests): a limit above that, still far below the machine's
        [sys.executable, HARNESS, f"-max_total_time={seconds}", "-seed=1", "-timeout=20",
         "-rss_limit_mb=8192", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=seconds + 120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert "Done" in tail, tail
