"""`python -m convcore demo`: the lecture's worked examples computed by the
real ops, then LeNet-5 trained on scikit-learn's handwritten digits with the
lecture's recipe (SGD with momentum and weight decay, learning rate divided
by 10 when validation accuracy plateaus), reporting held-out test accuracy,
time per epoch and images per second."""
from __future__ import annotations

import time

import numpy as np

from . import functional as F


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
    print(f"  AlexNet POOL1: 3x3 filters, stride 2: {_volume(y)} -> {_volume(pooled)}, "
          f"0 parameters (notes: 27x27x96) {'ok' if good else 'MISMATCH'}")
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


def train_digits(epochs: int = 25, seed: int = 0, print_fn=print, distributed=None) -> dict:
    """Trains LeNet-5 on the digits (70% train, 10% validation, 20% test,
    stratified) and returns test accuracy, median epoch time and training
    images/s, and the History. The
    seed fixes the split, the initial weights, the shuffling and the
    augmentation, so a run repeats exactly. With distributed (a
    convcore.distributed.ProcessGroup), the batch of 32 is split over the
    ranks, so the run takes the same steps as one process."""
    from .data import DataLoader, RandomShift, load_digits, train_val_test_split
    from .models import lenet5
    from .nn import CrossEntropyLoss, init
    from .optim import SGD, ReduceLROnPlateau
    from .train import evaluate, fit

    x, y = load_digits(size=28, padding=2)  # LeNet-5's layout: a 28x28 digit in a 32x32 field
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train_val_test_split(
        x, y, val_fraction=0.1, test_fraction=0.2, seed=seed)
    init.manual_seed(seed)
    model = lenet5(num_classes=10, input_size=(1, 32, 32))
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=4)
    loss_fn = CrossEntropyLoss(label_smoothing=0.1)
    ranks = 1 if distributed is None else distributed.size
    if 32 % ranks:
        raise ValueError(f"the demo's batch of 32 does not split over {ranks} ranks")
    train_loader = DataLoader(x_train, y_train, batch_size=32 // ranks, shuffle=True, seed=seed,
                              augment=RandomShift(2))
    print_fn(f"LeNet-5 ({model.num_parameters():,} parameters) on scikit-learn's handwritten "
             f"digits, 8x8 resampled to 28x28 in a 32x32 field:")
    print_fn(f"  {len(y_train)} training, {len(y_val)} validation, {len(y_test)} test images; "
             f"{F.get_num_threads()} threads" + (f" on each of {ranks} ranks" if ranks > 1 else ""))
    print_fn("  SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 32, label smoothing 0.1, "
             "random shifts of up to 2 pixels; lr / 10 after 4 epochs without better "
             "validation accuracy")
    history = fit(model, loss_fn, optimizer, train_loader,
                  DataLoader(x_val, y_val, batch_size=256), epochs=epochs, scheduler=scheduler,
                  print_fn=print_fn, distributed=distributed)
    _, accuracy = evaluate(model, DataLoader(x_test, y_test, batch_size=256), loss_fn,
                           distributed=distributed)
    return {
        "test_accuracy": accuracy,
        "test_size": len(y_test),
        "seconds_per_epoch": float(np.median(history.epoch_time)),
        "images_per_sec": float(np.median(history.images_per_sec)),
        "training_seconds": float(np.sum(history.epoch_time)),
        "history": history,
    }


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m convcore demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=25, help="training epochs (default 25)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the core (default: OMP_NUM_THREADS or all cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, weights, shuffling and augmentation")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel over the ranks of an MPI job: "
                             "mpiexec -n 2 python -m convcore demo --distributed")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="save the training curves there (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        F.set_num_threads(args.threads)

    group = None
    if args.distributed:
        try:
            from .distributed import init
            group = init()
        except ImportError as e:
            raise SystemExit(str(e)) from None
    # one rank prints; the others stay quiet
    is_root = group is None or group.is_root
    say = print if is_root else (lambda *args, **kwargs: None)

    start = time.perf_counter()
    ok = worked_examples() if is_root else True
    say()
    try:
        result = train_digits(epochs=args.epochs, seed=args.seed, print_fn=say,
                              distributed=group)
    except ImportError as e:
        raise SystemExit(str(e)) from None
    total = time.perf_counter() - start
    accuracy, n_test = result["test_accuracy"], result["test_size"]
    say()
    say(f"Test accuracy:   {100 * accuracy:.1f}% ({round(accuracy * n_test)}/{n_test} "
        f"held-out images)")
    say(f"Time per epoch:  {result['seconds_per_epoch']:.2f} s, "
        f"{result['images_per_sec']:,.0f} training images/s (medians over "
        f"{len(result['history'])} epochs, {F.get_num_threads()} threads"
        + (f" x {group.size} ranks)" if group is not None else ")"))
    say(f"Total time:      {total:.1f} s ({result['training_seconds']:.1f} s training and "
        f"validation)")
    if args.plot and is_root:
        result["history"].plot(args.plot)
        say(f"Training curves: {args.plot}")
    if not ok:
        raise SystemExit("some worked examples did not match the lecture notes")
    if accuracy < 0.97:
        raise SystemExit(f"test accuracy {100 * accuracy:.1f}% is below 97%")
