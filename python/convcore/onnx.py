"""ONNX, the exchange format: `convcore.onnx.load(path_or_bytes)` imports a
model as a convcore Graph, `convcore.onnx.export(model, path, input_shape)`
writes any convcore module tree as an ONNX file (docs/onnx.md). Needs the
`onnx` package (pip install "convcore[onnx]")."""
from .interop.onnx_export import export
from .interop.onnx_import import OPSET_RANGE, SUPPORTED_OPS, load

__all__ = ["load", "export", "OPSET_RANGE", "SUPPORTED_OPS"]
