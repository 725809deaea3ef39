"""Kept for compatibility: the GPU benchmark (`python -m convcore bench
--gpu`) now lives in `convcore.bench.gpu`, beside the CPU benchmarks whose
layer suite and timing it uses. This module re-exports its public names, so
old code that imports `convcore.cuda.bench` keeps working; new code should
import `convcore.bench.gpu`. No module of the GPU backend imports this one."""
from ..bench.gpu import main, run

__all__ = ["main", "run"]
