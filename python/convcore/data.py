"""Data for training: scikit-learn's handwritten digits, pictures in a
folder per class, a seeded train/validation/test split, a batching
DataLoader and two augmentations.

    x, y = load_digits(size=28, padding=2)   # (1797, 1, 32, 32)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train_val_test_split(x, y, seed=0)
    loader = DataLoader(x_train, y_train, batch_size=32, shuffle=True, seed=0,
                        augment=RandomShift(2))

    pictures = ImageFolder("pets/train", size=64, mean=0.5, std=0.25)  # pets/train/cat/*.jpg, ...
    loader = DataLoader(pictures, batch_size=32, shuffle=True, seed=0)
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["load_digits", "resize", "train_val_test_split", "ImageFolder", "IMG_EXTENSIONS",
           "DataLoader", "RandomShift", "RandomAffine"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# --------------------------------------------------------------------- digits

def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) matrix that resamples one axis, with PyTorch's
    interpolate conventions (align_corners=False)."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    rows = np.arange(n_out)
    if mode == "nearest":
        m[rows, np.minimum(np.floor(rows * scale).astype(int), n_in - 1)] = 1.0
        return m
    src = np.maximum((rows + 0.5) * scale - 0.5, 0.0)  # pixel centres, clamped at the edge
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def resize(images: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """Resamples (..., H, W) images to (..., size, size), as
    torch.nn.functional.interpolate(mode=mode, align_corners=False)."""
    size = _positive_int(size, "size")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    images = np.asarray(images)
    if images.ndim < 2:
        raise ValueError(f"images must have at least 2 dimensions (H, W), got {images.shape}")
    rows = _resize_matrix(images.shape[-2], size, mode)
    cols = _resize_matrix(images.shape[-1], size, mode)
    out = np.einsum("ih,...hw,jw->...ij", rows, images, cols, optimize=True)
    return out.astype(images.dtype if images.dtype.kind == "f" else np.float32)


def load_digits(size: int = 8, padding: int = 0,
                mode: str = "bilinear") -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (bundled with scikit-learn, no
    download): images float32 (N, 1, S, S) in [0, 1], S = size + 2 * padding,
    and labels int64 in 0..9. The 8x8 originals are resampled to size x size
    (bilinear by default, or mode='nearest'), then framed by `padding` zero
    pixels. load_digits(28, padding=2) lays the digits out as LeNet-5 saw
    MNIST: a 28x28 digit centred in a 32x32 field."""
    try:
        from sklearn.datasets import load_digits as _sklearn_digits
    except ImportError:
        raise ImportError('load_digits needs scikit-learn: pip install "convcore[demo]"') \
            from None
    size = _positive_int(size, "size")
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    digits = _sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    if size != images.shape[-1]:
        images = np.clip(resize(images, size, mode), 0.0, 1.0)
    if padding:
        images = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    return np.ascontiguousarray(images, dtype=np.float32), digits.target.astype(np.int64)


# ---------------------------------------------------------------------- split

def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def train_val_test_split(x, y, val_fraction: float = 0.1, test_fraction: float = 0.2,
                         seed: Optional[int] = 0, stratify: bool = True):
    """Splits (x, y) into ((x_train, y_train), (x_val, y_val), (x_test, y_test)).

    The test and validation sets get round(N * fraction) samples each. With
    stratify (the default) every class is spread over the three parts in
    proportion to its size (to within one sample per class); otherwise the
    samples are simply shuffled. The same seed gives the same split."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same number of samples (y 1-D), got x "
                         f"{x.shape} and y {y.shape}")
    val_fraction = _fraction(val_fraction, "val_fraction")
    test_fraction = _fraction(test_fraction, "test_fraction")
    n = len(y)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n_test + n_val >= n:
        raise ValueError(f"val_fraction + test_fraction leave no training samples "
                         f"({n_val} + {n_test} of {n})")
    rng = np.random.default_rng(seed)
    if stratify:
        # Shuffle within each class, give the k-th of a class's m samples the
        # key (k + 0.5) / m, and sort by key (ties in random order): any prefix
        # of that order then holds every class in proportion.
        _, cls, counts = np.unique(y, return_inverse=True, return_counts=True)
        cls = cls.reshape(-1)
        key = np.empty(n)
        for c, m in enumerate(counts):
            members = np.flatnonzero(cls == c)
            key[rng.permutation(members)] = (np.arange(m) + 0.5) / m
        order = np.lexsort((rng.permutation(n), key))
    else:
        order = rng.permutation(n)
    test, val, train = np.split(order, [n_test, n_test + n_val])
    train, val, test = np.sort(train), np.sort(val), np.sort(test)  # keep the original order
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


# ---------------------------------------------------------------- image folders

# torchvision's list, matched case-insensitively
IMG_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff",
                  ".webp")

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError('ImageFolder needs Pillow: pip install "convcore[data]"') from None
    return Image, ImageOps


def _size_pair(size) -> Tuple[int, int]:
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return _positive_int(size[0], "size[0] (height)"), _positive_int(size[1], "size[1] (width)")
    if isinstance(size, (tuple, list)):
        raise ValueError(f"size must be an int or a pair (height, width), got {size!r}")
    side = _positive_int(size, "size")
    return side, side


def _per_channel(value, name: str, channels: int, default: float) -> np.ndarray:
    """mean or std as a (C, 1, 1) float32 array: one number for every channel
    or one number per channel."""
    if value is None:
        value = default
    try:
        arr = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        arr = np.empty(0, np.float32)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a number or {channels} numbers (one per channel), "
                         f"got {value!r}")
    return arr.reshape(channels, 1, 1)


class ImageFolder:
    """Pictures stored in one sub-folder per class, as torchvision's ImageFolder:

        root/cat/001.png
        root/cat/nested/002.jpg
        root/dog/xyz.jpeg

    Classes are the sorted names of root's sub-folders (hidden ones, starting
    with '.', are skipped); class_to_idx maps them to 0, 1, ...; samples
    lists every (path, class index), the files of each class folder and its
    sub-folders in sorted order, with an extension in `extensions`
    (case-insensitive); targets holds the class indices.

    dataset[i] reads the i-th picture with Pillow and returns (image, label):
    image a float32 (C, height, width) array, label an int. The picture is
    converted to RGB (C = 3), or to one grey channel with grayscale=True;
    brought to `size` (an int for a square, or (height, width)): with
    crop=True scaled until it covers the size, keeping its aspect ratio, and
    centre-cropped; with crop=False stretched to the size; scaled to [0, 1]
    and normalised per channel as (x - mean) / std (mean and std: one number
    or one per channel; by default 0 and 1). interpolation is Pillow's filter
    for the resizing (antialiased when shrinking).

    DataLoader(dataset, batch_size=...) reads the pictures of each batch as
    it is drawn; arrays() reads them all at once into (x, y) arrays."""

    def __init__(self, root, size, crop: bool = True, mean=None, std=None,
                 grayscale: bool = False, interpolation: str = "bilinear",
                 extensions: Sequence[str] = IMG_EXTENSIONS):
        _pillow()  # fail here, before listing the folders, when Pillow is missing
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"root: no such folder: {root}")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"root must be a folder of class folders, got the file {root}")
        self.size = _size_pair(size)
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got "
                             f"{interpolation!r}")
        if isinstance(extensions, str) or not all(isinstance(e, str) for e in extensions) \
                or not extensions:
            raise TypeError(f"extensions must be a sequence of strings like ('.png', '.jpg'), "
                            f"got {extensions!r}")
        self.root, self.crop, self.grayscale = root, bool(crop), bool(grayscale)
        self.interpolation = interpolation
        self.extensions = tuple(e.lower() for e in extensions)
        channels = 1 if self.grayscale else 3
        self.mean = _per_channel(mean, "mean", channels, 0.0)
        self.std = _per_channel(std, "std", channels, 1.0)
        if np.any(self.std == 0):
            raise ValueError(f"std must not be zero, got {std!r}")

        self.classes: List[str] = sorted(entry.name for entry in os.scandir(root)
                                         if entry.is_dir() and not entry.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"root: no class folders in {root} (expected one sub-folder "
                                    f"of pictures per class)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        empty = []
        for index, name in enumerate(self.classes):
            found = [os.path.join(folder, file)
                     for folder, _, files in sorted(os.walk(os.path.join(root, name),
                                                            followlinks=True))
                     for file in sorted(files) if file.lower().endswith(self.extensions)]
            if not found:
                empty.append(name)
            self.samples += [(path, index) for path in found]
        if empty:
            raise FileNotFoundError(
                f"root: no pictures in the class folder{'s' if len(empty) > 1 else ''} "
                f"{', '.join(empty)} of {root} (extensions: {' '.join(self.extensions)})")
        self.targets: List[int] = [index for _, index in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} pictures")
        path, target = self.samples[index]
        return self.load(path), target

    def load(self, path) -> np.ndarray:
        """One picture as the dataset gives it: float32 (C, height, width)."""
        Image, ImageOps = _pillow()
        height, width = self.size
        resample = getattr(Image, self.interpolation.upper())  # Image.BILINEAR, ...
        try:
            with Image.open(path) as picture:
                picture = picture.convert("L" if self.grayscale else "RGB")
            if self.crop:
                picture = ImageOps.fit(picture, (width, height), method=resample)
            elif picture.size != (width, height):
                picture = picture.resize((width, height), resample)
        except Exception as e:  # Pillow's errors differ by format: name the file whatever they are
            raise OSError(f"ImageFolder: cannot read the picture {path}: {e}") from e
        pixels = np.asarray(picture, dtype=np.float32).reshape(height, width, -1)
        image = pixels.transpose(2, 0, 1) / np.float32(255)
        return np.ascontiguousarray((image - self.mean) / self.std, dtype=np.float32)

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """Every picture at once: x float32 (N, C, height, width), y int64 (N,)."""
        return _collate([self[i] for i in range(len(self))])

    def __repr__(self) -> str:
        return (f"ImageFolder({len(self)} pictures, {len(self.classes)} classes, "
                f"root={self.root!r}, size={self.size}, crop={self.crop}, "
                f"grayscale={self.grayscale})")


def _collate(samples) -> Tuple[np.ndarray, np.ndarray]:
    """A list of (image, label) pairs as a batch: the stacked images and the
    labels as int64."""
    if not samples:
        raise ValueError("no samples to batch")
    images, labels = zip(*samples)
    return np.ascontiguousarray(np.stack(images)), np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------- batching

class _DatasetColumn:
    """The images (part 0) or the labels (part 1) of a dataset, indexed like
    an array: column[indices] reads those samples and stacks that part. The
    labels come from dataset.targets without reading the images when the
    dataset has them (ImageFolder does). ShardedLoader reads loader.x and
    loader.y through these."""

    def __init__(self, dataset, part: int):
        self.dataset, self.part = dataset, part
        targets = getattr(dataset, "targets", None) if part == 1 else None
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.arange(len(self.dataset))[indices]
        if self.targets is not None:
            return self.targets[indices]
        if len(indices) == 0:  # a rank's empty share of a short last batch
            if self.part == 1:
                return np.empty(0, np.int64)
            image = np.asarray(self.dataset[0][0])
            return np.empty((0,) + image.shape, image.dtype)
        return _collate([self.dataset[int(i)] for i in indices])[self.part]


class DataLoader:
    """Iterates over (x_batch, y_batch) pairs of arrays, from arrays or from a
    dataset:

        DataLoader(x, y, batch_size=32)          # x (N, ...), y (N,)
        DataLoader(dataset, batch_size=32)       # len(dataset), dataset[i] -> (image, label)

    A dataset (ImageFolder, or any object with __len__ and __getitem__
    returning (image, label), as in PyTorch) is read one batch at a time:
    each batch stacks its images and gives its labels as int64.

    shuffle: a new order every epoch (every iteration), drawn from a
    generator seeded with `seed` (the same seed repeats the same sequence of
    epochs). augment: a callable augment(x_batch, rng) -> x_batch applied to
    every batch with the loader's generator, e.g. RandomShift(2).
    drop_last: skip the final batch if it is smaller than batch_size."""

    def __init__(self, x, y=None, batch_size: int = 32, shuffle: bool = False,
                 seed: Optional[int] = None, augment: Optional[Callable] = None,
                 drop_last: bool = False):
        if y is None:
            if isinstance(x, np.ndarray) or not (hasattr(x, "__len__")
                                                 and hasattr(x, "__getitem__")):
                raise TypeError(f"DataLoader takes (x, y) arrays or a dataset with __len__ and "
                                f"__getitem__ returning (image, label); got "
                                f"{type(x).__name__} and no y")
            if len(x) == 0:
                raise ValueError("dataset must hold at least one sample, got an empty one")
            self.dataset = x
            x, y = _DatasetColumn(x, 0), _DatasetColumn(x, 1)
        else:
            self.dataset = None
            x, y = np.asarray(x), np.asarray(y)
            if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
                raise ValueError(f"x and y must hold the same number of samples, got x "
                                 f"{x.shape} and y {y.shape}")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be callable, got {type(augment).__name__}")
        self.x, self.y = x, y
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples per epoch (fewer than len(x) with drop_last)."""
        return len(self) * self.batch_size if self.drop_last else len(self.y)

    def _take(self, indices) -> Tuple[np.ndarray, np.ndarray]:
        """The samples at indices (a slice or an index array) as a batch."""
        if self.dataset is not None:  # each sample read once, images and label together
            return _collate([self.dataset[int(i)] for i in np.arange(len(self.y))[indices]])
        return np.ascontiguousarray(self.x[indices]), self.y[indices]

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        n = len(self.y)
        order = self.rng.permutation(n) if self.shuffle else None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            xb, yb = self._take(slice(lo, hi) if order is None else order[lo:hi])
            if self.augment is not None:
                xb = np.ascontiguousarray(self.augment(xb, self.rng))
            yield xb, yb

    def __repr__(self) -> str:
        source = f"{len(self.y)} samples" if self.dataset is None else repr(self.dataset)
        return (f"DataLoader({source}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, drop_last={self.drop_last}, augment={self.augment})")


# ---------------------------------------------------------------- augmentation

class RandomShift:
    """Shifts each image of an (N, C, H, W) batch by a random whole number of
    pixels in [-max_shift, max_shift] along each axis, filling with zeros."""

    def __init__(self, max_shift: int = 2):
        if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) \
                or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
        self.max_shift = int(max_shift)

    def __call__(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 4:
            raise ValueError(f"RandomShift expects an (N, C, H, W) batch, got {batch.shape}")
        s = self.max_shift
        if s == 0:
            return batch
        n, _, h, w = batch.shape
        padded = np.pad(batch, ((0, 0), (0, 0), (s, s), (s, s)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
        # windows[i, c, top, left] is the h x w crop at (top, left); top = s + dy
        # shifts the image up by dy.
        top = rng.integers(0, 2 * s + 1, size=n)
        left = rng.integers(0, 2 * s + 1, size=n)
        return windows[np.arange(n), :, top, left]

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift})"


class RandomAffine:
    """Random rotation (degrees), scaling (scale range) and translation (pixels)
    of each image of an (N, C, H, W) batch about its centre, with bilinear
    sampling and zero fill."""

    def __init__(self, degrees: float = 10.0, translate: float = 1.0,
                 scale: Tuple[float, float] = (0.9, 1.1)):
        for name, value in (("degrees", degrees), ("translate", translate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2
                or not 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be a pair (low, high) with 0 < low <= high, "
                             f"got {scale!r}")
        self.degrees, self.translate = float(degrees), float(translate)
        self.scale = (float(scale[0]), float(scale[1]))

    def __call__(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim != 4:
            raise ValueError(f"RandomAffine expects an (N, C, H, W) batch, got {batch.shape}")
        n, c, h, w = batch.shape
        angle = np.deg2rad(rng.uniform(-self.degrees, self.degrees, size=n))
        zoom = rng.uniform(*self.scale, size=n)
        shift = rng.uniform(-self.translate, self.translate, size=(n, 2))
        # Inverse map: output pixel (y, x) samples the input at R^-1 (p - t) / zoom.
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
        cos, sin = (np.cos(angle) / zoom)[:, None, None], (np.sin(angle) / zoom)[:, None, None]
        dy, dx = yy - shift[:, 0, None, None], xx - shift[:, 1, None, None]
        src_y = cos * dy - sin * dx + cy
        src_x = sin * dy + cos * dx + cx
        # Bilinear sampling from a zero-padded copy: every corner index is valid.
        padded = np.pad(batch, ((0, 0), (0, 0), (1, 1), (1, 1)))
        src_y = np.clip(src_y + 1, 0, h + 1)  # beyond the border: the zero rows/columns
        src_x = np.clip(src_x + 1, 0, w + 1)
        y0, x0 = np.floor(src_y).astype(int), np.floor(src_x).astype(int)
        y1, x1 = np.minimum(y0 + 1, h + 1), np.minimum(x0 + 1, w + 1)
        fy, fx = (src_y - y0)[:, None], (src_x - x0)[:, None]
        i = np.arange(n)[:, None, None]

        def gather(yi, xi):
            return padded[i, :, yi, xi].transpose(0, 3, 1, 2)  # (n, h, w, c) -> (n, c, h, w)

        out = (gather(y0, x0) * (1 - fy) * (1 - fx) + gather(y0, x1) * (1 - fy) * fx
               + gather(y1, x0) * fy * (1 - fx) + gather(y1, x1) * fy * fx)
        return out.astype(batch.dtype)

    def __repr__(self) -> str:
        return (f"RandomAffine(degrees={self.degrees}, translate={self.translate}, "
                f"scale={self.scale})")
