"""Kept for compatibility: the zoo sweep (`python -m convcore bench --zoo`)
now lives in `convcore.bench.zoo`, its peak measurement in
`convcore.bench.timing`. This module re-exports their public names, so old
code that imports `convcore.bench_zoo` keeps working; new code should
import from those."""
from .bench.timing import cpu_name, interleaved_medians, measure_peak, memory_gauge
from .bench.zoo import (CLASSES, DEFAULT_BATCHES, QUICK_MODEL, ROW_HEADER, ROW_WIDTHS,
                        SUMMARY_HEADER, SUMMARY_WIDTHS, Layer, distinct_layers, main,
                        markdown, model_layers, run, shape_class, stats, summarise,
                        summary_lines)

__all__ = ["CLASSES", "DEFAULT_BATCHES", "QUICK_MODEL", "ROW_HEADER", "ROW_WIDTHS",
           "SUMMARY_HEADER", "SUMMARY_WIDTHS", "Layer", "distinct_layers", "main", "markdown",
           "measure_peak", "model_layers", "run", "shape_class", "stats", "summarise",
           "summary_lines"]
