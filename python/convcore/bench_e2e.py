"""Kept for compatibility: the end-to-end benchmark now lives in
`convcore.bench.e2e` and its PyTorch mirror in `convcore.interop.torch`.
This module re-exports their public names, so old code that imports
`convcore.bench_e2e` keeps working; new code should import from those."""
from .bench.e2e import (DEFAULT_BATCHES, DEFAULT_MODELS, LABELS, LIBRARIES, build_model,
                        export_onnx, isa_name, main, make_input, markdown, measure_memory,
                        memory_child, ort_session, rel_diff, run)
from .bench.timing import cpu_name, interleaved_medians, write_results
from .interop.torch import to_torch

__all__ = ["DEFAULT_BATCHES", "DEFAULT_MODELS", "LABELS", "LIBRARIES", "build_model",
           "export_onnx", "isa_name", "main", "make_input", "markdown", "measure_memory",
           "memory_child", "ort_session", "rel_diff", "run", "to_torch"]
