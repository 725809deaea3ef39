"""Writes the inputs of the classify_digits example: scikit-learn's handwritten
digits as LeNet-5 sees them (convcore.data.load_digits(size=28, padding=2):
1x32x32 float32 in [0, 1]) in the example's digits format, and optionally a
LeNet-5 trained on them, saved with model.save().

    python examples/cpp/write_digits.py digits.bin --train-lenet5 lenet5.safetensors
    ./classify_digits lenet5.safetensors digits.bin

With --model it prints the saved model's predictions in Python for the same
digits, in the line format classify_digits prints, so the two can be compared.

The digits format (little-endian): b"CCDIGIT1", then u32 N, C, H, W, then
N i32 labels (-1: unknown), then N*C*H*W float32 pixels (NCHW).
"""
import argparse
import struct
import sys

import numpy as np

MAGIC = b"CCDIGIT1"


def write_digits(path, images, labels=None):
    """images: (N, C, H, W) float32; labels: N ints or None."""
    images = np.ascontiguousarray(images, dtype="<f4")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    n = images.shape[0]
    labels = np.full(n, -1) if labels is None else np.asarray(labels)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<4I", *images.shape))
        f.write(np.ascontiguousarray(labels, dtype="<i4").tobytes())
        f.write(images.tobytes())


def read_digits(path):
    """(images (N, C, H, W) float32, labels (N,) int32) from a digits file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        raise ValueError(f"{path}: not a digits file")
    n, c, h, w = struct.unpack_from("<4I", data, 8)
    labels = np.frombuffer(data, "<i4", n, 24)
    images = np.frombuffer(data, "<f4", n * c * h * w, 24 + 4 * n).reshape(n, c, h, w)
    return images, labels


def train_lenet5(x, y, epochs=8, seed=0):
    """A LeNet-5 trained on (x, y) for a few epochs (seconds on a laptop)."""
    import convcore as cc

    cc.manual_seed(seed)
    (xt, yt), (xv, yv), _ = cc.data.train_val_test_split(x, y, seed=seed)
    model = cc.models.lenet5()
    opt = cc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    cc.fit(model, cc.nn.CrossEntropyLoss(), opt,
           cc.data.DataLoader(xt, yt, batch_size=32, shuffle=True, seed=seed),
           cc.data.DataLoader(xv, yv, batch_size=256), epochs=epochs, progress=False)
    return model.eval()


def main(argv=None):
    import convcore as cc

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("digits", help="the digits file to write")
    parser.add_argument("--count", type=int, default=None, help="only the first N digits")
    parser.add_argument("--train-lenet5", metavar="PATH",
                        help="also train a LeNet-5 on the digits and save it to PATH")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", metavar="PATH",
                        help="print this saved model's predictions in Python")
    args = parser.parse_args(argv)

    x, y = cc.data.load_digits(size=28, padding=2)
    if args.count is not None:
        x, y = x[:args.count], y[:args.count]
    write_digits(args.digits, x, y)
    print(f"wrote {len(x)} digits of {x.shape[1]}x{x.shape[2]}x{x.shape[3]} to {args.digits}")
    model_path = args.model
    if args.train_lenet5:
        train_lenet5(x, y, epochs=args.epochs).save(args.train_lenet5)
        print(f"saved a LeNet-5 trained for {args.epochs} epochs to {args.train_lenet5}")
        model_path = model_path or args.train_lenet5
    if model_path:
        pred = cc.predict(cc.load(model_path), x).argmax(1)
        print("python predictions: " + " ".join(str(int(p)) for p in pred))
        print(f"python accuracy: {int((pred == y).sum())}/{len(y)} = {100 * (pred == y).mean():.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
