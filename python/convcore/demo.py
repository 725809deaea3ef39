"""`python -m convcore demo`: the lecture's worked examples through the real
ops, with the output volumes and parameter counts the notes give, then a
short timing of AlexNet's conv layers."""
from __future__ import annotations

import numpy as np

from . import functional as F
from .bench import alexnet_table


def _volume(y: np.ndarray) -> str:
    """The lecture writes volumes as H x W x C."""
    return f"{y.shape[2]}x{y.shape[3]}x{y.shape[1]}"


def _conv_example(rng, title, h, cin, cout, k, stride, pad, expect_volume, expect_params):
    x = rng.standard_normal((1, cin, h, h), dtype=np.float32)
    w = rng.standard_normal((cout, cin, k, k), dtype=np.float32)
    b = np.zeros(cout, dtype=np.float32)
    y = F.conv2d(x, w, b, stride=stride, padding=pad)
    params = w.size + b.size
    ok = _volume(y) == expect_volume and params == expect_params
    print(f"  {title}: {h}x{h}x{cin} -> {_volume(y)}, {params:,} parameters "
          f"(notes: {expect_volume}, {expect_params:,}) {'ok' if ok else 'MISMATCH'}")
    return y, ok


def worked_examples() -> bool:
    rng = np.random.default_rng(0)
    ok = True
    print("The lecture's worked examples, computed by convcore's ops:")
    _, good = _conv_example(rng, "CONV 10 5x5 filters, stride 1, pad 2", 32, 3, 10, 5, 1, 2,
                            "32x32x10", 760)
    ok &= good
    y, good = _conv_example(rng, "AlexNet CONV1: 96 11x11 filters, stride 4, pad 0", 227, 3, 96,
                            11, 4, 0, "55x55x96", 34944)
    ok &= good
    pooled = F.max_pool2d(y, 3, stride=2)
    good = _volume(pooled) == "27x27x96"
    ok &= good
    print(f"  AlexNet POOL1: 3x3 filters, stride 2: {_volume(y)} -> {_volume(pooled)}, 0 parameters "
          f"(notes: 27x27x96) {'ok' if good else 'MISMATCH'}")
    print("  7x7 input, 3x3 filter (output = (N - F + 2P) / S + 1):")
    x = rng.standard_normal((1, 1, 7, 7), dtype=np.float32)
    w = rng.standard_normal((1, 1, 3, 3), dtype=np.float32)
    for stride, pad, expected, note in [(1, 0, 5, ""), (2, 0, 3, ""),
                                        (3, 0, 2, " ((7-3)/3+1 = 2.33: doesn't fit! floored, "
                                                  "as PyTorch does)"),
                                        (1, 1, 7, ""), (3, 1, 3, "")]:
        out = F.conv2d(x, w, stride=stride, padding=pad)
        good = out.shape[2] == expected
        ok &= good
        print(f"    stride {stride}, pad {pad}: {out.shape[2]}x{out.shape[3]}{note} "
              f"{'ok' if good else 'MISMATCH'}")
    return ok


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m convcore demo")
    parser.add_argument("--batch", type=int, default=16, help="batch for the AlexNet timing")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    ok = worked_examples()
    print()
    alexnet_table(batch=args.batch, threads=args.threads, repeat=1, with_torch=False)
    if not ok:
        raise SystemExit("some worked examples did not match the lecture notes")
