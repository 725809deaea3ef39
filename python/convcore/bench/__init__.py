"""convcore's CPU benchmarks, `python -m convcore bench [--e2e | --zoo]`:

    timing   what they share: interleaved_medians (the libraries take turns
             in blocks), the machine's figures (cpu_name, memory_gauge, the
             attained SGEMM peak), geomean, write_results (--json/--markdown)
    layers   the layer suite: the classic CNNs' conv, pool and FC layers vs
             PyTorch and numpy's im2col (python -m convcore bench)
    e2e      whole models, images/s and memory, eager and compiled vs
             PyTorch and ONNX Runtime (--e2e)
    zoo      every distinct conv/linear layer of the zoo vs PyTorch and the
             peak (--zoo)
    gpu      the CUDA kernels vs PyTorch CUDA on the layer suite (--gpu;
             convcore.cuda.bench re-exports it for old code)

This package's namespace keeps what `convcore.bench` held when it
was one module (the layer suite and the timing helpers).
"""
from .layers import Conv, Fc, Pool, _geomeans, plot, run, suite
from .timing import (cpu_name, gemm_row, geomean, import_torch, interleaved_medians,
                     measure_peak, memory_gauge, write_results)

__all__ = ["Conv", "Pool", "Fc", "suite", "run", "plot", "main", "interleaved_medians",
           "cpu_name", "memory_gauge", "gemm_row", "measure_peak", "geomean", "import_torch",
           "write_results"]


def main(argv=None) -> None:
    """python -m convcore bench [--e2e | --zoo] [options]: --e2e and --zoo
    hand the other options to their own command line."""
    if "--e2e" in (argv or []):  # whole models, images/s (bench/e2e.py has its own options)
        from .e2e import main as e2e
        return e2e([a for a in argv if a != "--e2e"])
    if "--zoo" in (argv or []):  # every distinct zoo layer (bench/zoo.py has its own options)
        from .zoo import main as zoo
        return zoo([a for a in argv if a != "--zoo"])
    from .layers import main as layers
    return layers(argv)
