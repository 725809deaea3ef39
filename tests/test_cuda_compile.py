"""Every .cu kernel file compiles for sm_80 and sm_90 with no error and no
warning: with nvcc (warnings as errors, ptxas too), and with NVRTC, the
compiler CuPy uses at run time, on exactly the source the loader hands it.
Neither needs a GPU. Each check skips with a reason when its compiler is
missing."""
import ctypes
import glob
import os
import re
import shutil
import subprocess

import pytest

import convcore.cuda as cc_cuda

ARCHS = ("sm_80", "sm_90")
CU_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cc_cuda.KERNEL_DIR, "*.cu")))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def test_every_kernel_file_is_listed_and_self_contained():
    assert set(CU_FILES) == set(cc_cuda.SOURCES)
    for name in CU_FILES + ["common.cuh"]:
        with open(os.path.join(cc_cuda.KERNEL_DIR, name)) as f:
            text = f.read()
        # NVRTC has no system headers: the only include is our common.cuh
        includes = re.findall(r"^\s*#\s*include\s+(\S+)", text, re.M)
        assert includes in ([], ['"common.cuh"']), f"{name} includes {includes}"
        if name != "common.cuh":
            assert not re.findall(r"^\s*#\s*include", cc_cuda.source(name), re.M)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CU_FILES)
def test_nvcc_compiles_without_warnings(name, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, /usr/local/cuda/bin): install the CUDA toolkit")
    # The source exactly as NVRTC gets it (common.cuh inlined).
    src = tmp_path / name
    src.write_text(cc_cuda.source(name))
    cmd = [nvcc, f"-arch={arch}", "--cubin", "-std=c++17", "-Werror", "all-warnings",
           "-Xptxas", "-Werror", "-o", str(tmp_path / (name + ".cubin")), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(" ".join(cmd), "->", res.returncode)
    assert res.returncode == 0 and not res.stderr.strip(), res.stdout + res.stderr
    assert (tmp_path / (name + ".cubin")).stat().st_size > 0


def _nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (as convcore[cuda] installs
    it) or from a CUDA toolkit."""
    candidates = []
    try:
        import nvidia.cuda_nvrtc as pkg  # the wheel's namespace package
        for root in pkg.__path__:
            candidates += glob.glob(os.path.join(root, "lib", "libnvrtc.so*"))
    except ImportError:
        pass
    try:
        import nvidia  # namespace; newer wheels put it under nvidia/cu13
        for root in nvidia.__path__:
            candidates += glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*"))
    except ImportError:
        pass
    candidates += glob.glob("/usr/local/cuda/lib64/libnvrtc.so*")
    for path in sorted(candidates, key=len):
        if "builtins" in os.path.basename(path) or "alt" in os.path.basename(path):
            continue
        try:
            # NVRTC dlopens its builtins library by name at compile time;
            # outside the loader's search path it must be loaded first.
            for builtins in glob.glob(os.path.join(os.path.dirname(path),
                                                   "libnvrtc-builtins.so*")):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CU_FILES)
def test_nvrtc_compiles_without_warnings(name, arch):
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found: pip install nvidia-cuda-nvrtc (convcore's [cuda] extra)")
    rc, text = _nvrtc_compile(lib, cc_cuda.source(name), name, arch)
    print(name, arch, "nvrtc rc", rc, text)
    # NVRTC has no warnings-as-errors option: any log line (a warning) fails.
    assert rc == 0 and not text, text


def _nvrtc_compile(lib, source: str, name: str, arch: str):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(),
                                  0, None, None) == 0
    # the options CuPy's RawModule is given, plus the target
    opts = [f"--gpu-architecture={arch}".encode()] + \
        [o.encode() for o in cc_cuda.CupyBackend.options]
    argv = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), argv)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace").strip()


def test_nvrtc_check_sees_warnings_and_errors():
    """The check above can fail: a warning and an error both reach the log."""
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found: pip install nvidia-cuda-nvrtc (convcore's [cuda] extra)")
    rc, text = _nvrtc_compile(lib, 'extern "C" __global__ void k(float* x) { int unused; x[0] = 1; }',
                              "warn.cu", "sm_80")
    assert rc == 0 and "unused" in text
    rc, text = _nvrtc_compile(lib, '#include <stdio.h>\nextern "C" __global__ void k() {}',
                              "err.cu", "sm_80")
    assert rc != 0 and "stdio.h" in text


def test_nvcc_check_sees_warnings(tmp_path):
    """The nvcc check above can fail: an unused variable is an error under
    its flags."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, /usr/local/cuda/bin): install the CUDA toolkit")
    src = tmp_path / "warn.cu"
    src.write_text('extern "C" __global__ void k(float* x) { int unused; x[0] = 1; }\n')
    res = subprocess.run([nvcc, "-arch=sm_80", "--cubin", "-Werror", "all-warnings", "-o",
                          str(tmp_path / "warn.cubin"), str(src)], capture_output=True, text=True)
    assert res.returncode != 0 and "unused" in res.stdout + res.stderr
