"""convcore.data.ImageFolder: class folders, resizing and cropping, normalisation,
errors, batching with DataLoader, and training with fit against PyTorch on the
same pictures (drawn here)."""
import os
import sys

import numpy as np
import pytest

pytest.importorskip("PIL", reason="ImageFolder needs Pillow")
from PIL import Image, ImageDraw  # noqa: E402

from convcore import nn  # noqa: E402
from convcore.data import DataLoader, ImageFolder  # noqa: E402
from convcore.optim import SGD  # noqa: E402
from convcore.train import evaluate, fit  # noqa: E402


def _save(path, size=(8, 6), colour=(10, 20, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


# ------------------------------------------------------------------ class folders

def test_classes_samples_and_targets_follow_torchvision(tmp_path):
    for path in ["dog/b.png", "dog/a.JPG", "dog/deeper/c.jpeg", "cat/1.bmp", "cat/2.PPM",
                 "bird/x.gif", "bird/y.webp"]:
        _save(tmp_path / path)
    (tmp_path / "dog" / "notes.txt").write_text("not a picture")
    _save(tmp_path / ".thumbnails" / "t.png")  # hidden folders are no class
    (tmp_path / "README").write_text("a file beside the class folders")

    data = ImageFolder(tmp_path, size=4)
    assert data.classes == ["bird", "cat", "dog"]
    assert data.class_to_idx == {"bird": 0, "cat": 1, "dog": 2}
    names = [(os.path.relpath(p, tmp_path).replace(os.sep, "/"), c) for p, c in data.samples]
    assert names == [("bird/x.gif", 0), ("bird/y.webp", 0), ("cat/1.bmp", 1), ("cat/2.PPM", 1),
                     ("dog/a.JPG", 2), ("dog/b.png", 2), ("dog/deeper/c.jpeg", 2)]
    assert data.targets == [0, 0, 1, 1, 2, 2, 2] and len(data) == 7
    image, label = data[6]
    assert image.shape == (3, 4, 4) and image.dtype == np.float32 and label == 2
    assert data[-1][1] == 2
    assert "7 pictures, 3 classes" in repr(data)


def test_extensions_can_be_narrowed(tmp_path):
    _save(tmp_path / "a" / "1.png")
    _save(tmp_path / "a" / "2.jpg")
    data = ImageFolder(tmp_path, size=4, extensions=(".PNG",))
    assert [p.endswith("1.png") for p, _ in data.samples] == [True]


# ------------------------------------------------------------- sizes and pixels

def _stripes(path, width=60, height=20):
    """Three vertical stripes, red | green | blue, each a third of the width."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third, 0] = pixels[:, third:2 * third, 1] = pixels[:, 2 * third:, 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("size, shape", [(20, (20, 20)), ((10, 16), (10, 16)), (7, (7, 7))])
def test_crop_keeps_the_centre(tmp_path, size, shape):
    _stripes(tmp_path / "c" / "s.png")
    image, _ = ImageFolder(tmp_path, size=size)[0]
    assert image.shape == (3,) + shape
    # a square or slightly wide crop of a 3:1 picture falls inside the green stripe
    np.testing.assert_allclose(image[:, :, image.shape[2] // 2].mean(axis=1), [0, 1, 0],
                               atol=0.02)
    if size == 20:
        np.testing.assert_array_equal(image[1], 1.0)  # exactly the middle 20 columns


def test_without_crop_the_picture_is_stretched(tmp_path):
    _stripes(tmp_path / "c" / "s.png")
    image, _ = ImageFolder(tmp_path, size=(5, 9), crop=False)[0]
    assert image.shape == (3, 5, 9)
    np.testing.assert_allclose(image[:, 2, [0, 4, 8]], np.eye(3), atol=1e-6)


def test_normalisation_by_hand(tmp_path):
    pixels = np.array([[[0, 51, 255], [255, 102, 0]],
                       [[17, 34, 68], [200, 100, 50]]], np.uint8)        # (H, W, RGB)
    (tmp_path / "k").mkdir()
    Image.fromarray(pixels).save(tmp_path / "k" / "p.png")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image, _ = ImageFolder(tmp_path, size=2, mean=mean, std=std)[0]
    expected = np.empty((3, 2, 2))
    for c in range(3):
        for i in range(2):
            for j in range(2):
                expected[c, i, j] = (pixels[i, j, c] / 255 - mean[c]) / std[c]
    np.testing.assert_allclose(image, expected, rtol=1e-6, atol=1e-6)
    plain, _ = ImageFolder(tmp_path, size=2)[0]  # no mean/std: [0, 1]
    np.testing.assert_allclose(plain, pixels.transpose(2, 0, 1) / 255, atol=1e-7)
    single, _ = ImageFolder(tmp_path, size=2, mean=0.5, std=0.5)[0]
    np.testing.assert_allclose(single, (plain - 0.5) / 0.5, atol=1e-6)


def test_grayscale_and_other_modes(tmp_path):
    _save(tmp_path / "a" / "rgb.png", colour=(200, 100, 50))
    _save(tmp_path / "a" / "rgba.png", colour=(200, 100, 50, 128), mode="RGBA")
    _save(tmp_path / "a" / "grey.png", colour=128, mode="L")
    _save(tmp_path / "a" / "palette.gif", colour=3, mode="P")
    grey = ImageFolder(tmp_path, size=(3, 5), grayscale=True, mean=0.5, std=0.2)
    x, y = grey.arrays()
    assert x.shape == (4, 1, 3, 5) and x.dtype == np.float32 and y.tolist() == [0] * 4
    luma = (200 * 299 + 100 * 587 + 50 * 114) / 1000  # ITU-R 601, Pillow's "L"
    np.testing.assert_allclose(x[2], (luma / 255 - 0.5) / 0.2, atol=0.5 / 255 / 0.2)
    colour = ImageFolder(tmp_path, size=4).arrays()[0]
    assert colour.shape == (4, 3, 4, 4)
    np.testing.assert_allclose(colour[0, :, 0, 0], 128 / 255)  # grey.png: R = G = B
    np.testing.assert_allclose(colour[2, :, 0, 0], np.array([200, 100, 50]) / 255)


# ---------------------------------------------------------------------- errors

def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="root: no such folder"):
        ImageFolder(tmp_path / "nowhere", size=8)
    _save(tmp_path / "file.png")
    with pytest.raises(NotADirectoryError, match="root must be a folder"):
        ImageFolder(tmp_path / "file.png", size=8)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(tmp_path, size=8)
    (tmp_path / "ant").mkdir()
    with pytest.raises(FileNotFoundError, match="no pictures in the class folder ant of"):
        ImageFolder(tmp_path, size=8)
    _save(tmp_path / "ant" / "1.png")
    _save(tmp_path / "cat" / "1.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / "notes.txt").write_text("no picture here")
    with pytest.raises(FileNotFoundError, match="class folders dog, emu of"):
        ImageFolder(tmp_path, size=8)
    with pytest.raises(TypeError, match="root must be a path"):
        ImageFolder(3, size=8)


def test_unreadable_picture_names_the_file(tmp_path):
    _save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is no picture")
    data = ImageFolder(tmp_path, size=4)
    assert data[1][0].shape == (3, 4, 4)
    with pytest.raises(OSError, match="cannot read the picture .*broken.png"):
        data[0]
    with pytest.raises(OSError, match="broken.png"):
        list(DataLoader(data, batch_size=2))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(size=0), ValueError, "size must be a positive int"),
    (dict(size=(4,)), ValueError, r"size must be an int or a pair \(height, width\)"),
    (dict(size=(4, -1)), ValueError, r"size\[1\] \(width\)"),
    (dict(size=2.5), ValueError, "size"),
    (dict(size=4, mean=(0.5, 0.5)), ValueError, "mean must be a number or 3 numbers"),
    (dict(size=4, std=(1, 1, 1), grayscale=True), ValueError, "std must be a number or 1"),
    (dict(size=4, std=0), ValueError, "std must not be zero"),
    (dict(size=4, mean="x"), ValueError, "mean"),
    (dict(size=4, interpolation="cubic"), ValueError, "interpolation must be one of"),
    (dict(size=4, extensions=".png"), TypeError, "extensions"),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    _save(tmp_path / "a" / "1.png")
    with pytest.raises(error, match=match):
        ImageFolder(tmp_path, **kwargs)


def test_index_errors(tmp_path):
    _save(tmp_path / "a" / "1.png")
    data = ImageFolder(tmp_path, size=4)
    with pytest.raises(IndexError, match="index 1 is out of range for 1 pictures"):
        data[1]
    with pytest.raises(TypeError, match="index must be an int"):
        data["0"]


def test_missing_pillow_says_what_to_install(tmp_path, monkeypatch):
    _save(tmp_path / "a" / "1.png")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r'pip install "convcore\[data\]"'):
        ImageFolder(tmp_path, size=4)


# ------------------------------------------------------------------- batching

def test_data_loader_reads_a_dataset_batch_by_batch(tmp_path):
    rng = np.random.default_rng(0)
    for c in "abc":
        for i in range(5):
            _save(tmp_path / c / f"{i}.png", colour=tuple(int(v) for v in rng.integers(0, 256, 3)))
    data = ImageFolder(tmp_path, size=(3, 2), mean=0.5, std=0.5)
    x, y = data.arrays()
    assert x.shape == (15, 3, 3, 2) and y.dtype == np.int64
    from_arrays = DataLoader(x, y, batch_size=4, shuffle=True, seed=7, drop_last=True)
    from_folder = DataLoader(data, batch_size=4, shuffle=True, seed=7, drop_last=True)
    assert len(from_folder) == 3 and from_folder.num_samples == 12
    for epoch in range(2):  # the same order, epoch after epoch
        pairs = list(zip(from_arrays, from_folder))
        assert len(pairs) == 3
        for (xa, ya), (xf, yf) in pairs:
            np.testing.assert_array_equal(xa, xf)
            np.testing.assert_array_equal(ya, yf)
            assert xf.flags.c_contiguous and xf.dtype == np.float32
    # loader.x / loader.y index like arrays (the distributed ShardedLoader reads them)
    np.testing.assert_array_equal(from_folder.x[[4, 0]], x[[4, 0]])
    np.testing.assert_array_equal(from_folder.y[2:6], y[2:6])
    assert "ImageFolder(15 pictures" in repr(from_folder)


def test_ranks_share_the_batches_of_an_image_folder(tmp_path):
    """distributed.ShardedLoader reads loader.x and loader.y: with a dataset
    the ranks' slices still make up the batches of one process."""
    from types import SimpleNamespace

    from convcore.distributed import ShardedLoader

    rng = np.random.default_rng(1)
    for c in "ab":
        for i in range(7):
            _save(tmp_path / c / f"{i}.png", colour=tuple(int(v) for v in rng.integers(0, 256, 3)))
    data = ImageFolder(tmp_path, size=2)
    whole = list(DataLoader(data, batch_size=6, shuffle=True, seed=3))
    ranks = [list(ShardedLoader(DataLoader(data, batch_size=3, shuffle=True, seed=3),
                                SimpleNamespace(rank=r, size=2))) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 3
    assert ranks[1][-1][0].shape == (0, 3, 2, 2)  # 14 = 6 + 6 + 2: rank 1's last share is empty
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks):
        np.testing.assert_array_equal(x, np.concatenate([x0, x1]))
        np.testing.assert_array_equal(y, np.concatenate([y0, y1]))


# ------------------------------------------------- training: convcore vs PyTorch

SHAPES = ("circle", "square", "triangle")


def draw_shapes(root, per_class, seed):
    """per_class PNG pictures of each shape, each of a random size (28 to 40
    pixels a side, rarely square, so ImageFolder crops), with the shape's
    position, size and colour and the background's colour drawn at random,
    plus pixel noise."""
    rng = np.random.default_rng(seed)
    for name in SHAPES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(28, 41, size=2))
            background = rng.integers(0, 256, size=3)
            # the shape differs from the background by 80 to 175 in every channel (mod 256)
            colour = (background + rng.integers(80, 176, size=3) * rng.choice([-1, 1], 3)) % 256
            fill = tuple(int(c) for c in colour)
            picture = Image.new("RGB", (w, h), tuple(int(c) for c in background))
            draw = ImageDraw.Draw(picture)
            r = rng.uniform(0.22, 0.4) * min(w, h)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if name == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif name == "square":
                s = 0.85 * r
                draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)],
                             fill=fill)
            pixels = np.asarray(picture, np.int16) + rng.integers(-20, 21, size=(h, w, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                root / name / f"{i:03d}.png")


def _lenet_like(side):
    """Conv5-ReLU-Pool2-Conv3-ReLU-Pool2-FC for three classes."""
    nn.init.manual_seed(0)
    flat = 16 * (((side - 4) // 2 - 2) // 2) ** 2
    return nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(flat, 3))


def _torch_twin(torch, model, side):
    tnn = torch.nn
    flat = 16 * (((side - 4) // 2 - 2) // 2) ** 2
    twin = tnn.Sequential(tnn.Conv2d(3, 8, 5), tnn.ReLU(), tnn.MaxPool2d(2),
                          tnn.Conv2d(8, 16, 3), tnn.ReLU(), tnn.MaxPool2d(2),
                          tnn.Flatten(), tnn.Linear(flat, 3))
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                          model.state_dict().items()})  # the same initial weights
    return twin


def _train_both(tmp_path, per_class, test_per_class, epochs, side, lr, seed,
                dtype=np.float32):
    """Trains the same model from the same weights on the same batches, in the
    same order, with the same optimiser, in convcore (fit on an ImageFolder)
    and in PyTorch. Returns both test accuracies, both per-epoch train losses
    and the largest difference between the trained weights."""
    torch = pytest.importorskip("torch", reason="the comparison trains in PyTorch too")
    draw_shapes(tmp_path / "train", per_class, seed)
    draw_shapes(tmp_path / "test", test_per_class, seed + 1000)
    kw = dict(size=side, mean=0.5, std=0.25)
    train, test = ImageFolder(tmp_path / "train", **kw), ImageFolder(tmp_path / "test", **kw)
    assert train.classes == sorted(SHAPES) and len(train) == 3 * per_class

    def batches(data, batch_size, **kw):  # the pictures in dtype
        return DataLoader(data, batch_size=batch_size, augment=lambda xb, rng: xb.astype(dtype),
                          **kw)

    model = _lenet_like(side).to(dtype)
    twin = _torch_twin(torch, model, side).to(getattr(torch, np.dtype(dtype).name))
    x0, _ = next(iter(batches(train, 16)))
    with torch.no_grad():
        np.testing.assert_allclose(model(x0), twin(torch.from_numpy(x0)).numpy(), rtol=1e-5,
                                   atol=1e-5)  # the same function before training
    history = fit(model, nn.CrossEntropyLoss(), SGD(model.parameters(), lr, momentum=0.9),
                  batches(train, 16, shuffle=True, seed=seed), epochs=epochs, progress=False)
    _, ours = evaluate(model, batches(test, 256))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer = torch.optim.SGD(twin.parameters(), lr, momentum=0.9)
        loader = batches(train, 16, shuffle=True, seed=seed)  # the same batches
        losses = []
        for _ in range(epochs):
            total = 0.0
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(xb)),
                                                         torch.from_numpy(yb))
                loss.backward()
                optimizer.step()
                total += loss.item() * len(yb)
            losses.append(total / len(train))
        x_test, y_test = test.arrays()
        with torch.no_grad():
            logits = twin(torch.from_numpy(x_test.astype(dtype)))
            theirs = float((logits.argmax(1).numpy() == y_test).mean())
    finally:
        torch.set_num_threads(threads)
    weights = twin.state_dict()
    apart = max(float(np.abs(np.asarray(v) - weights[k].numpy()).max())
                for k, v in model.state_dict().items())
    return ours, theirs, history.train_loss, losses, apart


def test_image_folder_training_matches_pytorch(tmp_path):
    ours, theirs, our_losses, their_losses, _ = _train_both(
        tmp_path, per_class=200, test_per_class=100, epochs=20, side=24, lr=0.01, seed=0)
    print(f"test accuracy convcore {100 * ours:.1f}%, PyTorch {100 * theirs:.1f}%")
    # the first epoch follows nearly the same path (same weights, batches and update
    # rule); float32 rounding differences grow from batch to batch (8e-4 measured)
    assert our_losses[0] == pytest.approx(their_losses[0], rel=3e-3)
    assert ours > 0.85 and theirs > 0.85  # chance is 1/3
    assert abs(ours - theirs) <= 0.03, (ours, theirs)


def test_image_folder_training_is_pytorchs_in_float64(tmp_path):
    """In float64 rounding cannot steer the two runs apart: after training
    the weights agree to ~1e-15 and so do the predictions."""
    ours, theirs, our_losses, their_losses, apart = _train_both(
        tmp_path, per_class=60, test_per_class=30, epochs=5, side=24, lr=0.01, seed=5,
        dtype=np.float64)
    assert apart < 1e-10
    np.testing.assert_allclose(our_losses, their_losses, rtol=1e-10)
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_image_folder_training_matches_pytorch_larger(tmp_path, seed):
    ours, theirs, our_losses, their_losses, _ = _train_both(
        tmp_path, per_class=500, test_per_class=200, epochs=20, side=32, lr=0.01, seed=seed)
    print(f"seed {seed}: test accuracy convcore {100 * ours:.1f}%, PyTorch {100 * theirs:.1f}%;"
          f" train loss epoch 1 {our_losses[0]:.4f} / {their_losses[0]:.4f}, epoch "
          f"{len(our_losses)} {our_losses[-1]:.4f} / {their_losses[-1]:.4f}")
    assert our_losses[0] == pytest.approx(their_losses[0], rel=3e-3)
    assert ours > 0.9 and theirs > 0.9
    assert abs(ours - theirs) <= 0.02, (ours, theirs)
