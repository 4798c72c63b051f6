import gzip
import shutil

import numpy as np
import pytest
import torch

from deploylab import data


def test_dataset_is_real_and_verified():
    ds = data.load_fashion_mnist()
    assert ds.train_images.shape == (60_000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10_000, 28, 28)
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    assert ds.source in ("cache", "debian", "download")


def test_corrupt_cache_is_skipped_and_rewritten(tmp_dirs):
    src = data.DEBIAN_DIR if data.DEBIAN_DIR.is_dir() else None
    if src is None:
        pytest.skip("needs Debian's dataset-fashion-mnist package to recover from (apt-get install dataset-fashion-mnist)")
    cache = data.cache_dir()
    cache.mkdir(parents=True)
    for stem, _ in data.FILES.values():
        shutil.copy(src / f"{stem}.gz", cache / f"{stem}.gz")
    bad = cache / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one flipped label
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.warns(UserWarning, match="does not match its pinned sha256"):
        ds = data.load_fashion_mnist(allow_download=False)
    assert ds.source == "debian"
    data.load_fashion_mnist.cache_clear()
    assert data.load_fashion_mnist(allow_download=False).source == "cache"  # repaired


def test_missing_everywhere_says_how_to_get_it(tmp_dirs, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_dirs / "nowhere")
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(allow_download=False)


def test_preprocess_contract():
    ds = data.load_fashion_mnist()
    x = data.preprocess(ds.test_images[:4])
    assert x.shape == (4, 1, data.IMAGE_SIZE, data.IMAGE_SIZE) and x.dtype == torch.float32
    assert data.preprocess(ds.test_images[0]).shape == (1, 1, 32, 32)  # a single image becomes a batch of one
    black = data.preprocess(np.zeros((28, 28), np.uint8))
    assert torch.allclose(black, torch.full_like(black, -data.MEAN / data.STD))
    with pytest.raises(TypeError, match="uint8"):
        data.preprocess(ds.test_images[:2].astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        data.preprocess(np.zeros((2, 3, 28, 28), np.uint8))


def test_normalisation_constants_match_the_training_images():
    ds = data.load_fashion_mnist()
    pixels = ds.train_images.astype(np.float64) / 255
    assert abs(pixels.mean() - data.MEAN) < 5e-4 and abs(pixels.std() - data.STD) < 5e-4


def test_splits_are_fixed_and_disjoint():
    train, val = data.split_indices()
    assert len(train) == 55_000 and len(val) == 5_000
    assert not set(train.tolist()) & set(val.tolist())
    again_train, _ = data.split_indices()
    assert np.array_equal(train, again_train)


def test_subsets_and_calibration():
    x, y = data.tensors("test", 100)
    assert x.shape == (100, 1, 32, 32) and y.shape == (100,)
    cal = data.calibration_set(16)
    assert cal.shape == (16, 1, 32, 32)
    with pytest.raises(ValueError, match="at least one image"):
        data.calibration_set(0)
    with pytest.raises(ValueError, match="unknown split"):
        data.tensors("validation")


def test_augment_keeps_shape_and_content():
    x, _ = data.tensors("test", 8)
    out = data.augment(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    same = data.augment(x, padding=0, generator=torch.Generator().manual_seed(0))
    # without padding only flips remain: every image equals the original or its mirror
    for a, b in zip(same, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))


def test_sample_images_are_real_pngs(tmp_path):
    from PIL import Image

    paths = data.write_sample_images(tmp_path, per_class=1)
    assert len(paths) == 10
    img = np.array(Image.open(paths[3]))
    ds = data.load_fashion_mnist()
    first_dress = ds.test_images[np.flatnonzero(ds.test_labels == 3)[0]]
    assert np.array_equal(img, first_dress)


def test_split_size_counts_what_tensors_returns_without_loading():
    for split, limit in [("train", 1024), ("val", None), ("test", None), ("test", 512), ("train", 10**9)]:
        assert data.split_size(split, limit) == len(data.tensors(split, limit)[1])
    with pytest.raises(ValueError, match="unknown split"):
        data.split_size("holdout")
