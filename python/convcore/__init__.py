"""convcore: convolution, pooling and fully connected layers, forward and
backward, on a C++17/OpenMP core. Arrays are numpy, NCHW; signatures follow
torch.nn.functional."""
from .functional import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    avg_pool2d,
    avg_pool2d_backward,
    batch_norm,
    batch_norm_backward,
    conv2d,
    conv2d_backward,
    conv2d_output_shape,
    get_num_threads,
    linear,
    linear_backward,
    local_response_norm,
    local_response_norm_backward,
    max_pool2d,
    max_pool2d_backward,
    pool2d_output_shape,
    relu,
    relu_backward,
    reset_workspace_peak,
    scratch_cache_bytes,
    scratch_cache_limit,
    set_num_threads,
    set_scratch_cache_limit,
    set_workspace_limit,
    workspace_limit,
    workspace_peak,
)

from ._version import __version__

from . import data, models, nn, optim, train  # noqa: E402  (built on the functional API)
from .builder import build, build_graph  # noqa: E402  (build_graph: branches in the notation)
from .nn.init import manual_seed  # noqa: E402
from .nn.module import is_grad_enabled, no_grad  # noqa: E402  (PyTorch's names)
from .train import evaluate, fit, predict  # noqa: E402


from .io import load, load_state_dict_file, save  # noqa: E402
# Module.save, Module.summary and Module.to("cuda") are carried out by io,
# summary and cuda.module, which register them with nn when imported (nn
# imports none of them): importing them here makes that happen for every user.
from . import summary  # noqa: E402
from .cuda import module as _cuda_module  # noqa: E402,F401
from .compiled import CompiledModel, compile  # noqa: E402,A004  (inference by the C++ engine)
from .cuda import to_dlpack  # noqa: E402  (GPU results to torch.from_dlpack; no cupy import)
from . import onnx  # noqa: E402,A004  (ONNX import/export; the onnx package loads on first use)
from ._core import get_conv_autotune as get_autotune  # noqa: E402  (convolution plans)
from ._core import set_conv_autotune as set_autotune  # noqa: E402


__all__ = [
    "build", "build_graph",
    "compile", "CompiledModel",
    "data",
    "evaluate",
    "fit",
    "load",
    "load_state_dict_file",
    "manual_seed",
    "no_grad", "is_grad_enabled",
    "models",
    "nn",
    "onnx",
    "optim",
    "predict",
    "save",
    "train",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm",
    "batch_norm_backward",
    "conv2d",
    "conv2d_backward",
    "conv2d_output_shape",
    "get_autotune",
    "get_num_threads",
    "linear",
    "linear_backward",
    "local_response_norm",
    "local_response_norm_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "pool2d_output_shape",
    "relu",
    "relu_backward",
    "set_autotune",
    "set_num_threads",
    "to_dlpack",
]
