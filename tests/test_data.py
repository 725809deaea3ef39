"""convcore.data: digits loading, resizing, splitting, batching, augmentation."""
import numpy as np
import pytest

from convcore.data import (DataLoader, RandomAffine, RandomShift, load_digits, resize,
                           train_val_test_split)


def _sklearn():
    return pytest.importorskip("sklearn", reason="load_digits needs scikit-learn")


# ---------------------------------------------------------------------- digits

def test_load_digits_8x8():
    _sklearn()
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    assert x.flags.c_contiguous


@pytest.mark.parametrize("size, padding, side", [(32, 0, 32), (28, 2, 32), (16, 1, 18)])
def test_load_digits_resized(size, padding, side):
    _sklearn()
    x8, y8 = load_digits()
    x, y = load_digits(size=size, padding=padding)
    assert x.shape == (1797, 1, side, side) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(y, y8)
    if padding:
        assert not x[..., :padding, :].any() and not x[..., -padding:].any()
    # resampling keeps the average brightness roughly
    inner = x[..., padding:padding + size, padding:padding + size]
    assert abs(inner.mean() - x8.mean()) < 0.02


def test_load_digits_nearest_repeats_pixels():
    _sklearn()
    x8, _ = load_digits()
    x, _ = load_digits(size=32, mode="nearest")
    np.testing.assert_array_equal(x, x8.repeat(4, axis=2).repeat(4, axis=3))


@pytest.mark.parametrize("kwargs, match", [(dict(size=0), "size"), (dict(size=2.5), "size"),
                                           (dict(padding=-1), "padding"),
                                           (dict(size=16, mode="cubic"), "mode")])
def test_load_digits_bad_arguments(kwargs, match):
    _sklearn()
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("size", [3, 8, 13, 32])
def test_resize_matches_torch_interpolate(mode, size):
    torch = pytest.importorskip("torch", reason="torch is needed for the parity tests")
    x = np.random.default_rng(0).random((2, 3, 8, 6)).astype(np.float32)
    ours = resize(x, size, mode)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size),
                                             mode=mode).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


# ------------------------------------------------------------------------ split

def _toy(n=200, classes=4):
    y = np.arange(n) % classes
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return x, y


@pytest.mark.parametrize("stratify", [True, False])
def test_split_sizes_disjoint_and_complete(stratify):
    x, y = _toy(203, 4)
    (xa, ya), (xb, yb), (xc, yc) = train_val_test_split(x, y, 0.15, 0.25, seed=3,
                                                        stratify=stratify)
    assert (len(ya), len(yb), len(yc)) == (203 - 30 - 51, 30, 51)
    ids = [xs[:, 0].astype(int) for xs in (xa, xb, xc)]
    allids = np.concatenate(ids)
    assert len(np.unique(allids)) == 203 == len(allids)
    for xs, ys in ((xa, ya), (xb, yb), (xc, yc)):
        np.testing.assert_array_equal(ys, y[xs[:, 0].astype(int)])  # pairs stay together


def test_split_is_stratified():
    x, y = _toy(1000, 10)
    y = np.where(np.arange(1000) < 500, 0, y)  # class 0 holds half the samples
    (_, ya), (_, yb), (_, yc) = train_val_test_split(x, y, 0.1, 0.2, seed=0)
    for part, frac in ((ya, 0.7), (yb, 0.1), (yc, 0.2)):
        expected = np.bincount(y) * frac
        assert np.all(np.abs(np.bincount(part, minlength=10) - expected) <= 1)


def test_split_seed_determinism():
    x, y = _toy()
    a = train_val_test_split(x, y, 0.1, 0.2, seed=7)
    b = train_val_test_split(x, y, 0.1, 0.2, seed=7)
    c = train_val_test_split(x, y, 0.1, 0.2, seed=8)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[2][0], c[2][0])


def test_split_empty_validation():
    x, y = _toy(50)
    (xa, _), (xb, yb), (xc, _) = train_val_test_split(x, y, 0.0, 0.2, seed=0)
    assert len(xb) == len(yb) == 0 and len(xa) == 40 and len(xc) == 10


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(val_fraction=-0.1), ValueError, "val_fraction"),
    (dict(test_fraction=1.0), ValueError, "test_fraction"),
    (dict(val_fraction=0.5, test_fraction=0.5), ValueError, "no training"),
    (dict(val_fraction="0.1"), TypeError, "val_fraction"),
])
def test_split_bad_arguments(kwargs, exc, match):
    x, y = _toy()
    with pytest.raises(exc, match=match):
        train_val_test_split(x, y, **kwargs)
    with pytest.raises(ValueError, match="same number"):
        train_val_test_split(x, y[:-1])


# ------------------------------------------------------------------- DataLoader

def _epoch(loader):
    return [(xb.copy(), yb.copy()) for xb, yb in loader]


@pytest.mark.parametrize("n, batch, drop_last, sizes", [
    (10, 4, False, [4, 4, 2]), (10, 4, True, [4, 4]), (8, 4, True, [4, 4]),
    (3, 5, False, [3]), (3, 5, True, []),
])
def test_loader_batch_shapes(n, batch, drop_last, sizes):
    x = np.zeros((n, 1, 5, 5), np.float32)
    y = np.arange(n)
    loader = DataLoader(x, y, batch_size=batch, drop_last=drop_last)
    batches = _epoch(loader)
    assert [len(yb) for _, yb in batches] == sizes == [len(xb) for xb, _ in batches]
    assert len(loader) == len(sizes)
    assert all(xb.shape[1:] == (1, 5, 5) for xb, _ in batches)
    assert loader.num_samples == sum(sizes)


def test_loader_without_shuffle_keeps_order():
    x, y = _toy(10)
    ys = np.concatenate([yb for _, yb in DataLoader(x, y, 3)])
    xs = np.concatenate([xb for xb, _ in DataLoader(x, y, 3)])
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_array_equal(xs, x)


def test_loader_shuffles_each_epoch_and_repeats_with_seed():
    x, y = _toy(40)
    loader = DataLoader(x, y, 8, shuffle=True, seed=5)
    e1, e2 = _epoch(loader), _epoch(loader)
    order1 = np.concatenate([xb[:, 0] for xb, _ in e1])
    order2 = np.concatenate([xb[:, 0] for xb, _ in e2])
    assert sorted(order1) == sorted(order2) == list(range(40))  # a permutation each epoch
    assert not np.array_equal(order1, order2)  # a new order each epoch
    for xb, yb in e1:
        np.testing.assert_array_equal(yb, y[xb[:, 0].astype(int)])
    again = DataLoader(x, y, 8, shuffle=True, seed=5)
    for (xa, ya), (xb, yb) in zip(e1 + e2, _epoch(again) + _epoch(again)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_loader_augment_gets_the_loaders_generator():
    x = np.ones((6, 1, 4, 4), np.float32)
    calls = []

    def augment(batch, rng):
        calls.append(rng)
        return batch * 2

    loader = DataLoader(x, np.zeros(6, int), 4, augment=augment)
    out = _epoch(loader)
    assert len(calls) == 2 and all(r is loader.rng for r in calls)
    assert all((xb == 2).all() for xb, _ in out)
    np.testing.assert_array_equal(x, 1)  # the data is not modified


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=2.0), ValueError, "batch_size"),
    (dict(augment=3), TypeError, "augment"),
])
def test_loader_bad_arguments(kwargs, exc, match):
    x, y = _toy(10)
    with pytest.raises(exc, match=match):
        DataLoader(x, y, **kwargs)
    with pytest.raises(ValueError, match="same number"):
        DataLoader(x, y[:5])


def test_data_loader_takes_any_indexable_dataset():
    pairs = [(np.full((1, 2, 2), i, np.float32), i % 2) for i in range(5)]
    loader = DataLoader(pairs, batch_size=2)
    batches = list(loader)
    assert [len(yb) for _, yb in batches] == [2, 2, 1]
    np.testing.assert_array_equal(batches[1][0][:, 0, 0, 0], [2, 3])
    assert batches[2][1].tolist() == [0] and batches[2][1].dtype == np.int64
    np.testing.assert_array_equal(loader.y[[1, 4]], [1, 0])  # no targets: read the samples
    assert loader.x[2:2].shape == (0, 1, 2, 2) and loader.y[2:2].dtype == np.int64
    with pytest.raises(TypeError, match=r"\(x, y\) arrays or a dataset"):
        DataLoader(np.zeros((4, 2)))
    with pytest.raises(TypeError, match="dataset with __len__"):
        DataLoader(42)
    with pytest.raises(ValueError, match="at least one sample"):
        DataLoader([])


# ----------------------------------------------------------------- augmentation

def test_random_shift_moves_whole_images_with_zero_fill():
    rng = np.random.default_rng(0)
    x = np.zeros((50, 2, 9, 9), np.float32)
    x[:, 0, 4, 4] = 1.0  # one bright pixel in the centre of channel 0
    x[:, 1, 4, 4] = 2.0
    out = RandomShift(2)(x, rng)
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = set()
    for img in out:
        (r, c), = np.argwhere(img[0] == 1.0)
        assert abs(r - 4) <= 2 and abs(c - 4) <= 2
        assert img[1, r, c] == 2.0 and img.sum() == 3.0  # both channels move together
        shifts.add((r, c))
    assert len(shifts) > 10  # shifts vary per image
    # a shift beyond the border drops pixels instead of wrapping them
    edge = np.zeros((200, 1, 5, 5), np.float32)
    edge[:, 0, 0, 0] = 1.0
    assert RandomShift(1)(edge, rng).sum() < 200
    np.testing.assert_array_equal(RandomShift(0)(x, rng), x)


def test_random_affine_identity_and_variation():
    rng = np.random.default_rng(0)
    x = np.random.default_rng(1).random((4, 1, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(RandomAffine(0, 0, (1, 1))(x, rng), x, atol=1e-6)
    out = RandomAffine(15, 1.5, (0.9, 1.1))(x, rng)
    assert out.shape == x.shape and out.dtype == np.float32
    assert not np.allclose(out, x)
    assert 0.0 <= out.min() and out.max() <= 1.0  # bilinear mixing stays in range


def test_augmentation_bad_arguments():
    with pytest.raises(ValueError, match="max_shift"):
        RandomShift(-1)
    with pytest.raises(ValueError, match="scale"):
        RandomAffine(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="degrees"):
        RandomAffine(degrees=-5)
    with pytest.raises(ValueError, match="N, C, H, W"):
        RandomShift(1)(np.zeros((3, 3)), np.random.default_rng())
