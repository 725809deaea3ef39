"""The lecture's classic image filters as convolutions: Gaussian blur and
Sobel edge detection with convcore.conv2d on a real photograph (scikit-learn's
sample image china.jpg), writing the input and the results as PNG.

    python examples/filters.py OUT_DIR [--sigma 2.0] [--image china.jpg|flower.jpg]

* Gaussian blur: a normalised 2-D Gaussian kernel (size 6 sigma + 1, odd)
  applied to each colour channel separately, as one depthwise convolution
  (groups=3), with replicate padding so the borders do not darken.
* Sobel: the 3x3 kernels [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] and its
  transpose as the two output channels of one convolution of the grey image;
  the edge strength is sqrt(gx^2 + gy^2). A ConvNet's "convolution" is a
  cross-correlation (the kernel is not flipped), which only flips the sign
  of gx and gy, not the magnitude.

Needs scikit-learn (and Pillow, which it uses to read the JPEG); PNGs are
written with the standard library alone.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import zlib

import numpy as np

import convcore as cc

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """(k, k) float32 kernel summing to 1, k = 2 * ceil(3 sigma) + 1."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = int(np.ceil(3 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def load_image(name: str = "china.jpg") -> np.ndarray:
    """The sample photograph as float32 (3, H, W) in [0, 1]."""
    from sklearn.datasets import load_sample_image
    return np.ascontiguousarray(load_sample_image(name).transpose(2, 0, 1), np.float32) / 255


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, (1, H, W)."""
    w = np.array([0.299, 0.587, 0.114], np.float32)
    return np.tensordot(w, rgb, axes=1)[None]


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """(C, H, W) -> (C, H, W): one depthwise convolution, replicate padding."""
    k = gaussian_kernel(sigma)
    c, pad = rgb.shape[0], k.shape[0] // 2
    padded = np.pad(rgb, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    weight = np.repeat(k[None, None], c, axis=0)                   # (C, 1, k, k)
    return cc.conv2d(padded[None], weight, groups=c)[0]


def sobel(grey: np.ndarray):
    """(1, H, W) -> gx, gy, magnitude, each (H, W): one convolution with two
    output channels, replicate padding."""
    weight = np.stack([SOBEL_X, SOBEL_X.T])[:, None]                # (2, 1, 3, 3)
    padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx, gy = cc.conv2d(padded[None], weight)[0]
    return gx, gy, np.hypot(gx, gy)


def write_png(path: str, image: np.ndarray) -> str:
    """Writes (H, W) grey or (3, H, W) colour values in [0, 1] as an 8-bit PNG."""
    a = np.clip(np.asarray(image, np.float64), 0, 1)
    a = np.round(a * 255).astype(np.uint8)
    if a.ndim == 3:
        a, colour = a.transpose(1, 2, 0), 2          # PNG colour type 2: RGB
    else:
        colour = 0                                   # grey
    h, w = a.shape[:2]
    rows = a.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))   # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))
    return path


def run(out_dir: str, sigma: float = 2.0, image: str = "china.jpg") -> dict:
    """Computes the filters and writes the PNGs; returns the arrays and paths."""
    os.makedirs(out_dir, exist_ok=True)
    rgb = load_image(image)
    grey = to_grey(rgb)
    blurred = gaussian_blur(rgb, sigma)
    gx, gy, mag = sobel(grey)
    # gradients in [-4, 4] (the kernel's positive taps sum to 4): mid-grey is 0
    paths = {
        "input": write_png(os.path.join(out_dir, "input.png"), rgb),
        "grey": write_png(os.path.join(out_dir, "grey.png"), grey[0]),
        "gaussian_blur": write_png(os.path.join(out_dir, "gaussian_blur.png"), blurred),
        "sobel_x": write_png(os.path.join(out_dir, "sobel_x.png"), 0.5 + gx / 8),
        "sobel_y": write_png(os.path.join(out_dir, "sobel_y.png"), 0.5 + gy / 8),
        "sobel_magnitude": write_png(os.path.join(out_dir, "sobel_magnitude.png"),
                                     mag / max(float(mag.max()), 1e-12)),
    }
    return dict(rgb=rgb, grey=grey, blurred=blurred, gx=gx, gy=gy, magnitude=mag, paths=paths)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--sigma", type=float, default=2.0)
    p.add_argument("--image", default="china.jpg", choices=["china.jpg", "flower.jpg"])
    args = p.parse_args(argv)
    r = run(args.out_dir, args.sigma, args.image)
    h, w = r["grey"].shape[1:]
    k = gaussian_kernel(args.sigma).shape[0]
    print(f"{args.image}: {w}x{h}; Gaussian {k}x{k} (sigma {args.sigma}) per channel; "
          f"Sobel 3x3 x/y; mean edge strength {float(r['magnitude'].mean()):.3f}")
    for name, path in r["paths"].items():
        print(f"  {name:16} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
