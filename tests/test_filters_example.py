"""examples/filters.py: Gaussian blur and Sobel edges on scikit-learn's
sample photograph, written as PNG (the files decoded back and checked), and
the filters against direct numpy sums and their defining properties."""
import importlib.util
import os
import zlib

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn not installed: the filters example skipped")
pytest.importorskip("PIL", reason="Pillow not installed (scikit-learn reads the JPEG with it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location(
        "filters_example", os.path.join(ROOT, "examples", "filters.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read_png(path):
    """Decodes the example's own PNGs (8-bit, filter 0 rows, one IDAT)."""
    with open(path, "rb") as f:  # closed at once (a ResourceWarning otherwise)
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == int.from_bytes(
            data[pos + 8 + n:pos + 12 + n], "big")
        chunks[kind] = body
        pos += 12 + n
    w, h = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(chunks[b"IHDR"][4:8], "big")
    channels = 3 if chunks[b"IHDR"][9] == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    assert not raw[:, 0].any()
    return raw[:, 1:].reshape(h, w, channels).squeeze()


def test_the_example_writes_the_pngs(tmp_path):
    ex = _example()
    r = ex.run(str(tmp_path), sigma=1.0)
    h, w = 427, 640
    assert r["rgb"].shape == (3, h, w)
    for name, path in r["paths"].items():
        img = _read_png(path)
        assert img.shape == ((h, w, 3) if name in ("input", "gaussian_blur") else (h, w)), name
    # the input PNG is the photograph itself
    from sklearn.datasets import load_sample_image
    np.testing.assert_array_equal(_read_png(r["paths"]["input"]), load_sample_image("china.jpg"))
    # blurring smooths: less total variation, the same mean brightness
    tv = lambda a: np.abs(np.diff(a, axis=-1)).mean()  # noqa: E731
    assert tv(r["blurred"]) < 0.7 * tv(r["rgb"])
    assert abs(float(r["blurred"].mean()) - float(r["rgb"].mean())) < 1e-3


def test_filters_against_direct_sums():
    ex = _example()
    rng = np.random.default_rng(0)
    rgb = rng.random((3, 9, 11)).astype(np.float32)
    k = ex.gaussian_kernel(1.0)
    assert k.shape == (7, 7) and abs(float(k.sum()) - 1) < 1e-6
    out = ex.gaussian_blur(rgb, 1.0)
    padded = np.pad(rgb, ((0, 0), (3, 3), (3, 3)), mode="edge").astype(np.float64)
    for c, i, j in [(0, 0, 0), (1, 4, 5), (2, 8, 10)]:
        assert abs(out[c, i, j] - float(np.sum(padded[c, i:i + 7, j:j + 7] * k))) < 1e-6
    grey = ex.to_grey(rgb)
    gx, gy, mag = ex.sobel(grey)
    p = np.pad(grey[0], 1, mode="edge").astype(np.float64)
    for i, j in [(0, 0), (4, 5), (8, 10)]:
        win = p[i:i + 3, j:j + 3]
        assert abs(gx[i, j] - float(np.sum(win * ex.SOBEL_X))) < 1e-5
        assert abs(gy[i, j] - float(np.sum(win * ex.SOBEL_X.T))) < 1e-5
    np.testing.assert_allclose(mag, np.hypot(gx, gy), rtol=1e-6)


def test_sobel_finds_a_vertical_edge_and_ignores_flat_areas():
    ex = _example()
    grey = np.zeros((1, 8, 8), np.float32)
    grey[:, :, 4:] = 1.0                      # dark left half, bright right half
    gx, gy, mag = ex.sobel(grey)
    assert np.all(gy == 0)
    assert np.all(gx[:, 3:5] == 4) and np.all(gx[:, :2] == 0) and np.all(gx[:, 6:] == 0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        ex.gaussian_kernel(0)
