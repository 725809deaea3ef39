"""Workflows that exchange models with other frameworks: ONNX import
(`onnx_import.load`) and export (`onnx_export.export`). The `onnx` package
is imported only when a file is read or written."""
from .layers import Pad2d

__all__ = ["Pad2d"]
