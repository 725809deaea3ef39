"""Builds convcore's .cu kernels, unmodified, as C++ against cuda_shim.h and
runs them on the CPU through ctypes: the backend the shim tests hand to
convcore.cuda.functional.using_backend().

For each `extern "C" __global__ void name(params)` in a .cu file a launcher
`ccshim_launch_name(grid, block, shared, void** args)` is generated, which
unpacks the arguments and runs the kernel's body as every thread of the grid
(shim_runtime.cpp)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from collections import defaultdict

import numpy as np

import convcore.cuda

HERE = os.path.dirname(os.path.abspath(__file__))
# the kernels of the convcore being tested (installed, or the source tree)
KERNEL_DIR = convcore.cuda.KERNEL_DIR

_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
    r'(\w+)\s*\(([^)]*)\)', re.S)

# C parameter type -> ctypes type for a value argument.
_SCALARS = {"int": ctypes.c_int32, "float": ctypes.c_float, "long long": ctypes.c_int64,
            "unsigned": ctypes.c_uint32}


def find_compiler():
    return shutil.which("g++")


def kernels(cu_file: str):
    """[(name, [(type, param name)])] of the kernels in a .cu file."""
    with open(os.path.join(KERNEL_DIR, cu_file)) as f:
        text = f.read()
    out = []
    for name, params in _KERNEL.findall(text):
        plist = []
        for p in params.split(","):
            p = " ".join(p.replace("__restrict__", "").split())
            m = re.match(r"(.*?)(\w+)$", p)
            plist.append((m.group(1).strip(), m.group(2)))
        out.append((name, plist))
    return out


def _launchers(files):
    lines = ['#include <functional>', '#include <cstddef>',
             'int ccshim_run(dim3, dim3, size_t, const std::function<void()>&);']
    for f in files:
        for name, params in kernels(f):
            types = [t for t, _ in params]
            lines.append(f'extern "C" void {name}({", ".join(types)});')
            unpack = ", ".join(f"*({t}*)a[{i}]" for i, t in enumerate(types))
            lines.append(
                f'extern "C" int ccshim_launch_{name}(unsigned gx, unsigned gy, unsigned gz, '
                f'unsigned bx, unsigned by, unsigned bz, size_t shared, void** a) {{\n'
                f'  return ccshim_run(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, shared, '
                f'[&]() {{ {name}({unpack}); }});\n}}')
    return "\n".join(lines) + "\n"


def build(files, build_dir: str) -> str:
    """Compiles the kernel files + launchers + runtime into one shared
    library in build_dir (reused while the sources are unchanged)."""
    gen = _launchers(files)
    digest = hashlib.sha1(gen.encode())
    srcs = [os.path.join(KERNEL_DIR, f) for f in files] + [
        os.path.join(KERNEL_DIR, "common.cuh"), os.path.join(HERE, "cuda_shim.h"),
        os.path.join(HERE, "shim_runtime.cpp")]
    for s in srcs:
        with open(s, "rb") as fh:
            digest.update(fh.read())
    lib = os.path.join(build_dir, f"ccshim_{digest.hexdigest()[:12]}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(build_dir, exist_ok=True)
    gen_path = os.path.join(build_dir, "launchers.cpp")
    with open(gen_path, "w") as fh:
        fh.write(gen)
    shim_h = os.path.join(HERE, "cuda_shim.h")
    # UBSan with bounds checks: an out-of-range index into a fixed-size
    # array (shared memory tiles, register tiles) or an int overflow in the
    # index arithmetic aborts the test run with the kernel's source line.
    cmd = [find_compiler(), "-std=c++17", "-O1", "-g", "-fPIC", "-shared",
           "-fsanitize=undefined,bounds", "-fno-sanitize-recover=all",
           "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
           "-Wno-unknown-pragmas",  # #pragma unroll is for nvcc / NVRTC
           "-Wno-clobbered",  # getcontext "returns twice"; the runtime never resumes it
           "-include", shim_h, "-I", KERNEL_DIR, "-o", lib,
           "-x", "c++"] + [os.path.join(KERNEL_DIR, f) for f in files] + [gen_path,
                                                                          os.path.join(HERE, "shim_runtime.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("building the CUDA shim failed:\n" + " ".join(cmd) + "\n" + res.stderr)
    return lib


class GuardedNumpy:
    """numpy, except that `empty` (how convcore.cuda.functional allocates
    every output and workspace) puts 64 guard bytes of a fixed pattern on
    each side of the array; `check()` reports any that a kernel overwrote:
    an out-of-bounds write."""

    GUARD = 64
    PATTERN = 0xA5

    def __init__(self):
        self._buffers = []

    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, shape, dtype=np.float32):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        raw = np.full(nbytes + 2 * self.GUARD, self.PATTERN, dtype=np.uint8)
        self._buffers.append(raw)
        # garbage, as np.empty would leave it: NaN bit patterns for floats
        raw[self.GUARD:self.GUARD + nbytes] = 0xFF
        return raw[self.GUARD:self.GUARD + nbytes].view(dtype).reshape(shape)

    def check(self, kernel: str) -> None:
        for raw in self._buffers:
            if (raw[:self.GUARD] != self.PATTERN).any() or (raw[-self.GUARD:] != self.PATTERN).any():
                raise RuntimeError(f"{kernel}: out-of-bounds write next to a "
                                   f"{raw.size - 2 * self.GUARD}-byte output buffer")
        del self._buffers[:-64]  # keep the recent ones: checks stay cheap


class ShimBackend:
    """convcore.cuda.functional's backend on the CPU: numpy arrays, kernels
    run by the shim. Records which kernels each test launched, and checks
    the guard bytes around every buffer it allocated after each launch."""

    def __init__(self, lib_path: str, files):
        self.xp = GuardedNumpy()
        self.lib = ctypes.CDLL(lib_path)
        self.lib.ccshim_error.restype = ctypes.c_char_p
        self.lib.ccshim_barriers.restype = ctypes.c_longlong
        self.launches = defaultdict(int)          # kernel -> launches
        self.tests = defaultdict(set)             # kernel -> test ids
        self.current_test = None
        self._params = {}
        for f in files:
            for name, params in kernels(f):
                self._params[name] = params

    def asarray(self, value, name):
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a numpy array on the shim, got {type(value).__name__}")
        return value

    def _arg(self, value, ctype: str, kernel: str, pname: str):
        if value is None:
            if "*" not in ctype:
                raise TypeError(f"{kernel}: None passed for value parameter {pname}")
            return ctypes.c_void_p(None)
        if "*" in ctype:
            if not isinstance(value, np.ndarray) or not value.flags.c_contiguous:
                raise TypeError(f"{kernel}: {pname} must be a contiguous array")
            base = ctype.replace("const", "").replace("*", "").strip()
            want = {"float": np.float32, "long long": np.int64}[base]
            if value.dtype != want:
                raise TypeError(f"{kernel}: {pname} is {value.dtype}, the kernel takes {base}*")
            return ctypes.c_void_p(value.ctypes.data)
        # A value parameter: the Python side must pass the exact numpy type
        # (as CuPy needs, which sizes the argument from it).
        want = {"int": np.int32, "float": np.float32, "long long": np.int64}[ctype]
        if type(value) is not want:
            raise TypeError(f"{kernel}: {pname} is {type(value).__name__}, the kernel takes {ctype}")
        return _SCALARS[ctype](value.item())

    def launch(self, file, kernel, grid, block, args, shared_mem=0):
        params = self._params[kernel]
        if len(args) != len(params):
            raise TypeError(f"{kernel} takes {len(params)} arguments, got {len(args)}")
        cargs = [self._arg(a, t, kernel, n) for a, (t, n) in zip(args, params)]
        argv = (ctypes.c_void_p * len(cargs))(*[ctypes.cast(ctypes.pointer(c), ctypes.c_void_p)
                                                for c in cargs])
        fn = getattr(self.lib, "ccshim_launch_" + kernel)
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t, ctypes.c_void_p]
        grid = tuple(int(g) for g in grid)
        block = tuple(int(b) for b in block)
        if min(grid) == 0:  # as CupyBackend.launch: an empty array, nothing to compute
            return
        rc = fn(*grid, *block, int(shared_mem), argv)
        if rc != 0:
            raise RuntimeError(f"{kernel}: {self.lib.ccshim_error().decode()}")
        self.xp.check(kernel)
        self.launches[kernel] += 1
        if self.current_test is not None:
            self.tests[kernel].add(self.current_test)


ACTIVE = None  # the session's backend; conftest.py prints its per-kernel counts


def session_backend(files, build_dir: str) -> ShimBackend:
    """One shim library and backend per test session, shared by the test
    modules, so the per-kernel counts cover them all."""
    global ACTIVE
    if ACTIVE is None:
        ACTIVE = ShimBackend(build(files, build_dir), files)
    return ACTIVE
