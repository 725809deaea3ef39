"""End-to-end benchmark: images per second of whole models, inference and a
training step, convcore against PyTorch's CPU build on the same model with
the same weights.

    python -m convcore bench --e2e [--threads 2] [--repeat 3] [--size 224]
                                   [--models resnet18 mobilenet_v2 efficientnet_b0]
                                   [--batches 1 16] [--json out.json]

The PyTorch model is built from the convcore model by `to_torch` (a mirror
of the module tree with torch.nn layers and the same state-dict keys), so
both run the same architecture and weights; the rows report the largest
difference of the eval outputs, max|convcore - torch| / max|torch|, as a
check. Inference: eval mode, forward only (torch under no_grad). Training
step: train mode, forward, cross-entropy, backward, SGD step (momentum
0.9). Timings are medians of `repeat` runs, the libraries taking turns in
blocks (bench.interleaved_medians); the ratio is convcore's images/s over
PyTorch's (above 1: convcore is faster).
"""
from __future__ import annotations

import json
import platform
from collections import OrderedDict
from typing import List, Sequence

import numpy as np

from . import _core
from .bench import cpu_name, interleaved_medians

DEFAULT_MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0")


# --------------------------------------------------------------- the torch mirror

def to_torch(model):
    """A torch.nn.Module computing what the convcore model computes, with the
    same state-dict keys, loaded with its weights (float32)."""
    import torch
    from torch import nn as tnn

    from .builder import Network
    from .models import ResNet
    from .nn import activation as act
    from .nn import layers as L
    from .nn.graph import Graph
    from .nn.module import Identity, Sequential
    from .nn.norm import BatchNorm2d, LocalResponseNorm
    from .nn.residual import _Residual

    class TorchGraph(tnn.Module):
        def __init__(self, g):
            super().__init__()
            for name, child in g._modules.items():
                self.add_module(name, convert(child))
            self.nodes, self.output = g.nodes, g.outputs[0]

        def forward(self, x):
            values = {"x": x}
            for out, op, inputs in self.nodes:
                args = [values[v] for v in inputs]
                if op == "concat":
                    values[out] = torch.cat(args, 1)
                elif op == "add":
                    values[out] = sum(args[1:], args[0])
                elif op == "mul":
                    values[out] = args[0] * args[1]
                elif op == "relu":
                    values[out] = torch.relu(args[0])
                else:
                    values[out] = getattr(self, op)(args[0])
            return values[self.output]

    class TorchResidual(tnn.Module):
        def __init__(self, block):
            super().__init__()
            self.body = [name for name in block._modules if name != "downsample"]
            for name, child in block._modules.items():
                if child is not None:
                    self.add_module(name, convert(child))
            self.has_downsample = block.downsample is not None

        def forward(self, x):
            out = x
            for i, name in enumerate(self.body):
                out = getattr(self, name)(out)
                if name.startswith("bn") and i != len(self.body) - 1:
                    out = torch.relu(out)
            identity = self.downsample(x) if self.has_downsample else x
            return torch.relu(out + identity)

    class TorchResNet(tnn.Module):
        def __init__(self, m):
            super().__init__()
            for name, child in m._modules.items():
                self.add_module(name, convert(child))

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    class TorchNetwork(tnn.Module):
        def __init__(self, m):
            super().__init__()
            self.features = convert(m.features)
            self.classifier = convert(m.classifier)

        def forward(self, x):
            x = self.features(x)
            return self.classifier(torch.flatten(x, 1)) if len(self.classifier) else x

    class TorchStochasticDepth(tnn.Module):
        def __init__(self, p, mode):
            super().__init__()
            self.p, self.mode = p, mode

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
            keep = torch.empty(shape, dtype=x.dtype).bernoulli_(1 - self.p)
            return x * keep / (1 - self.p)

    simple = {
        act.Sigmoid: tnn.Sigmoid, act.SiLU: tnn.SiLU, act.ReLU6: tnn.ReLU6,
        act.Hardswish: tnn.Hardswish, act.Hardsigmoid: tnn.Hardsigmoid, L.ReLU: tnn.ReLU,
        Identity: tnn.Identity,
    }

    def convert(m):
        kind = type(m)
        if kind in simple:
            return simple[kind]()
        if isinstance(m, Graph):
            return TorchGraph(m)
        if isinstance(m, Sequential):
            return tnn.Sequential(OrderedDict((k, convert(c)) for k, c in m._modules.items()))
        if isinstance(m, _Residual):
            return TorchResidual(m)
        if isinstance(m, ResNet):
            return TorchResNet(m)
        if isinstance(m, Network):
            return TorchNetwork(m)
        if isinstance(m, L.Conv2d):
            return tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                              m.dilation, m.groups, m.bias is not None, m.padding_mode)
        if isinstance(m, L.Linear):
            return tnn.Linear(m.in_features, m.out_features, m.bias is not None)
        if isinstance(m, BatchNorm2d):
            return tnn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                   m.track_running_stats)
        if isinstance(m, L.MaxPool2d):
            return tnn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation,
                                 ceil_mode=m.ceil_mode)
        if isinstance(m, L.AvgPool2d):
            return tnn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                 m.count_include_pad, m.divisor_override)
        if isinstance(m, L.AdaptiveAvgPool2d):
            return tnn.AdaptiveAvgPool2d(m.output_size)
        if isinstance(m, L.Flatten):
            return tnn.Flatten(m.start_dim, m.end_dim)
        if isinstance(m, L.Dropout):
            return tnn.Dropout(m.p)
        if isinstance(m, act.StochasticDepth):
            return TorchStochasticDepth(m.p, m.mode)
        if isinstance(m, LocalResponseNorm):
            return tnn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k)
        raise TypeError(f"to_torch: no torch counterpart for {kind.__name__}")

    t = convert(model)
    t.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=v.dtype))
                       for k, v in model.state_dict().items()}, strict=True)
    return t.float()


# ------------------------------------------------------------------------ the runs

def _convcore_fns(model, x: np.ndarray, y: np.ndarray):
    """Inference and one training step of the convcore model."""
    from . import optim
    from .nn.loss import CrossEntropyLoss

    loss_fn = CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def infer():
        model.eval()
        return model(x)

    def train():
        model.train()
        loss_fn(model(x), y)
        model.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()

    return infer, train


def _torch_fns(tmodel, x: np.ndarray, y: np.ndarray, torch):
    """The same for the torch mirror."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(tmodel.parameters(), lr=1e-4, momentum=0.9)

    def infer():
        tmodel.eval()
        with torch.no_grad():
            return tmodel(xt)

    def train():
        tmodel.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(xt), yt).backward()
        opt.step()

    return infer, train


def run(models: Sequence[str] = DEFAULT_MODELS, batches: Sequence[int] = (1, 16),
        threads: int = 2, repeat: int = 3, size: int = 224, with_torch: bool = True,
        print_fn=print) -> dict:
    from . import models as zoo
    from .nn import init

    _core.set_num_threads(threads)
    torch = None
    if with_torch:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            torch = None
    rows: List[dict] = []
    header = (f"{'model':16} {'batch':>5} {'mode':9} {'convcore img/s':>15} "
              f"{'torch img/s':>12} {'ratio':>7} {'rel. diff':>11}")
    if print_fn:
        print_fn(f"end to end, {threads} threads, {size}x{size}x3 input, float32, "
                 f"median of {repeat}; ratio = convcore / torch images per second")
        print_fn(header)
        print_fn("-" * len(header))
    for name in models:
        init.manual_seed(0)
        model = zoo.get(name, num_classes=1000, input_size=size)
        tmodel = to_torch(model) if torch is not None else None
        for n in batches:
            rng = np.random.default_rng(n)
            x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
            y = rng.integers(0, 1000, n)
            cc_infer, cc_train = _convcore_fns(model, x, y)
            pairs = {"inference": {"convcore": cc_infer}, "train step": {"convcore": cc_train}}
            diff = None
            if torch is not None:
                # the same weights again (the last training steps moved both
                # models, with different dropout masks), then the check
                tmodel.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                        for k, v in model.state_dict().items()})
                t_infer, t_train = _torch_fns(tmodel, x, y, torch)
                expected = t_infer().numpy()
                diff = float(np.abs(cc_infer() - expected).max() /
                             max(float(np.abs(expected).max()), 1e-30))
                pairs["inference"]["torch"] = t_infer
                pairs["train step"]["torch"] = t_train
            for mode, fns in pairs.items():
                med = interleaved_medians(fns, repeat)
                row = dict(model=name, batch=n, mode=mode, size=size, threads=threads,
                           convcore_ips=n / med["convcore"],
                           torch_ips=n / med["torch"] if "torch" in med else None,
                           max_rel_diff=diff)
                row["ratio"] = row["convcore_ips"] / row["torch_ips"] if row["torch_ips"] else None
                rows.append(row)
                if print_fn:
                    t = f"{row['torch_ips']:12.2f}" if row["torch_ips"] else f"{'-':>12}"
                    r = f"{row['ratio']:7.2f}" if row["ratio"] else f"{'-':>7}"
                    d = f"{diff:11.2e}" if diff is not None and mode == "inference" else \
                        f"{'':>11}"
                    print_fn(f"{name:16} {n:5d} {mode:9} {row['convcore_ips']:15.2f} {t} {r} {d}")
    return dict(rows=rows, cpu=cpu_name(), machine=platform.machine(), threads=threads,
                torch=getattr(torch, "__version__", None), size=size, repeat=repeat)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m convcore bench --e2e",
                                description="end-to-end images/s vs PyTorch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="input side (default 224)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    result = run(args.models, args.batches, args.threads, args.repeat, args.size,
                 not args.no_torch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
