"""Writes the reference data of the C++ tests, tests/cpp/data/:

* ops.safetensors: inputs and expected outputs of the op functions, computed
  by the independent numpy references of tests/reference.py (float64 loops,
  no convcore) and numpy.pad; the cases (op, arguments, tensor names) are
  JSON in the metadata key "cases".
* net_*.safetensors: small networks saved by convcore (model.save), and
  net_*_io.safetensors: an input and the network's output in Python, in
  eval mode.

The files are committed; run this again (from the repository root, with
convcore importable) only when the cases change:

    python tests/cpp/make_reference.py
"""
import json
import os
import sys
from collections import OrderedDict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import reference as R  # noqa: E402  (tests/reference.py)

DATA = os.path.join(HERE, "data")


class Cases:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.tensors = OrderedDict()
        self.cases = []
        self._stored = {}  # (dtype, shape, bytes) -> key: inputs shared by cases are stored once

    def rand(self, shape, dtype, lo=-1.0, hi=1.0):
        return self.rng.uniform(lo, hi, shape).astype(dtype)

    def add(self, name, op, args, inputs, outputs):
        names_in, names_out = {}, {}
        for role, arr in inputs.items():
            arr = np.ascontiguousarray(arr)
            ident = (arr.dtype.str, arr.shape, arr.tobytes())
            if ident not in self._stored:
                self._stored[ident] = f"{name}.{role}"
                self.tensors[f"{name}.{role}"] = arr
            names_in[role] = self._stored[ident]
        for role, arr in outputs.items():
            key = f"{name}.out.{role}"
            self.tensors[key] = np.ascontiguousarray(arr)
            names_out[role] = key
        self.cases.append({"name": name, "op": op, "args": args, "inputs": names_in,
                           "outputs": names_out})


def op_cases():
    c = Cases(0)
    for dt, tag in ((np.float32, "f32"), (np.float64, "f64")):
        # conv2d: groups, asymmetric padding ('same' of an even kernel), dilation, stride
        for i, (xs, ws, stride, pad, dil, groups) in enumerate([
                ((2, 4, 7, 8), (6, 2, 3, 3), (2, 1), (1, 1, 2, 2), (1, 2), 2),
                ((1, 3, 7, 7), (4, 3, 4, 2), (1, 1), (1, 2, 0, 1), (1, 1), 1),
                ((2, 6, 6, 5), (6, 1, 3, 3), (1, 2), (1, 1, 1, 1), (2, 1), 6),
                ((2, 5, 4, 4), (3, 5, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)]):
            x, w, b = c.rand(xs, dt), c.rand(ws, dt), c.rand((ws[0],), dt)
            padding = (pad[0], pad[2]) if pad[0] == pad[1] and pad[2] == pad[3] else None
            if padding is None:  # asymmetric: pad explicitly for the reference
                xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])))
                y = R.conv2d_ref(xp, w, b, stride, 0, dil, groups)
            else:
                y = R.conv2d_ref(x, w, b, stride, padding, dil, groups)
            args = {"stride": list(stride), "padding": list(pad), "dilation": list(dil),
                    "groups": groups}
            c.add(f"conv2d_{i}_{tag}", "conv2d", args, {"x": x, "w": w, "b": b}, {"y": y})
            if padding is not None:
                gy = c.rand(y.shape, dt)
                gx, gw, gb = R.conv2d_backward_ref(gy, x, w, stride, padding, dil, groups)
                c.add(f"conv2d_backward_{i}_{tag}", "conv2d_backward", args,
                      {"gy": gy, "x": x, "w": w}, {"gx": gx, "gw": gw, "gb": gb})
        # pooling
        x = c.rand((1, 2, 9, 10), dt)
        for i, (k, s, p, d, ceil) in enumerate([((2, 2), (2, 2), (0, 0), (1, 1), False),
                                                ((3, 3), (2, 2), (1, 1), (1, 1), True),
                                                ((3, 2), (2, 1), (1, 0), (2, 1), False)]):
            y = R.max_pool2d_ref(x, k, s, p, d, ceil)
            gy = c.rand(y.shape, dt)
            gx = R.max_pool2d_backward_ref(gy, x, k, s, p, d, ceil)
            args = {"kernel_size": list(k), "stride": list(s), "padding": list(p),
                    "dilation": list(d), "ceil_mode": ceil}
            c.add(f"max_pool2d_{i}_{tag}", "max_pool2d", args, {"x": x}, {"y": y})
            c.add(f"max_pool2d_backward_{i}_{tag}", "max_pool2d_backward", args,
                  {"gy": gy, "x": x}, {"gx": gx})
        for i, (k, s, p, ceil, inc, div) in enumerate([((2, 2), (2, 2), (0, 0), False, True, None),
                                                       ((3, 3), (2, 2), (1, 1), True, False, None),
                                                       ((3, 2), (1, 2), (1, 1), False, True, 5)]):
            y = R.avg_pool2d_ref(x, k, s, p, ceil, inc, div)
            gy = c.rand(y.shape, dt)
            gx = R.avg_pool2d_backward_ref(gy, x, k, s, p, ceil, inc, div)
            args = {"kernel_size": list(k), "stride": list(s), "padding": list(p),
                    "ceil_mode": ceil, "count_include_pad": inc, "divisor_override": div or 0}
            c.add(f"avg_pool2d_{i}_{tag}", "avg_pool2d", args, {"x": x}, {"y": y})
            c.add(f"avg_pool2d_backward_{i}_{tag}", "avg_pool2d_backward", args,
                  {"gy": gy, "x": x}, {"gx": gx})
        for i, size in enumerate([(4, 3), (1, 1), (5, 7)]):
            y = R.adaptive_avg_pool2d_ref(x, size)
            gy = c.rand(y.shape, dt)
            gx = R.adaptive_avg_pool2d_backward_ref(gy, x)
            c.add(f"adaptive_avg_pool2d_{i}_{tag}", "adaptive_avg_pool2d",
                  {"output_size": list(size)}, {"x": x}, {"y": y})
            c.add(f"adaptive_avg_pool2d_backward_{i}_{tag}", "adaptive_avg_pool2d_backward",
                  {}, {"gy": gy, "x": x}, {"gx": gx})
        # linear, relu
        x, w, b = c.rand((6, 11), dt), c.rand((4, 11), dt), c.rand((4,), dt)
        y = R.linear_ref(x, w, b)
        gy = c.rand(y.shape, dt)
        gx, gw, gb = R.linear_backward_ref(gy, x, w)
        c.add(f"linear_{tag}", "linear", {}, {"x": x, "w": w, "b": b}, {"y": y})
        c.add(f"linear_backward_{tag}", "linear_backward", {}, {"gy": gy, "x": x, "w": w},
              {"gx": gx, "gw": gw, "gb": gb})
        x = c.rand((2, 3, 4, 5), dt)
        gy = c.rand(x.shape, dt)
        c.add(f"relu_{tag}", "relu", {}, {"x": x}, {"y": R.relu_ref(x)})
        c.add(f"relu_backward_{tag}", "relu_backward", {}, {"gy": gy, "x": x},
              {"gx": R.relu_backward_ref(gy, x)})
        # normalisation
        x = c.rand((2, 7, 3, 4), dt)
        for i, (size, alpha, beta, k) in enumerate([(5, 1e-4, 0.75, 2.0), (2, 0.5, 0.6, 1.0)]):
            c.add(f"lrn_{i}_{tag}", "local_response_norm",
                  {"size": size, "alpha": alpha, "beta": beta, "k": k}, {"x": x},
                  {"y": R.local_response_norm_ref(x, size, alpha, beta, k)})
        mean, var = c.rand((7,), dt), c.rand((7,), dt, 0.5, 2.0)
        g, bb = c.rand((7,), dt, 0.5, 1.5), c.rand((7,), dt)
        y = R.batch_norm_ref(x, mean, var, g, bb, training=False, eps=1e-5)[0]
        c.add(f"batch_norm_eval_{tag}", "batch_norm", {"training": False, "eps": 1e-5},
              {"x": x, "mean": mean, "var": var, "w": g, "b": bb}, {"y": y})
        y, bm, bv, _, _ = R.batch_norm_ref(x, None, None, g, bb, training=True, eps=1e-3)
        c.add(f"batch_norm_train_{tag}", "batch_norm", {"training": True, "eps": 1e-3},
              {"x": x, "w": g, "b": bb}, {"y": y, "mean": bm.astype(dt), "var": bv.astype(dt)})
        # padding modes, numpy.pad's rules (pads beyond the input repeat the pattern)
        x = c.rand((1, 2, 4, 3), dt)
        for mode, np_mode in (("zeros", "constant"), ("reflect", "reflect"),
                              ("replicate", "edge"), ("circular", "wrap")):
            for i, pads in enumerate([(1, 2, 0, 2), (6, 5, 7, 4)]):
                y = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])),
                           mode=np_mode)
                c.add(f"pad_{mode}_{i}_{tag}", "pad2d", {"padding": list(pads), "mode": mode},
                      {"x": x}, {"y": y})
    return c


def write_ops():
    from convcore.io import save_state_dict_file

    c = op_cases()
    save_state_dict_file(c.tensors, os.path.join(DATA, "ops.safetensors"),
                         {"cases": json.dumps(c.cases)})
    print(f"ops.safetensors: {len(c.cases)} cases")


def randomize_batch_norm(model, rng):
    for m in model.modules():
        if type(m).__name__ == "BatchNorm2d" and m.track_running_stats:
            n, dt = m.num_features, m.running_mean.dtype
            m._set_buffer("running_mean", rng.normal(0, 0.2, n).astype(dt))
            m._set_buffer("running_var", rng.uniform(0.5, 1.5, n).astype(dt))
            if m.weight is not None:
                m.weight.data[...] = rng.uniform(0.5, 1.5, n)
                m.bias.data[...] = rng.normal(0, 0.2, n)


def write_nets():
    import convcore as cc
    from convcore.io import save_state_dict_file
    from convcore.nn import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Identity, Linear,
                             ReLU, Sequential)
    from convcore.nn.residual import BasicBlock, Bottleneck

    rng = np.random.default_rng(1)
    cc.manual_seed(1)
    mix = [
        {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 2,
         "padding_mode": "reflect"},
        {"type": "bn"}, {"type": "relu"},
        {"type": "conv", "out_channels": 6, "kernel_size": [3, 2], "padding": [1, 3],
         "padding_mode": "circular", "groups": 2},
        {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": "same",
         "padding_mode": "replicate", "dilation": 2},
        {"type": "conv", "out_channels": 6, "kernel_size": 1, "padding": "valid", "bias": False},
        {"type": "lrn"},
        {"type": "maxpool", "kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
        {"type": "avgpool", "kernel_size": 2, "count_include_pad": False, "divisor_override": 3},
        {"type": "dropout", "p": 0.3}, {"type": "fc", "out_features": 7}, {"type": "relu"},
        {"type": "dropout"}, {"type": "fc", "out_features": 3}, {"type": "softmax"},
    ]
    residual = Sequential(
        Conv2d(3, 8, 3, padding=1, padding_mode="zeros"), BatchNorm2d(8), ReLU(),
        BasicBlock(8, 8), BasicBlock(8, 16, stride=2), Bottleneck(16, 4, stride=2),
        Identity(), BatchNorm2d(16, affine=False), AdaptiveAvgPool2d((2, None)), Flatten(),
        Linear(16 * 2 * 3, 5))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nets = {
            "mix": (cc.build(mix, (3, 13, 11), name="mix"), (2, 3, 13, 11), np.float32),
            "mix64": (cc.build(mix, (3, 13, 11), name="mix64"), (2, 3, 13, 11), np.float64),
            "residual": (residual, (2, 3, 12, 12), np.float32),
            "gap": (cc.build("CONV3-4-RELU-GAP-FC-2", (2, 9, 9), name="gap"), (3, 2, 9, 9),
                    np.float32),
        }
    for name, (model, shape, dtype) in nets.items():
        model.eval()
        randomize_batch_norm(model, rng)
        if dtype == np.float64:
            model.to(np.float64)
        path = os.path.join(DATA, f"net_{name}.safetensors")
        model.save(path)
        x = rng.standard_normal(shape).astype(dtype)
        y = cc.load(path).eval()(x)
        save_state_dict_file({"input": x, "output": y},
                             os.path.join(DATA, f"net_{name}_io.safetensors"))
        print(f"net_{name}.safetensors: {type(model).__name__}, output {y.shape}")


def write_graph_nets():
    """The nets again in the graph format (format 2, docs/format.md), as
    net_<name>_graph.safetensors: the checked-in net_<name>.safetensors were
    written before the graph existed and stay as the format-1 fixtures, so
    the C++ tests (and the loader fuzzer, which seeds from this folder) read
    both formats against the same _io outputs."""
    import convcore as cc

    for name in ("mix", "mix64", "residual", "gap"):
        model = cc.load(os.path.join(DATA, f"net_{name}.safetensors"))
        model.save(os.path.join(DATA, f"net_{name}_graph.safetensors"))
        print(f"net_{name}_graph.safetensors")


if __name__ == "__main__":
    os.makedirs(DATA, exist_ok=True)
    if sys.argv[1:] == ["--graph-nets"]:  # only the format-2 copies of the nets
        write_graph_nets()
        sys.exit(0)
    write_ops()
    write_nets()
    write_graph_nets()
